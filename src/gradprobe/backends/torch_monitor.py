"""The GradientMonitor's PyTorch train-step and optimizer hooks (the
backend-neutral half, the callback, is `gradprobe.monitor.callback`; the
TensorFlow hooks are in `gradprobe.backends.tensorflow_monitor`).

Keras' PyTorch train step runs eagerly: `train_step` computes the loss, calls
`backward()` and hands the gradients to `optimizer.apply`. `StepProbe` wraps,
for the duration of each call of the monitor's train function (through
`gradprobe.core._patch`, removed in `finally`):

- the model's `train_step`: numbers the step (on the host) and, after it,
  gathers the step's record into one small tensor (no host sync: it is copied
  to the host once, when the callback reads the status after the step);
- `apply` of the model's optimizer: where the optimizer may not apply the step
  (a `LossScaleOptimizer` whose scaled gradients overflowed, gradient
  accumulation), records that step's unscaled gradients itself;
- the update step of the optimizer that applies the gradients (the inner
  optimizer of a `LossScaleOptimizer`): the gradients exactly as applied (after
  unscaling, accumulation and clipping) and the size of each update;
- with `activations=True`, `call` of the selected layers: a tensor hook on each
  output receives the gradient of the loss w.r.t. it in the step's own backward.

Statistics of the steps that are not recorded (`every`): only the NaN/Inf test,
one fused max-norm over all gradients.

With `replay=True` that test runs in `apply`, over all the step's gradients,
and is read on the host: a non-finite step's `apply` does not run (no update,
the iteration count unchanged; `Skip.NONFINITE`) and the train step's logs hand
back its batch (`BATCH_KEY`, a reference) for the callback's replay.

With `jit_compile=True` (`torch.compile`) the monitor's train function runs
eagerly (its hooks are Python code that `torch.compile` would trace into
graph breaks and recompilations); it warns once per fit.
Imported only when the Keras backend is PyTorch.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from gradprobe.backends import _keras_private
from gradprobe.backends._monitor_host import (  # noqa: F401 - the hooks' interface
    EventWriter,
    Records,
    applying_optimizer,
    build_model,
    check_options,
    enter_optimizer_hooks,
    loss_scaler,
)
from gradprobe.core import _patch
from gradprobe.monitor.layout import ACT_STATS, GRAD_STATS, Skip, Status, StatusLayout

STATUS_KEY = "_gradprobe_monitor_status"
# With replay=True: the step's batch (a reference), handed back in the train step's logs.
BATCH_KEY = "_gradprobe_monitor_batch"
# What a call of the train function raises where the data runs out.
END_OF_DATA = (StopIteration,)
SummaryWriter = EventWriter




def is_distributed(model: Any) -> bool:
    """Whether the update runs per replica: never in Keras' PyTorch trainer."""
    return False


def unbatch(batch: Any) -> Any:
    """The batch handed back under `BATCH_KEY`, as the train step received it."""
    return batch



