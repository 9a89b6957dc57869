"""The GradientMonitor's JAX train-step and optimizer hooks (the
backend-neutral half, the callback, is `gradprobe.monitor.callback`; the
TensorFlow hooks are in `gradprobe.backends.tensorflow_monitor`).

Keras' JAX train step is a pure function `(state, data) -> (logs, state)`,
jitted (or run eagerly with `run_eagerly=True` / `jit_compile=False`), that
computes the gradients with `jax.value_and_grad` and applies them with
`optimizer.stateless_apply`; `fit` runs `steps_per_execution` of them per call
of the train function, in a Python loop. The monitor's train function is a
fresh one of Keras' own (`make_train_function(force=True)`) built with:

- the model's `train_step` wrapped: the step's statistics, computed inside the
  (jitted) step, leave it as one extra output (one small array: no host
  callback, no sync), taken off the logs before Keras sees them;
- each step of the multi-step loop wrapped on the host: it numbers the step and
  keeps its record (a device array) until the callback reads the status after
  the execution; steps that are not recorded (`every`) run a second jitted
  version of the step that computes only the NaN/Inf test (one max-abs
  reduction per gradient).

While the train step is traced or run (through `gradprobe.core._patch`, for the
duration of each call of the monitor's function, removed in `finally`):

- `stateless_apply` of the model's optimizer: whether the step is applied
  (a `LossScaleOptimizer` whose scaled gradients overflowed, gradient
  accumulation), the loss scale, and the size of each update (the variables'
  values before and after);
- the update step of the optimizer: the gradients exactly as applied (after
  unscaling, accumulation and clipping). Under a `LossScaleOptimizer` the inner
  optimizer applies them inside `lax.cond`, out of reach: there they are the
  step's gradients unscaled and clipped as the inner optimizer clips them (the
  same values; gradient accumulation inside a `LossScaleOptimizer` is refused).

- with `activations=True`, `call` of the selected layers: each output passes
  through an identity with a custom gradient (`jax.custom_vjp`) whose backward
  rule computes the statistics of the gradient of the loss w.r.t. the output,
  in the step's own backward pass, and hands them to the host with
  `jax.debug.callback`, tagged with the step's number (an input of the recorded
  step); the callback waits for them (`jax.effects_barrier`) before reading.

With `replay=True`, `stateless_apply` returns the old trainable and optimizer
variables where any gradient is not finite (`jnp.where`, in the jitted step;
`Skip.NONFINITE`), and the host step keeps a reference to each step's batch
(`StepProbe.handed_batch`) for the callback's replay.

Keras' NNX mode calls the class's `train_step`, not the instance's: refused.
Imported only when the Keras backend is JAX.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from gradprobe.backends import _keras_private
from gradprobe.backends._monitor_host import (  # noqa: F401 - the hooks' interface
    ITERATION_SPLIT,
    EventWriter,
    Records,
    applying_optimizer,
    build_model,
    check_options,
    loss_scaler,
)
from gradprobe.core import _patch
from gradprobe.errors import GradprobeError
from gradprobe.monitor.layout import ACT_STATS, GRAD_STATS, Skip, Status, StatusLayout

STATUS_KEY = "_gradprobe_monitor_status"
# With replay=True the batch is not in the logs (the train function returns
# `(logs, state)`): the callback takes it from `StepProbe.handed_batch`.
BATCH_KEY = None
# What a call of the train function raises where the data runs out.
END_OF_DATA = (StopIteration,)
SummaryWriter = EventWriter




def is_distributed(model: Any) -> bool:
    """Whether a `keras.distribution` (the step runs over several devices) is set."""
    return keras.distribution.distribution() is not None


def unbatch(batch: Any) -> Any:
    """The batch kept by `StepProbe.handed_batch`, as the train step received it."""
    return batch



def _index_of(items: list[Any], item: Any) -> int | None:
    return next((i for i, x in enumerate(items) if x is item), None)


class StepProbe:
    """The monitor's hooks of one model and optimizer, and the host-side record.

    Args:
        model: The compiled model.
        variables: The monitored trainable variables (forward order).
        layers: The `(path, layer)` pairs whose activation gradients are recorded.
        every: Statistics are computed on steps that are multiples of `every`.
        histograms: Keep a copy of the last recorded step's gradients.
        replay: A step with a NaN/Inf gradient is not applied (`Skip.NONFINITE`:
            the new trainable and optimizer variables are the old ones where any
            gradient is not finite, in the jitted step) and the step's batch is
            kept (a reference; `handed_batch`), so that the callback can replay
            it on the weights it started from.
    """

    def __init__(self, model: Any, variables: list[Any], layers: list[tuple[str, Any]],
                 every: int, histograms: bool, replay: bool = False):
        if getattr(keras.config, "is_nnx_enabled", lambda: False)():
            raise GradprobeError("GradientMonitor does not run with Keras' NNX mode on JAX (its "
                                 "train step is called on the class, out of the monitor's "
                                 "reach). Received: keras.config.is_nnx_enabled()=True.")
        self.model = model
        self.optimizer = model.optimizer
        self.scaler = loss_scaler(self.optimizer)
        self.applier = applying_optimizer(self.optimizer)
        self.accumulation = int(getattr(self.applier, "gradient_accumulation_steps", None) or 0)
        if self.scaler is not None and self.accumulation:
            raise GradprobeError(
                "GradientMonitor on JAX does not record gradient accumulation inside a "
                "LossScaleOptimizer yet. Received: LossScaleOptimizer(inner_optimizer with "
                f"gradient_accumulation_steps={self.accumulation}). Use the TensorFlow or "
                "PyTorch backend, or leave out one of the two.")
        self.variables = variables
        self.layers = layers
        self.every = int(every)
        self.histograms = bool(histograms)
        self.replay = bool(replay)
        self._batch: Any = None
        self.slots = max(int(model.steps_per_execution or 1), 1)
        self.layout = StatusLayout(len(variables), len(layers), self.slots)
        self.records = Records(self.layout)
        self.records.step = self.records.iterations = self.iterations()
        # Where each monitored variable sits in the list `stateless_apply` takes.
        order = list(_keras_private.optimizer_default_variables(self.optimizer) or [])
        self._positions = [_index_of(order, v) for v in variables]
        optimizer_variables = list(self.optimizer.variables)
        self._iter_index = _index_of(optimizer_variables,
                                     _keras_private.optimizer_raw_iterations(self.applier))
        self._scale_index = (None if self.scaler is None else
                             _index_of(optimizer_variables, self.scaler.dynamic_scale))
        self._cell: dict[str, Any] | None = None
        self._copies: list[Any] = []
        # step -> {layer index: ACT_STATS}, filled by the backward rules' callbacks.
        self._acts: dict[int, dict[int, np.ndarray]] = {}

    # ------------------------------------------------------------ install
    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The wrappers, in place for one call of the train function (where a
        step is traced, and where it runs eagerly)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patch.wrapped_methods(
                self.optimizer, {"stateless_apply": self._wrap_stateless_apply}))
            if self.scaler is None:
                stack.enter_context(_patch.wrapped_methods(
                    self.applier, _keras_private.optimizer_update_step_wrapper(self._wrap_update)))
            if self.layers:
                stack.enter_context(_patch.wrapped_calls(
                    [layer for _, layer in self.layers], self._activation_hook))
            yield

    # ------------------------------------------------------------ in the step
    def wrap_train_step(self, recording: bool) -> Callable[[Callable], Callable]:
        """The wrapper of the model's `train_step`, for the recorded steps
        (`recording=True`: all statistics) or the others (the NaN/Inf test)."""
        def make(original: Callable) -> Callable:
            def train_step(state: Any, data: Any) -> Any:
                cell: dict[str, Any] = {"recording": recording}
                if recording and self.layers:
                    # (the recorded step takes its number, for the activation statistics)
                    data, cell["number"] = data
                    cell["scale"] = self._state_scale(state)
                previous, self._cell = self._cell, cell
                try:
                    logs, new_state = original(state, data)
                finally:
                    self._cell = previous
                if not isinstance(logs, dict):
                    return logs, new_state  # a custom train_step: its steps are unseen
                copies = cell.get("grads") if recording and self.histograms else None
                # One array per step (one copy to the host): the record, then the
                # iteration count as two float32 values, exact.
                count = self._iterations_in(new_state)
                tail = (jnp.array([-1.0, 0.0], jnp.float32) if count is None else
                        jnp.stack([count // ITERATION_SPLIT,
                                   count % ITERATION_SPLIT]).astype(jnp.float32))
                status = (jnp.concatenate([self._record(cell), tail]), copies)
                return {**logs, STATUS_KEY: status}, new_state

            return train_step

        return make

    def _state_scale(self, state: Any) -> Any:
        """The loss scale in the train step's state (1.0 without loss scaling)."""
        if self._scale_index is None:
            return jnp.float32(1.0)
        return jnp.asarray(state[2][self._scale_index], jnp.float32)

    def _activation_hook(self, layer: Any, outputs: Any, args: tuple = (),
                         kwargs: dict | None = None) -> Any:
        cell = self._cell
        if (cell is None or "number" not in cell or not isinstance(outputs, jax.Array)
                or not jnp.issubdtype(outputs.dtype, jnp.floating)):
            return outputs
        index = next(i for i, (_, lay) in enumerate(self.layers) if lay is layer)
        return _observe(self._receive, index)(outputs, cell["number"], cell["scale"])

    def _receive(self, number: Any, index: Any, stats: Any) -> None:
        """On the host: the activation statistics of layer `index` at step `number`."""
        self._acts.setdefault(int(number), {})[int(index)] = np.asarray(stats, np.float64)

    def _iterations_in(self, state: Any) -> Any:
        """The applying optimizer's iteration count in the train step's new state
        (`(trainable, non_trainable, optimizer, metrics)` variables), or None."""
        try:
            return jnp.asarray(state[2][self._iter_index]).astype(jnp.int32)
        except (TypeError, IndexError, KeyError):
            return None

    def _mine(self, values: list[Any]) -> list[Any]:
        """The entries of `values` (in `stateless_apply`'s order) of the monitored variables."""
        return [None if p is None or p >= len(values) else values[p] for p in self._positions]

    def _wrap_stateless_apply(self, original: Callable) -> Callable:
        def stateless_apply(optimizer_variables: Any, grads: Any,
                            trainable_variables: Any) -> Any:
            cell = self._cell
            if cell is None:  # not a step of the monitor's train function
                return original(optimizer_variables, grads, trainable_variables)
            cell["applied"] = True
            grads, opt_values = list(grads), list(optimizer_variables)
            code = jnp.float32(Skip.APPLIED)
            if self.scaler is not None:
                scale = jnp.asarray(opt_values[self._scale_index], jnp.float32)
                present = [g for g in grads if g is not None]
                finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in present])) \
                    if present else jnp.bool_(True)
                code = jnp.where(finite, code, jnp.float32(Skip.OVERFLOW))
                unscaled = [None if g is None else g.astype(jnp.float32) / scale for g in grads]
                # As the inner optimizer applies them (its clipping); where the
                # scaled gradients overflowed, the unscaled ones (not applied).
                clipped = _keras_private.optimizer_clip_gradients(
                    self.applier, [g for g in unscaled if g is not None])
                it = iter(clipped)
                applied = [None if u is None else jnp.where(finite, next(it), u)
                           for u in unscaled]
                cell["grads"] = self._mine(applied)
                cell["scale"] = scale
            if self.accumulation:
                iterations = jnp.asarray(opt_values[self._iter_index])
                update = (iterations + 1) % self.accumulation == 0
                code = jnp.where(update, code, jnp.float32(Skip.ACCUMULATED))
            if self.replay:  # (GradientMonitor refuses loss scaling and accumulation here)
                present = [g for g in grads if g is not None and jnp.size(g)]
                finite = jnp.isfinite(jnp.max(jnp.stack(
                    [jnp.max(jnp.abs(g)).astype(jnp.float32) for g in present]))) \
                    if present else jnp.bool_(True)
                code = jnp.where(finite, code, jnp.float32(Skip.NONFINITE))
            cell["code"] = code
            new_trainable, new_optimizer = original(optimizer_variables, grads,
                                                    trainable_variables)
            if self.replay:
                # A non-finite step is not applied: the weights and the optimizer's
                # variables (its iteration count too) stay as the step found them.
                new_trainable = [jnp.where(finite, new, old) for new, old in
                                 zip(new_trainable, trainable_variables)]
                new_optimizer = [jnp.where(finite, new, old) for new, old in
                                 zip(new_optimizer, optimizer_variables)]
            if cell["recording"]:
                before, after = self._mine(list(trainable_variables)), self._mine(
                    list(new_trainable))
                cell["ratios"] = jnp.stack([
                    jnp.float32(0.0) if b is None or a is None else _ratio(b, a)
                    for b, a in zip(before, after)]) if self.variables else None
            return new_trainable, new_optimizer

        return stateless_apply

    def _wrap_update(self, original: Callable) -> Callable:
        def update(grads: Any, trainable_variables: Any, learning_rate: Any) -> Any:
            cell = self._cell
            if cell is not None:
                by_id = {id(v): g for g, v in zip(grads, trainable_variables)}
                cell["grads"] = [by_id.get(id(v)) for v in self.variables]
            return original(grads, trainable_variables, learning_rate)

        return update

    def _record(self, cell: dict[str, Any]) -> Any:
        """One step's record vector (see `_monitor_host.HEAD`)."""
        n = len(self.variables)
        grads = cell.get("grads")
        if grads is None:
            stats, flags = jnp.zeros((n, len(GRAD_STATS))), jnp.zeros(n)
        else:
            dense = [jnp.zeros(v.shape, jnp.float32) if g is None else
                     jnp.asarray(g).astype(jnp.float32) for g, v in zip(grads, self.variables)]
            if cell["recording"]:
                stats = jnp.stack([_grad_stats(g) for g in dense]) if n else \
                    jnp.zeros((0, len(GRAD_STATS)))
                flags = (stats[:, 3] > 0).astype(jnp.float32)
            else:
                stats = jnp.zeros((n, len(GRAD_STATS)))
                flags = jnp.stack([jnp.logical_not(jnp.isfinite(jnp.max(jnp.abs(g))))
                                   if g.size else jnp.bool_(False)
                                   for g in dense]).astype(jnp.float32) if n else jnp.zeros(0)
        ratios = cell.get("ratios")
        if ratios is None:
            ratios = jnp.zeros(n)
        head = jnp.stack([jnp.float32(1.0 if cell.get("applied") else 0.0),
                          jnp.float32(1.0 if grads is not None else 0.0),
                          jnp.asarray(cell.get("code", Skip.APPLIED), jnp.float32),
                          jnp.asarray(cell.get("scale", 1.0), jnp.float32)])
        return jnp.concatenate([head, flags.astype(jnp.float32),
                                stats.reshape(-1).astype(jnp.float32),
                                ratios.astype(jnp.float32),
                                jnp.zeros(len(self.layers) * len(ACT_STATS), jnp.float32)])

    # ------------------------------------------------------------ on the host
    def collect(self, recorded: Callable, plain: Callable) -> Callable:
        """The step Keras' multi-step loop calls: numbers the step, runs the
        recording or the plain version, takes the status off the logs."""
        def step(state: Any, data: Any) -> Any:
            number = self.records.step + 1
            if self.replay:
                self._batch = data  # a reference, for `handed_batch`
            if number % self.every == 0:
                if self.layers:
                    data = (data, jnp.asarray(number, jnp.int32))
                logs, state = recorded(state, data)
            else:
                logs, state = plain(state, data)
            status = None
            if isinstance(logs, dict) and STATUS_KEY in logs:
                logs = dict(logs)
                status = logs.pop(STATUS_KEY)
            if status is None:
                self.records.add(number, None)
            else:
                record, copies = status
                self.records.add(number, record)
                if copies is not None:
                    self._copies, self.records.copies_step = copies, number
            return logs, state

        return step

    def handed_batch(self) -> Any:
        """With `replay=True`: the batch of the last step run (then forgotten)."""
        batch, self._batch = self._batch, None
        return batch

    def iterations(self) -> int:
        """The applying optimizer's raw iteration count (the last one seen
        while `fit` holds the state outside the variables)."""
        value = _keras_private.jax_variable_value(
            _keras_private.optimizer_raw_iterations(self.applier))
        return self.records.iterations if value is None else int(np.asarray(value))

    def set_step(self, step: int) -> None:
        self.records.step = int(step)

    def read_status(self) -> Status:
        """The status after the steps run since the last read (host copy)."""
        if not self.layers:
            return self.records.status(np.asarray)
        steps = [step for step, _, _ in self.records.pending]
        if any(step % self.every == 0 for step in steps):
            jax.effects_barrier()  # the backward rules' callbacks have all run
        status = self.records.status(np.asarray)
        row_of = {step: step % self.slots for step in steps}
        for step, row in row_of.items():
            found = self._acts.pop(step, {})
            for i in range(len(self.layers)):
                status.acts[i, row, :] = found.get(i, np.zeros(len(ACT_STATS)))
        self.records.acts[:] = status.acts
        self._acts = {k: v for k, v in self._acts.items() if k > max(steps, default=0)}
        return status

    def unpack(self, status: Status) -> Status:
        return status

    def histogram_values(self) -> list[np.ndarray]:
        """The gradients of the step `Status.copies_step` (with `histograms=True`)."""
        return [np.zeros(tuple(v.shape), np.float32) if g is None else np.asarray(g, np.float32)
                for g, v in zip(self._copies, self.variables)]