class StepProbe:
    """The monitor's hooks of one model and optimizer, and the host-side record.

    Args:
        model: The compiled model.
        variables: The monitored trainable variables (forward order).
        layers: The `(path, layer)` pairs whose activation gradients are recorded.
        every: Statistics are computed on steps that are multiples of `every`.
        histograms: Keep a copy of the last recorded step's gradients.
        replay: A step with a NaN/Inf gradient is not applied (`Skip.NONFINITE`:
            the model keeps its weights, the optimizer its iteration count) and
            the train step hands back its batch (`BATCH_KEY`, a reference), so
            that the callback can replay it on the weights it started from.
    """

    def __init__(self, model: Any, variables: list[Any], layers: list[tuple[str, Any]],
                 every: int, histograms: bool, replay: bool = False):
        self.model = model
        self.optimizer = model.optimizer
        self.scaler = loss_scaler(self.optimizer)
        self.applier = applying_optimizer(self.optimizer)
        self.accumulation = int(getattr(self.applier, "gradient_accumulation_steps", None) or 0)
        self.variables = variables
        self.layers = layers
        self.every = int(every)
        self.histograms = bool(histograms)
        self.replay = bool(replay)
        self.slots = 1  # Keras refuses steps_per_execution > 1 on PyTorch
        self.layout = StatusLayout(len(variables), len(layers), self.slots)
        self.records = Records(self.layout)
        self.records.step = self.records.iterations = self.iterations()
        self._index = {id(v): i for i, v in enumerate(variables)}
        self._cell: dict[str, Any] | None = None
        self._copies: list[np.ndarray] = []

    # ------------------------------------------------------------ install
    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The wrappers, in place for one call of the train function."""
        update = _keras_private.optimizer_update_step_wrapper(self._wrap_update)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patch.wrapped_methods(
                self.model, {"train_step": self._wrap_train_step}))
            enter_optimizer_hooks(stack, self.optimizer, self.applier, self._wrap_apply, update)
            if self.layers:
                stack.enter_context(_patch.wrapped_calls(
                    [layer for _, layer in self.layers], self._activation_hook))
            yield

    # ------------------------------------------------------------ hooks
    def _wrap_train_step(self, original: Callable) -> Callable:
        def train_step(*args: Any, **kwargs: Any) -> Any:
            step = self.records.step + 1
            cell = {"recording": step % self.every == 0, "acts": {}}
            self._cell = cell
            try:
                logs = original(*args, **kwargs)
            finally:
                self._cell = None
            self.records.add(step, self._record(cell, step))
            if self.replay and args and isinstance(logs, dict):
                logs = {**logs, BATCH_KEY: args[0]}
            return logs

        return train_step

    def _mine(self, grads: Any, variables: Any) -> list[Any]:
        """The gradients of the monitored variables, in their order (None where
        the optimizer received none)."""
        by_id = {id(v): g for g, v in zip(grads, variables)}
        return [by_id.get(id(v)) for v in self.variables]

    def _scale(self) -> Any:
        """The loss scale of this step's loss (1 without loss scaling)."""
        if self.scaler is None:
            return None
        if not self.scaler.built:
            return torch.tensor(float(self.scaler.initial_scale))
        return self.scaler.dynamic_scale.value.detach().clone().float()

    def _wrap_apply(self, original: Callable) -> Callable:
        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            cell = self._cell
            if cell is None:  # not a step of the monitor's train function
                return original(grads, trainable_variables)
            cell["applied"] = True
            if self.replay:
                return self._apply_if_finite(original, cell, grads, trainable_variables)
            if self.scaler is None and not self.accumulation:
                return original(grads, trainable_variables)
            grads = list(grads)
            variables = (trainable_variables if trainable_variables is not None
                         else _keras_private.optimizer_default_variables(self.optimizer))
            mine = self._mine(grads, list(variables))
            scale = self._scale()
            cell["scale"] = scale
            result = original(grads, trainable_variables)
            if "grads" not in cell:
                # The update step did not run: a skipped step, recorded here.
                finite = all(bool(torch.isfinite(g).all()) for g in grads if g is not None)
                overflow = self.scaler is not None and not finite
                cell["skip"] = float(Skip.OVERFLOW if overflow else Skip.ACCUMULATED)
                cell["grads"] = [None if g is None else
                                 (g.detach().float() / scale if scale is not None
                                  else g.detach().float()) for g in mine]
            return result

        return apply

    def _apply_if_finite(self, original: Callable, cell: dict[str, Any], grads: Any,
                         trainable_variables: Any) -> Any:
        """`replay=True`: the update runs only where every gradient is finite
        (one fused max-norm over all of them, and one read on the host); a step
        with a NaN/Inf gradient is recorded here (its flags, its statistics on a
        recorded step) and not applied: `optimizer.apply` does not run, so the
        weights, the optimizer's variables and its iteration count stay as the
        step found them. (`GradientMonitor` refuses loss scaling and gradient
        accumulation with replay.)"""
        grads = list(grads)
        variables = list(trainable_variables if trainable_variables is not None
                         else _keras_private.optimizer_default_variables(self.optimizer))
        device = next((g.device for g in grads if g is not None), None)
        bad = _nonfinite_flags(grads, device)
        if not bool(bad.any()):
            # the flags of the monitored gradients, for `_record` (no second check)
            index = {id(v): i for i, v in enumerate(variables)}
            at = [index.get(id(v)) for v in self.variables]
            if None not in at:  # (else `_record` checks the monitored gradients itself)
                cell["flags"] = bad[at]
            return original(grads, trainable_variables)
        cell["skip"] = float(Skip.NONFINITE)
        cell["grads"] = [None if g is None else g.detach() for g in self._mine(grads, variables)]
        return None

    def _wrap_update(self, original: Callable) -> Callable:
        def update(grads: Any, trainable_variables: Any, learning_rate: Any) -> Any:
            cell = self._cell
            if cell is None:
                return original(grads, trainable_variables, learning_rate)
            variables = list(trainable_variables)
            mine = self._mine(grads, variables)
            cell["grads"] = [None if g is None else g.detach() for g in mine]
            if not cell["recording"]:
                return original(grads, trainable_variables, learning_rate)
            # ||w_after - w_before|| / ||w_before|| for the variables with a
            # gradient, a few fused (`torch._foreach_*`) calls for all of them.
            present = [i for i, g in enumerate(mine) if g is not None]
            values = [self.variables[i].value.detach() for i in present]
            with torch.no_grad():
                before = torch._foreach_mul(values, 1.0) if values else []  # copies
            result = original(grads, trainable_variables, learning_rate)
            with torch.no_grad():
                cell["ratios"] = _ratios(before, values, present, len(self.variables)) \
                    if self.variables else None
            return result

        return update

    def _activation_hook(self, layer: Any, outputs: Any, args: tuple = (),
                         kwargs: dict | None = None) -> Any:
        cell = self._cell
        if (cell is None or not cell["recording"] or not isinstance(outputs, torch.Tensor)
                or not outputs.dtype.is_floating_point or not outputs.requires_grad):
            return outputs
        index = next(i for i, (_, lay) in enumerate(self.layers) if lay is layer)
        scale = self._scale()

        def observe(grad: Any) -> None:
            g = grad.detach().float()
            cell["acts"][index] = _grad_stats(g / scale if scale is not None else g)[:4]

        outputs.register_hook(observe)
        return outputs

    # ------------------------------------------------------------ the record
    def _record(self, cell: dict[str, Any], step: int) -> Any:
        """One step's record vector (see `_monitor_host.HEAD`), on the device."""
        n, m = len(self.variables), len(self.layers)
        grads = cell.get("grads")
        device = next((g.device for g in grads or () if g is not None), None)
        if grads is None:
            stats = torch.zeros((n, len(GRAD_STATS)), device=device)
            flags = torch.zeros(n, device=device)
        elif cell["recording"]:
            stats = _all_grad_stats(grads, device) if n else torch.zeros((0, len(GRAD_STATS)))
            flags = (stats[:, 3] > 0).float()
            if self.histograms:
                self._copies = [np.zeros(tuple(v.shape), np.float32) if g is None else
                                g.detach().float().cpu().numpy() for g, v in zip(grads,
                                                                                 self.variables)]
                self.records.copies_step = step
        else:
            stats = torch.zeros((n, len(GRAD_STATS)), device=device)
            flags = cell.get("flags")
            if flags is None:
                flags = _nonfinite_flags(grads, device)
        ratios = cell.get("ratios")
        if ratios is None:
            ratios = torch.zeros(n, device=device)
        scale = cell.get("scale")
        head = torch.tensor([1.0 if cell.get("applied") else 0.0,
                             1.0 if grads is not None else 0.0,
                             cell.get("skip", float(Skip.APPLIED)), 1.0], device=device)
        if scale is not None:
            head[3] = scale.to(head.device)
        acts = torch.zeros((m, len(ACT_STATS)), device=device)
        for i, row in cell["acts"].items():
            acts[i] = row.to(acts.device)
        return torch.cat([head, flags.to(head.device).float(), stats.reshape(-1).to(head.device),
                          ratios.to(head.device).float(), acts.reshape(-1)])

    # ------------------------------------------------------------ reading
    def iterations(self) -> int:
        """The applying optimizer's raw iteration count, now."""
        return int(_keras_private.optimizer_raw_iterations(self.applier).value)

    def set_step(self, step: int) -> None:
        self.records.step = int(step)

    def read_status(self) -> Status:
        """The status after the steps run since the last read (host copy)."""
        self.records.iterations = self.iterations()
        return self.records.status(lambda t: t.detach().cpu().numpy())

    def unpack(self, status: Status) -> Status:
        return status

    def histogram_values(self) -> list[np.ndarray]:
        """The gradients of the step `Status.copies_step` (with `histograms=True`)."""
        return list(self._copies)


def _ratios(before: list[Any], after: list[Any], where: list[int], n: int) -> Any:
    """||after - before|| / ||before|| per variable (0 where ||before|| = 0), at
    the indices `where` of a vector of `n` (0 elsewhere)."""
    if not where:
        return torch.zeros(n)
    old = torch.stack(torch._foreach_norm([b.float() for b in before])).float()
    delta = torch.stack(torch._foreach_norm(torch._foreach_sub(
        [a.float() for a in after], [b.float() for b in before]))).float()
    ratio = torch.where(old > 0, delta / torch.where(old > 0, old, torch.ones_like(old)),
                        torch.zeros_like(old))
    if len(where) == n:
        return ratio
    out = torch.zeros(n, device=ratio.device)
    out[where] = ratio
    return out


def _all_grad_stats(grads: list[Any], device: Any) -> Any:
    """The rows of `GRAD_STATS` of all gradients (zeros for None): where every
    entry is finite (the usual case), from a few fused calls for all of them
    (`torch._foreach_norm`) and one zero count per gradient; otherwise
    `_grad_stats` of each, over its finite entries."""
    present = [(i, g.float()) for i, g in enumerate(grads) if g is not None and g.numel()]
    stats = torch.zeros((len(grads), len(GRAD_STATS)), device=device)
    if not present:
        return stats
    tensors = [g for _, g in present]
    highest = torch.stack(torch._foreach_norm(tensors, float("inf")))
    if not bool(torch.isfinite(highest).all()):  # (a NaN/Inf entry: the exact path)
        for i, g in present:
            stats[i] = _grad_stats(g).to(stats.device)
        return stats
    norms = torch.stack(torch._foreach_norm(tensors))
    # Non-zeros per unit (the last axis; one unit for rank 0 or one column).
    counts, owner, deadable = [], [], []
    for k, (_, g) in enumerate(present):
        units = g.shape[-1] if g.dim() and g.shape[-1] >= 2 else 1
        counts.append(torch.count_nonzero(g.reshape(-1, units), dim=0))
        owner += [k] * units
        deadable += [units >= 2] * units
    counts = torch.cat(counts)
    owner_t = torch.tensor(owner, device=counts.device)
    nonzero = torch.zeros(len(present), device=counts.device).index_add_(
        0, owner_t, counts.float())
    dead = torch.zeros(len(present), device=counts.device).index_add_(
        0, owner_t, ((counts == 0) & torch.tensor(deadable, device=counts.device)).float())
    sizes = torch.tensor([float(g.numel()) for g in tensors], device=counts.device)
    rows = torch.stack([norms.float(), highest.float(), (sizes - nonzero) / sizes,
                        torch.zeros_like(sizes), dead], dim=1)
    stats[[i for i, _ in present]] = rows.to(stats.device)
    return stats