def _observe(receive: Callable, index: int) -> Callable:
    """An identity `(x, number, scale) -> x` whose backward rule sends the
    statistics of the incoming gradient, unscaled by `scale`, to `receive(number,
    index, stats)` on the host."""
    @jax.custom_vjp
    def observe(x: Any, number: Any, scale: Any) -> Any:
        return x

    def forward(x: Any, number: Any, scale: Any) -> Any:
        return x, (number, scale)

    def backward(residuals: Any, dy: Any) -> Any:
        number, scale = residuals
        stats = _grad_stats(jnp.asarray(dy).astype(jnp.float32) / scale)[:len(ACT_STATS)]
        jax.debug.callback(receive, number, jnp.int32(index), stats)
        return dy, np.zeros(np.shape(number), jax.dtypes.float0), jnp.zeros_like(scale)

    observe.defvjp(forward, backward)
    return observe


def _ratio(before: Any, after: Any) -> Any:
    """||after - before|| / ||before|| (0 where ||before|| = 0)."""
    b = jnp.asarray(before).astype(jnp.float32)
    a = jnp.asarray(after).astype(jnp.float32)
    old = jnp.sum(b * b)
    delta = jnp.sum((a - b) ** 2)
    return jnp.where(old > 0, jnp.sqrt(delta / jnp.where(old > 0, old, 1.0)), 0.0)


def _grad_stats(g: Any) -> Any:
    """norm, max |g| (both over the finite entries), zero fraction, NaN/Inf count
    and dead units (units of the last axis whose gradient is exactly zero)."""
    size = g.size
    if not size:
        return jnp.zeros(len(GRAD_STATS), jnp.float32)
    finite = jnp.isfinite(g)
    clean = jnp.where(finite, g, 0.0)
    zero = g == 0
    units = g.shape[-1] if g.ndim else 1
    dead = (jnp.sum(jnp.all(zero.reshape(-1, units), axis=0)) if g.ndim and units >= 2
            else jnp.float32(0.0))
    return jnp.stack([jnp.sqrt(jnp.sum(clean * clean)), jnp.max(jnp.abs(clean)),
                      jnp.sum(zero) / size, size - jnp.sum(finite),
                      dead]).astype(jnp.float32)


def make_train_function(model: Any, probe: StepProbe) -> tuple[Callable, Callable]:
    """A fresh train function of `model` (Keras' own, built by
    `make_train_function(force=True)`: jitted or eager as the model compiles,
    `steps_per_execution` steps per call) whose steps hand the monitor their
    statistics, and the reader of the status. The model's own train function
    is put back.

    Returns:
        `(function, read_status)`; `function(state, iterator)` as Keras' own.
    """
    own = model.train_function
    steps: dict[str, Callable] = {}

    def capture(kind: str) -> Callable[[Callable], Callable]:
        def wrap(step_function: Callable) -> Callable:
            steps[kind] = step_function
            if kind == "recorded" and probe.every > 1:
                return step_function  # this function is not kept: only its step
            return probe.collect(steps["recorded"], steps.get("plain", step_function))

        return wrap

    try:
        kinds = [("recorded", True)] + ([("plain", False)] if probe.every > 1 else [])
        for kind, recording in kinds:
            with _patch.wrapped_methods(model, {
                    "train_step": probe.wrap_train_step(recording),
                    **_keras_private.jax_step_function_wrapper(capture(kind))}):
                model.make_train_function(force=True)
        function = model.train_function
    finally:
        model.train_function = own
    return function, probe.read_status



__all__ = ["BATCH_KEY", "END_OF_DATA", "STATUS_KEY", "StepProbe", "SummaryWriter",
           "build_model", "check_options", "is_distributed", "loss_scaler",
           "make_train_function", "unbatch"]