def _nonfinite_flags(grads: list[Any], device: Any) -> Any:
    """1 per gradient holding a NaN/Inf: the max-norm of each (one fused op) is
    NaN/Inf exactly when some entry is."""
    present = [(i, g) for i, g in enumerate(grads) if g is not None and g.numel()]
    flags = torch.zeros(len(grads), device=device)
    if present:
        norms = torch._foreach_norm([g for _, g in present], float("inf"))
        bad = (~torch.isfinite(torch.stack(norms))).float()
        flags[[i for i, _ in present]] = bad.to(flags.device)
    return flags


def _grad_stats(g: Any) -> Any:
    """norm, max |g| (both over the finite entries), zero fraction, NaN/Inf count
    and dead units (units of the last axis whose gradient is exactly zero)."""
    size = g.numel()
    if not size:
        return torch.zeros(len(GRAD_STATS), device=g.device)
    finite = torch.isfinite(g)
    clean = torch.where(finite, g, torch.zeros_like(g))
    zero = g == 0
    out = [torch.linalg.vector_norm(clean), clean.abs().amax(),
           zero.sum() / size, size - finite.sum()]
    units = g.shape[-1] if g.dim() else 1
    if g.dim() and units >= 2:
        out.append(zero.reshape(-1, units).all(dim=0).sum())
    else:
        out.append(torch.zeros((), device=g.device))
    return torch.stack([o.float() for o in out])


def make_train_function(model: Any, probe: StepProbe) -> tuple[Callable, Callable]:
    """A fresh train function of `model` (Keras' own, built by
    `make_train_function(force=True)`; eager, also where the model compiles
    with `jit_compile=True`) and the reader of the status the probe records.
    The model's own train function is put back.

    Returns:
        `(function, read_status)`.
    """
    own, jit = model.train_function, model.jit_compile
    if jit:
        warnings.warn("gradprobe: with jit_compile=True on PyTorch, the GradientMonitor runs "
                      "the monitored train steps eagerly (torch.compile does not trace its "
                      "hooks); the gradients are the same.", RuntimeWarning, stacklevel=2)
    try:
        model.jit_compile = False
        model.make_train_function(force=True)
        function = model.train_function
    finally:
        model.train_function = own
        model.jit_compile = jit
    return function, probe.read_status
