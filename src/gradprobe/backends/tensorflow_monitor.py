"""The GradientMonitor's TensorFlow train-step and optimizer hooks: the
in-graph half of `gp.GradientMonitor` (`gradprobe.monitor.callback` is the
backend-neutral half: the Keras callback, its lifecycle and the sinks).

`StepProbe` owns the monitor's in-graph state (a few `tf.Variable`s) and the
wrappers that fill it while a train step runs:

- `apply` of the model's optimizer (public API; every train step calls it,
  through `apply_gradients`): advances the monitor's step counter and, where the
  optimizer may not apply the step (a `LossScaleOptimizer` whose scaled
  gradients overflowed, gradient accumulation), records that step itself.
- the all-reduce of the optimizer that applies the update (the inner optimizer
  of a `LossScaleOptimizer`): the gradients exactly as they are applied (after
  clipping, the all-reduce and loss-scale unscaling).
- the backend update step of that optimizer: the size of each update.
- `call` of the selected layers (with `activations=True`): the gradient of the
  loss w.r.t. each activation, in the step's own backward pass.

The all-reduce and the update step are private Keras methods: their names,
and the other private Keras attributes used here, come from
`gradprobe.backends._keras_private`. The wrappers are installed (through
`gradprobe.core._patch`) around EVERY call of the monitor's train function and
removed in `finally`, so every trace of the train step, including a retrace for a
new input signature, under `jit_compile` or in a later `fit`, contains them, and
eager steps (`run_eagerly=True`) run them each time.

What the callback uses: `StepProbe` (`installed`, `unpack`, `iterations`,
`set_step`, `histogram_values`, `layout`, `slots`), `make_train_function`,
`STATUS_KEY`, `END_OF_DATA`, `loss_scaler`, `build_model` (a model not built
when training starts) and `SummaryWriter` (TensorBoard).
Imported only when the Keras backend is TensorFlow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradprobe.backends import _keras_private
from gradprobe.backends._monitor_host import (  # noqa: F401 - the hooks' interface
    applying_optimizer,
    enter_optimizer_hooks,
    loss_scaler,
)
from gradprobe.core import _patch
from gradprobe.monitor.layout import ACT_STATS, GRAD_STATS, Skip, Status, StatusLayout

_CHECK = ["exact"]  # EXPERIMENT
STATUS_KEY = "_gradprobe_monitor_status"
# With replay=True: the step's batch, handed back beside the status.
BATCH_KEY = "_gradprobe_monitor_batch"
# What a call of the train function raises where the data runs out.
END_OF_DATA = (StopIteration, tf.errors.OutOfRangeError)



def is_distributed(model: Any) -> bool:
    strategy = model.distribute_strategy
    return strategy.num_replicas_in_sync > 1 or not isinstance(
        strategy, type(tf.distribute.get_strategy()))


class StepProbe:
    """The monitor's variables and the wrappers that fill them.

    Args:
        model: The compiled model.
        variables: The monitored trainable variables (forward order).
        layers: The `(path, layer)` pairs whose activation gradients are recorded.
        every: Statistics are computed on steps that are multiples of `every`.
        histograms: Keep a copy of the last recorded step's gradients.
        replay: A step with a NaN/Inf gradient is not applied (`Skip.NONFINITE`)
            and the train step hands back its batch (`BATCH_KEY`), so that the
            callback can replay it on the weights it started from.
    """

    def __init__(self, model: Any, variables: list[Any], layers: list[tuple[str, Any]],
                 every: int, histograms: bool, replay: bool = False):
        self.model = model
        self.replay = bool(replay)
        self.optimizer = model.optimizer
        self.scaler = loss_scaler(self.optimizer)
        self.applier = applying_optimizer(self.optimizer)
        self.accumulation = int(getattr(self.applier, "gradient_accumulation_steps", None) or 0)
        self.variables = variables
        self.layers = layers
        self.every = int(every)
        # While a version of the train function is traced: True (it records
        # every step it runs), False (it records none), None (one function:
        # a cond per step decides).
        self.mode: bool | None = None
        self.host_step = self.iterations()  # the last step number the host read
        self.expected: int | None = None  # the step number the last call should end at
        self.foresee = True  # whether each call has run one step, as expected
        self.slots = max(int(model.steps_per_execution or 1), 1)
        self.distributed = is_distributed(model)
        # `jit_compile` is public; "auto" is resolved by `compile` (False on CPU).
        self.jit = bool(getattr(model, "jit_compile", False))
        self.layout = StatusLayout(len(variables), len(layers), self.slots)
        n, k = len(variables), self.slots
        with model.distribute_strategy.scope():
            kw = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_WRITE,
                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

            def var(value: Any, dtype: Any = tf.float32) -> tf.Variable:
                return tf.Variable(tf.cast(value, dtype), **kw)

            self.step = var(self.iterations(), tf.int64)
            # The number of the train step running (set by the train-step wrapper;
            # not under a strategy).
            self.begun = var(self.iterations(), tf.int64)
            self.copies_step = var(-1, tf.int64)
            self.slot_step = var(tf.fill([k], -1.0), tf.float64)
            self.proof = var(tf.fill([k], -1.0), tf.float64)
            self.skipped = var(tf.zeros([k]))
            self.loss_scale = var(tf.ones([k]))
            self.flags = var(tf.zeros([k, n]))
            self.stats = var(tf.zeros([k, n, len(GRAD_STATS)]))
            self.ratios = var(tf.zeros([k, n]))
            self.acts = [var(tf.zeros([k, len(ACT_STATS)])) for _ in layers]
            self.copies = ([var(tf.zeros(v.shape)) for v in variables] if histograms else [])
        self._index = {id(_value(v)): i for i, v in enumerate(variables)}

    # ------------------------------------------------------------ install
    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The wrappers, in place for one call of the train function."""
        # The private all-reduce and update step of the applying optimizer.
        applier_hooks = _keras_private.optimizer_update_wrappers(
            all_reduce=self._wrap_all_reduce, update=self._wrap_update)
        with contextlib.ExitStack() as stack:
            enter_optimizer_hooks(stack, self.optimizer, self.applier, self._wrap_apply,
                                  applier_hooks)
            if self.layers:
                stack.enter_context(_patch.wrapped_calls(
                    [layer for _, layer in self.layers], self._activation_hook))
            yield

    # ------------------------------------------------------------ in-graph
    def _slot(self, step: Any) -> Any:
        return tf.cast(step % self.slots, tf.int32)

    def _put(self, var: Any, slot: Any, value: Any) -> Any:
        """Writes `value` into row `slot` of `var` (as one assign of the whole
        variable: a write to a mirrored variable may not sit inside a cond)."""
        value = tf.cast(value, var.dtype)
        if self.slots == 1:
            new = tf.expand_dims(value, 0)
        else:
            new = tf.tensor_scatter_nd_update(tf.convert_to_tensor(var), [[slot]], [value])
        return var.assign(new)

    def _put_if(self, cond: Any, var: Any, slot: Any, make: Callable[[], Any]) -> Any:
        """Writes `make()` into row `slot` of `var` where `cond` holds (no op at
        all where `cond` is Python False: returns None)."""
        if cond is False:
            return None
        current = tf.convert_to_tensor(var)

        def write() -> Any:
            value = tf.cast(make(), var.dtype)
            if self.slots == 1:
                return tf.expand_dims(value, 0)
            return tf.tensor_scatter_nd_update(current, [[slot]], [value])

        return var.assign(_cond(cond, write, lambda: current))

    def current_scale(self) -> Any:
        """The loss scale of this step's loss, as `LossScaleOptimizer.scale_loss`
        chose it (1 without loss scaling)."""
        if self.scaler is None:
            return tf.constant(1.0)
        return tf.cast(tf.convert_to_tensor(self.scaler.dynamic_scale) if self.scaler.built
                       else self.scaler.initial_scale, tf.float32)

    def _recording(self, step: Any) -> Any:
        """Whether `step` is recorded: Python True with `every=1`, the mode of the
        function being traced where the train function comes in two versions
        (`make_train_function`; then no cond is built), otherwise a boolean tensor."""
        if self.every == 1:
            return True
        if self.mode is not None:
            return self.mode
        return tf.equal(step % self.every, 0)

    def _proof(self, step: Any) -> Any:
        """The proof that `step` was seen, as the all-reduce writes it: the step's
        number; in the version of the train function that does not record, -1
        for a step that should have been recorded (one whose number the host did
        not foresee: the callback then reports it unseen, never stale numbers)."""
        proof = tf.cast(step, tf.float64)
        if self.mode is False:
            proof = tf.where(tf.equal(step % self.every, 0), tf.constant(-1.0, tf.float64),
                             proof)
        return proof

    def _mine(self, grads_and_vars: Any) -> list[Any]:
        """The gradients of the monitored variables, in their order (zeros where
        the optimizer received none)."""
        by_id = {id(_value(v)): g for g, v in grads_and_vars}
        return [by_id.get(id(_value(v))) for v in self.variables]

    def _nonfinite_flags(self, grads: list[Any]) -> Any:
        """1 where a gradient has a NaN/Inf entry, per gradient (0 for None),
        from all gradients as one vector (a few ops, whatever their number)."""
        present = [(i, g.values if isinstance(g, tf.IndexedSlices) else g)
                   for i, g in enumerate(grads) if g is not None]
        if not present:
            return tf.zeros([len(grads)])
        flat, segments = _flat([v for _, v in present])
        bad = tf.math.unsorted_segment_sum(
            tf.cast(tf.logical_not(tf.math.is_finite(flat)), tf.float32), segments, len(present))
        flags = tf.cast(bad > 0, tf.float32)
        if len(present) == len(grads):
            return flags
        return tf.scatter_nd([[i] for i, _ in present], flags, [len(grads)])

    def _nonfinite_check(self, grads: list[Any]) -> Any:
        """`_nonfinite_flags(grads)`, made cheap for the steps that are not
        recorded (where every gradient is finite, as usual): one sum per gradient
        and one scalar test. A sum is NaN/Inf when any entry is; it may also
        overflow when none is, so where the total is not finite the exact
        per-variable check decides (inside a cond: skipped on the usual path)."""
        present = [(g.values if isinstance(g, tf.IndexedSlices) else g) for g in grads
                   if g is not None]
        if not present:
            return tf.zeros([len(grads)])
        total = tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32)) for v in present])
        return tf.cond(tf.math.is_finite(total), lambda: tf.zeros([len(grads)]),
                       lambda: self._nonfinite_flags(grads))

    def _grad_stats(self, grads: list[Any], reads: dict[int, list[Any]] | None = None) -> Any:
        # (a densified IndexedSlices may have lost its static shape: the variable's)
        dense = [tf.zeros(v.shape, tf.float32) if g is None else
                 tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float32), v.shape)
                 for g, v in zip(grads, self.variables)]
        if not dense:
            return tf.zeros([0, len(GRAD_STATS)])
        # The usual case, every gradient finite, in few elementwise passes; a
        # sum of squares is NaN/Inf when any entry is (or overflows): then the
        # exact statistics over the finite entries, inside a cond. The exact
        # branch works on all gradients as one vector (a few dozen ops, not a
        # dozen per gradient): the branch not taken still costs the executor
        # a step per op, at every step.
        fast, sumsq = _finite_stats(dense, reads)
        finite = tf.reduce_all(tf.math.is_finite(sumsq))
        return tf.cond(finite, lambda: fast, lambda: _exact_stats(dense))

    def _wrap_apply(self, original: Callable) -> Callable:
        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            grads = list(grads)
            step = tf.convert_to_tensor(self.step) + 1
            slot = self._slot(step)
            advance = [self.step.assign(step), self._put(self.slot_step, slot, step)]
            if self.replay:
                return self._apply_if_finite(original, grads, trainable_variables, step, slot,
                                             advance)
            if self.scaler is None and not self.accumulation:
                # No control dependency of the update on these writes: the
                # hooks' reads of the counter come after its write anyway (a
                # tf.function runs the ops of one variable in program order), and
                # a dependency of every op of the update on them cost more than
                # all the rest of the checking version.
                return original(grads, trainable_variables)
            pairs = zip(grads, trainable_variables if trainable_variables is not None
                        else _keras_private.optimizer_default_variables(self.optimizer))
            mine = self._mine(pairs)
            scale = self.current_scale()
            applied = tf.constant(True)
            code = tf.constant(float(Skip.APPLIED))
            if self.scaler is not None:
                finite = tf.reduce_all(tf.stack(
                    [tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(g)))
                     for g in grads if g is not None] or [tf.constant(True)]))
                applied = finite
                code = tf.where(finite, code, float(Skip.OVERFLOW))
            if self.accumulation:
                update = tf.equal((self._raw_iterations() + 1) % self.accumulation, 0)
                code = tf.where(applied & ~update, float(Skip.ACCUMULATED), code)
                applied = applied & update
            unscaled = [None if g is None else tf.cast(tf.convert_to_tensor(g), tf.float32) / scale
                        for g in mine]
            skipped = tf.logical_not(applied)
            writes = advance + self._step_writes(step, slot, code, scale, skipped, unscaled)
            with tf.control_dependencies(writes):
                return original(grads, trainable_variables)

        return apply

    def _step_writes(self, step: Any, slot: Any, code: Any, scale: Any, skipped: Any,
                     unscaled: list[Any]) -> list[Any]:
        """The writes of `apply` for a step's `Skip` code and loss scale; a step
        the optimizer does not apply (`skipped`) is recorded here: its flags,
        its statistics on a recorded step, no update, its proof."""
        recording = self._recording(step)
        writes = [
            self._put(self.skipped, slot, code),
            self._put(self.loss_scale, slot, scale),
            self._put_if(skipped, self.flags, slot, lambda: self._nonfinite_flags(unscaled)),
            self._put_if(False if recording is False else skipped & recording, self.stats,
                         slot, lambda: self._grad_stats(unscaled)),
            self._put_if(skipped, self.ratios, slot, lambda: tf.zeros([len(self.variables)])),
            self._put_if(skipped, self.proof, slot, lambda: self._proof(step)),
        ]
        return [w for w in writes if w is not None]

    def _apply_if_finite(self, original: Callable, grads: list[Any], trainable_variables: Any,
                         step: Any, slot: Any, advance: list[Any]) -> Any:
        """`replay=True`: the update runs only where every gradient is finite; a
        step with a NaN/Inf gradient is recorded here (flags, statistics on a
        recorded step) and not applied, so the model keeps the weights the step
        started from. One sum per gradient decides (`_nonfinite_check`), as on
        the steps that are not recorded."""
        pairs = zip(grads, trainable_variables if trainable_variables is not None
                    else _keras_private.optimizer_default_variables(self.optimizer))
        mine = self._mine(pairs)
        present = [g for g in grads if g is not None]
        finite = tf.equal(tf.reduce_max(self._nonfinite_check(present)), 0.0) if present \
            else tf.constant(True)
        skipped = tf.logical_not(finite)
        unscaled = [None if g is None else tf.cast(tf.convert_to_tensor(g), tf.float32)
                    for g in mine]
        code = tf.where(finite, float(Skip.APPLIED), float(Skip.NONFINITE))
        writes = advance + self._step_writes(step, slot, code, tf.constant(1.0), skipped,
                                             unscaled)

        def apply() -> Any:
            original(grads, trainable_variables)
            return tf.constant(True)

        with tf.control_dependencies(writes):
            return tf.cond(finite, apply, lambda: tf.constant(False))

    def _wrap_all_reduce(self, original: Callable) -> Callable:
        def all_reduce(grads_and_vars: Any) -> Any:
            reduced = list(original(grads_and_vars))
            grads = self._mine(reduced)
            step = tf.convert_to_tensor(self.step)
            slot, recording = self._slot(step), self._recording(step)
            current = None if recording is False else tf.convert_to_tensor(self.stats)

            def record() -> Any:  # the statistics include the NaN/Inf counts
                stats = self._grad_stats(grads)
                row = tf.expand_dims(stats, 0) if self.slots == 1 else \
                    tf.tensor_scatter_nd_update(current, [[slot]], [stats])
                return row, tf.cast(stats[:, 3] > 0, tf.float32)

            def check() -> Any:  # the other steps: NaN/Inf flags only
                if self.replay:  # checked by `_apply_if_finite`: this update runs if finite
                    return current, tf.zeros([len(self.variables)])
                return current, self._nonfinite_check(grads)

            if isinstance(recording, bool) and not (self.replay or self.copies or
                                                    self.distributed) and self.slots == 1:
                return self._gated(reduced, grads, step, slot, recording)
            stats, flags = _cond(recording, record, check)
            writes = [self._put(self.flags, slot, flags),
                      self._put(self.proof, slot, self._proof(step))]
            if recording is not False:  # (not a rewrite of the same numbers)
                writes.append(self.stats.assign(stats))
            for copy, g, v in zip(self.copies if recording is not False else [], grads,
                                  self.variables):
                dense = tf.zeros(v.shape) if g is None else tf.cast(tf.convert_to_tensor(g),
                                                                    tf.float32)
                current = tf.convert_to_tensor(copy)
                writes.append(copy.assign(_cond(recording, lambda d=dense: d,
                                                lambda c=current: c)))
            if self.copies and recording is not False:
                writes.append(self.copies_step.assign(tf.where(recording, step,
                                                               self.copies_step)))
            # The update starts once the statistics are made: a gradient that
            # the statistics still read when the optimizer's ops run cannot be
            # updated in place by them (TensorFlow then allocates a new buffer
            # per op: most of the monitor's cost on CPU, before).
            with tf.control_dependencies(writes):
                return [(_identity(g), v) for g, v in reduced]

        return all_reduce

    def _gated(self, reduced: list[Any], grads: list[Any], step: Any, slot: Any,
               recording: bool) -> list[Any]:
        """The all-reduce's record where the mode is known when the step is traced
        (one row, no replay, no copies, no strategy): each gradient reaches the
        optimizer once the monitor's ops that read it have run, not after all
        of them, so that the updates overlap the rest of the backward pass as
        without the monitor (and still update their gradient's buffer in place).
        The checking version tests each gradient exactly (no sum that could
        overflow, so no cond holding all gradients)."""
        reads: dict[int, list[Any]] = {}
        if recording:
            stats = self._grad_stats(grads, reads)
            self.stats.assign(tf.expand_dims(stats, 0))
            flags = tf.cast(stats[:, 3] > 0, tf.float32)
        elif _CHECK[0] == "exact":
            for i, g in enumerate(grads):
                if g is not None:
                    values = g.values if isinstance(g, tf.IndexedSlices) else g
                    reads[i] = [tf.reduce_all(tf.math.is_finite(values))]
            tested = tf.stack([reads[i][0] if i in reads else tf.constant(True)
                               for i in range(len(grads))]) if grads else tf.ones([0], tf.bool)
            flags = tf.cast(tf.logical_not(tested), tf.float32)
        else:
            sums = []
            for i, g in enumerate(grads):
                if g is not None:
                    values = g.values if isinstance(g, tf.IndexedSlices) else g
                    reads[i] = [tf.reduce_sum(values)]
                    sums.append(reads[i][0])
            if _CHECK[0] == "sumnogate":
                reads = {}
            total = tf.reduce_all(tf.math.is_finite(tf.stack(sums))) if sums else tf.constant(True)
            flags = tf.cond(total, lambda: tf.zeros([len(grads)]),
                            lambda: self._nonfinite_flags(grads))
        self._put(self.flags, slot, flags)
        self._put(self.proof, slot, self._proof(step))
        by_id = {id(_value(v)): reads.get(i) for i, v in enumerate(self.variables)}
        out = []
        for g, v in reduced:
            gate = by_id.get(id(_value(v)))
            if not gate:
                out.append((g, v))
                continue
            with tf.control_dependencies(gate):
                out.append((_identity(g), v))
        return out

    def _wrap_update(self, original: Callable) -> Callable:
        def update(grads: Any, trainable_variables: Any, learning_rate: Any) -> Any:
            values = [_value(v) for v in trainable_variables]
            tracked = [i for i, v in enumerate(values) if id(v) in self._index]
            step = tf.convert_to_tensor(self.step)
            slot, recording = self._slot(step), self._recording(step)
            if recording is False:  # no ratios on this version's steps
                return original(grads, trainable_variables, learning_rate)
            if self.distributed or not _writes_through_assign(self.applier):
                return self._update_by_snapshots(original, grads, trainable_variables,
                                                 learning_rate, tracked, slot, recording)
            # ||delta w|| from the increments the optimizer applies (its public
            # `assign_add` / `assign_sub` / `assign`), ||w|| from the weights
            # before the update, summed BEFORE the update starts: a read of a
            # variable still alive when the optimizer writes it makes TensorFlow
            # copy the variable (a snapshot of every weight, used before, cost
            # more than all the statistics).
            olds = _cond(recording, lambda: _sums_of_squares(
                [tf.convert_to_tensor(values[i]) for i in tracked] or [tf.zeros(())]),
                lambda: tf.zeros([max(len(tracked), 1)]))
            increments: dict[int, list[Any]] = {}
            with tf.control_dependencies([olds]), _patch.wrapped_methods(
                    self.applier, self._increment_wrappers(increments)):
                result = original(grads, trainable_variables, learning_rate)

            def ratios() -> Any:
                if not tracked:
                    return tf.zeros([len(self.variables)])
                # (a variable the optimizer did not write: no change)
                deltas = [_dense_sum(increments.get(id(values[i]), []), values[i])
                          for i in tracked]
                out = tf.sqrt(tf.math.divide_no_nan(_sums_of_squares(deltas), olds))
                return self._scatter(out, [self._index[id(values[i])] for i in tracked])

            with tf.control_dependencies(tf.nest.flatten(result) if result is not None else []):
                self._put_if(recording, self.ratios, slot, ratios)
            return result

        return update

    def _increment_wrappers(self, increments: dict[int, list[Any]]) -> dict[str, Callable]:
        """Wrappers of the applying optimizer's `assign_add`, `assign_sub` and
        `assign` that collect, per monitored variable (by id), the change each
        call makes (`assign`: the new value minus the value read just before)."""
        index = self._index

        def wrap(sign: float | None) -> Callable[[Callable], Callable]:
            def make(original: Callable) -> Callable:
                def method(variable: Any, value: Any) -> Any:
                    key = id(_value(variable))
                    if key in index:
                        if sign is None:
                            old = tf.convert_to_tensor(_value(variable))
                            change = tf.cast(value, old.dtype) - old
                        else:
                            change = value if sign > 0 else _negate(value)
                        increments.setdefault(key, []).append(change)
                    return original(variable, value)
                return method
            return make

        return {"assign_add": wrap(1.0), "assign_sub": wrap(-1.0), "assign": wrap(None)}

    def _scatter(self, values: Any, where: list[int]) -> Any:
        """A vector over the monitored variables from `values` at `where` (0 elsewhere)."""
        if where == list(range(len(self.variables))):
            return values
        if not where:
            return tf.zeros([len(self.variables)])
        return tf.scatter_nd([[i] for i in where], values, [len(self.variables)])

    def _update_by_snapshots(self, original: Callable, grads: Any, trainable_variables: Any,
                             learning_rate: Any, tracked: list[int], slot: Any,
                             recording: Any) -> Any:
        """The update ratios from copies of the weights taken before the update
        (under a distribution strategy, whose update runs per replica on each
        replica's copy of a variable, and for an optimizer whose update step is
        not Keras' own, which may write the variables without its `assign`
        methods)."""
        values = [_value(v) for v in trainable_variables]
        # Snapshots on recorded steps only. XLA needs both branches shaped
        # alike; elsewhere the other branch holds one scalar per variable
        # (no full-size zeros written on the steps that are not recorded).
        if self.jit:
            skip = lambda: [tf.zeros_like(values[i]) for i in tracked] or [tf.zeros(())]  # noqa: E731
        else:
            skip = lambda: [tf.zeros((), values[i].dtype) for i in tracked] or [tf.zeros(())]  # noqa: E731
        before = _cond(recording,
                       lambda: [tf.identity(values[i]) for i in tracked] or [tf.zeros(())],
                       skip)
        result = original(grads, trainable_variables, learning_rate)

        def ratios() -> Any:
            deltas = [tf.cast(tf.convert_to_tensor(values[i]) - b, tf.float32)
                      for b, i in zip(before, tracked)]
            olds = [tf.cast(b, tf.float32) for b in before[:len(tracked)]]
            out = tf.sqrt(tf.math.divide_no_nan(_sums_of_squares(deltas),
                                                _sums_of_squares(olds)))
            return self._scatter(out, [self._index[id(values[i])] for i in tracked])

        with tf.control_dependencies(tf.nest.flatten(result) if result is not None else []):
            self._put_if(recording, self.ratios, slot, ratios)
        return result

    def _activation_hook(self, layer: Any, outputs: Any, args: tuple = (),
                         kwargs: dict | None = None) -> Any:
        if self.mode is False or not (isinstance(outputs, tf.Tensor)
                                      and outputs.dtype.is_floating):
            return outputs  # (the version of the train function that records nothing)
        index = next(i for i, (_, lay) in enumerate(self.layers) if lay is layer)
        var, probe = self.acts[index], self

        @tf.custom_gradient
        def observe(x: Any) -> Any:
            def grad(dy: Any) -> Any:
                # The optimizer's `apply` (which advances the counter) runs after
                # the backward pass: this step is the counter + 1.
                step = tf.convert_to_tensor(probe.step) + 1
                scale = probe.current_scale()
                write = probe._put_if(probe._recording(step), var, probe._slot(step),
                                      lambda: _grad_stats(tf.cast(dy, tf.float32) / scale))
                with tf.control_dependencies([write] if write is not None else []):
                    return tf.identity(dy)

            return tf.identity(x), grad

        return observe(outputs)

    # ------------------------------------------------------------ reading
    def _raw_iterations(self) -> Any:
        return _keras_private.optimizer_raw_iterations(self.applier)

    def pack(self) -> Any:
        """The whole state as one float64 vector, in `self.layout`'s order."""
        parts = [self.step, self._raw_iterations(), self.copies_step, self.slot_step,
                 self.proof, self.skipped, self.loss_scale, self.flags, self.stats,
                 self.ratios, *self.acts]
        return tf.concat([tf.reshape(tf.cast(_value(v), tf.float64), [-1]) for v in parts], 0)

    def set_step(self, step: int) -> None:
        self.step.assign(int(step))
        self.begun.assign(int(step))
        self.host_step = int(step)

    def begin_step(self) -> None:
        """At the start of each train step (with `end_step`): the number this step
        takes if it runs without `apply`."""
        self.begun.assign(tf.maximum(tf.convert_to_tensor(self.step),
                                     tf.convert_to_tensor(self.begun)) + 1)

    def end_step(self) -> None:
        """At the end of each train step: the step counter is at least the number
        of train steps run, so a step that ran without `apply` (its weights
        updated by hand) still takes its number, and the callback finds it
        missing, also inside a multi-step execution."""
        self.step.assign(tf.maximum(tf.convert_to_tensor(self.step),
                                    tf.convert_to_tensor(self.begun)))

    def iterations(self) -> int:
        """The applying optimizer's raw iteration count, now."""
        return int(self._raw_iterations().numpy())

    def unpack(self, status: Any) -> Status:
        """A status vector (from the train function's logs or `read_status`), named."""
        status = self.layout.unpack(status.numpy())
        if self.expected is not None and status.step != self.expected:
            self.foresee = False
        self.host_step, self.expected = status.step, None
        return status

    def histogram_values(self) -> list[np.ndarray]:
        """The gradients of the step `Status.copies_step` (with `histograms=True`)."""
        return [c.numpy() for c in self.copies]


def make_train_function(model: Any, probe: StepProbe) -> tuple[Callable, Callable]:
    """A fresh train function of `model` (Keras' own, built by
    `make_train_function(force=True)`) whose train step also returns the
    monitor's status, and a compiled reader of the status for where the step
    cannot return it. The model's own train function is put back.

    Returns:
        `(function, read_status)`; `function(iterator)` returns Keras' logs,
        possibly with the status under `STATUS_KEY`.
    """
    own = model.train_function
    # Relies on: `make_train_function(force=True)` building a new train function
    # from `self.train_step` (looked up then) and storing it in `train_function`.
    try:
        versions = [build_one(model, probe)]
        if probe.every > 1 and probe.slots == 1:
            versions.append(build_one(model, probe))
    finally:
        model.train_function = own
    if len(versions) == 1:
        return versions[0], tf.function(probe.pack, autograph=False)
    recorded, plain = versions

    def function(*args: Any) -> Any:
        # One step per call: the host knows its number (the last status read,
        # `StepProbe.host_step`), and runs the version that records it or the
        # one that only checks it. Each version is traced (and runs) with the
        # probe in its mode: no cond per step in either. A train step that
        # applies the optimizer more than once per call defeats the forecast
        # (`StepProbe.unpack`): from then on the recording version runs.
        number = probe.host_step + 1
        probe.mode = not probe.foresee or number % probe.every == 0
        try:
            logs = (recorded if probe.mode else plain)(*args)
        finally:
            probe.mode = None
        probe.expected = number
        return logs

    return function, tf.function(probe.pack, autograph=False)


def build_one(model: Any, probe: StepProbe) -> Callable:
    """A fresh train function of `model` whose train step returns the status."""
    if probe.distributed:
        # Under a strategy the per-replica outputs would be averaged: the
        # status is read from the variables after each step instead.
        model.make_train_function(force=True)
    else:
        with _patch.wrapped_methods(model, {"train_step": lambda original: _status_step(
                original, probe)}):
            model.make_train_function(force=True)
    return model.train_function


def _status_step(original: Callable, probe: StepProbe) -> Callable:
    def train_step(*args: Any, **kwargs: Any) -> Any:
        probe.begin_step()
        logs = original(*args, **kwargs)
        probe.end_step()
        if not isinstance(logs, dict):
            return logs  # a custom train_step: the status is read from the variables
        out = {**logs, STATUS_KEY: probe.pack()}
        if probe.replay and args:
            # the batch as the train step received it, by position (`unbatch`)
            items = args[0] if isinstance(args[0], tuple) else (args[0],)
            out[BATCH_KEY] = {str(i): tf.nest.map_structure(tf.identity, a)
                              for i, a in enumerate(items) if a is not None}
        return out

    return train_step


def unbatch(batch: dict[str, Any]) -> tuple:
    """The batch handed back under `BATCH_KEY`, as the train step received it."""
    size = max((int(k) for k in batch), default=-1) + 1
    items = tuple(batch.get(str(i)) for i in range(size))
    return items if size != 1 else items[0]


def _cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    """`tf.cond`, or the branch itself where `pred` is a Python bool."""
    if isinstance(pred, bool):
        return true_fn() if pred else false_fn()
    return tf.cond(pred, true_fn, false_fn)


def _value(v: Any) -> Any:
    return v.value if isinstance(v, keras.Variable) else v


def _identity(g: Any) -> Any:
    """`g` (a tensor, `IndexedSlices` or None) through an identity op (so that
    control dependencies of the enclosing block apply to its users)."""
    if g is None:
        return None
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(tf.identity(g.values), tf.identity(g.indices), g.dense_shape)
    return tf.identity(g)


def _negate(value: Any) -> Any:
    if isinstance(value, tf.IndexedSlices):
        return tf.IndexedSlices(-value.values, value.indices, value.dense_shape)
    return -tf.convert_to_tensor(value)


def _dense_sum(changes: list[Any], variable: Any) -> Any:
    """The total change of `variable` from its `changes` (tensors or
    `IndexedSlices`, whose repeated indices add up), dense, in float32."""
    if not changes:
        return tf.zeros(variable.shape, tf.float32)
    dense = [tf.reshape(tf.cast(tf.convert_to_tensor(c), tf.float32), variable.shape)
             for c in changes]
    return dense[0] if len(dense) == 1 else tf.add_n(dense)


def _writes_through_assign(optimizer: Any) -> bool:
    """Whether `optimizer`'s update step is Keras' own: Keras' optimizers write
    the model's variables only through the optimizer's public `assign`,
    `assign_add` and `assign_sub` (keras/src/optimizers/*.py), so the monitor
    can read each update's change there."""
    return all(getattr(type(optimizer), name).__module__.startswith("keras.")
               for name in ("update_step", "assign", "assign_add", "assign_sub"))


def _grad_stats(g: Any) -> Any:
    """norm, max |g|, zero fraction and NaN/Inf count (norm and max over the finite entries)."""
    return _stats_and_zero(g)[0]


def _stats_and_zero(g: Any) -> tuple[Any, Any]:
    """`_grad_stats(g)` and the boolean "exactly zero" tensor, each elementwise
    pass made once."""
    finite_mask = tf.math.is_finite(g)
    finite = tf.where(finite_mask, g, tf.zeros_like(g))
    zero = tf.equal(g, 0.0)
    size = tf.cast(tf.size(g), tf.float32)
    stats = tf.stack([
        tf.sqrt(tf.reduce_sum(tf.square(finite))),
        tf.reduce_max(tf.abs(finite)) if g.shape.num_elements() else tf.constant(0.0),
        tf.math.divide_no_nan(tf.reduce_sum(tf.cast(zero, tf.float32)), size),
        size - tf.reduce_sum(tf.cast(finite_mask, tf.float32)),
    ])
    return stats, zero


def _sums_of_squares(tensors: list[Any]) -> Any:
    """The sum of squares of each tensor, as one vector: `L2Loss` (sum(x**2) / 2)
    reads each tensor once and sums pairwise. (A dot product of the flattened
    tensor, used before, lost up to 1e-3 of a million-entry sum in float32.)"""
    if not tensors:
        return tf.zeros([0])
    return 2.0 * tf.stack([tf.nn.l2_loss(t) for t in tensors])


def _finite_stats(grads: list[Any], reads: dict[int, list[Any]] | None = None
                  ) -> tuple[Any, Any]:
    """The rows of `GRAD_STATS` of float32 gradients with static shapes, valid
    where every entry is finite (then `nonfinite` is 0), and their sums of
    squares (NaN/Inf where some entry is not finite).

    Per gradient only the passes that must see every entry run (sum of squares,
    max, min, the zero mask and its per-unit sum); everything after them works
    on one vector for all gradients at once, so the op count per gradient (the
    cost on CPU for models with many small variables) stays small.
    """
    n = len(grads)
    sizes = [int(g.shape.num_elements()) for g in grads]
    empty = tf.constant(0.0)
    squares = [tf.nn.l2_loss(g) if size else empty for g, size in zip(grads, sizes)]
    tops = [tf.reduce_max(g) if size else empty for g, size in zip(grads, sizes)]
    bottoms = [tf.reduce_min(g) if size else empty for g, size in zip(grads, sizes)]
    sumsq = 2.0 * tf.stack(squares)  # (as `_sums_of_squares`)
    highest, lowest = tf.stack(tops), tf.stack(bottoms)
    # Zeros per unit (last axis), concatenated over the gradients; `full` is
    # the count at which a unit is dead (-1: a gradient without units).
    per_unit, owner, full = [], [], []
    for i, (g, size) in enumerate(zip(grads, sizes)):
        if not size:
            continue
        zero = tf.cast(tf.equal(g, 0.0), tf.float32)
        rank, units = g.shape.rank, (g.shape[-1] if g.shape.rank else 1)
        if rank == 0 or units < 2:
            per_unit.append(tf.reshape(tf.reduce_sum(zero), [1]))
            owner.append(i)
            full.append(-1.0)
        else:
            per_unit.append(zero if rank == 1 else
                            tf.reduce_sum(zero, axis=list(range(rank - 1))))
            owner += [i] * units
            full += [float(size // units)] * units
        if reads is not None:
            reads[i] = [per_unit[-1]]
    if reads is not None:  # the ops that read each gradient
        for i in range(n):
            reads.setdefault(i, [])
            if sizes[i]:
                reads[i] += [squares[i], tops[i], bottoms[i]]
    if per_unit:
        counts, ids = tf.concat(per_unit, 0), tf.constant(owner, tf.int32)
        zeros = tf.math.unsorted_segment_sum(counts, ids, n)
        dead = tf.math.unsorted_segment_sum(
            tf.cast(tf.equal(counts, tf.constant(full)), tf.float32), ids, n)
    else:
        zeros = dead = tf.zeros([n])
    rows = tf.stack([tf.sqrt(sumsq), tf.maximum(highest, -lowest),
                     tf.math.divide_no_nan(zeros, tf.constant(sizes, tf.float32)),
                     tf.zeros([n]), dead], axis=1)
    return rows, sumsq


def _flat(tensors: list[Any]) -> tuple[Any, Any]:
    """The tensors as one float32 vector, and each entry's tensor index."""
    flat = tf.concat([tf.reshape(tf.cast(t, tf.float32), [-1]) for t in tensors], 0)
    sizes = tf.stack([tf.size(t, out_type=tf.int32) for t in tensors])
    return flat, tf.repeat(tf.range(len(tensors), dtype=tf.int32), sizes)


def _exact_stats(grads: list[Any]) -> Any:
    """The rows of `GRAD_STATS` of float32 gradients with static shapes, over
    their finite entries (norm, max |g|), and their NaN/Inf counts: all
    gradients as one vector, reduced by segment (sums of squares in float64)."""
    n = len(grads)
    flat, segments = _flat(grads)
    finite = tf.math.is_finite(flat)
    clean = tf.where(finite, flat, tf.zeros_like(flat))
    sumsq = tf.math.unsorted_segment_sum(tf.square(tf.cast(clean, tf.float64)), segments, n)
    highest = tf.maximum(tf.math.unsorted_segment_max(tf.abs(clean), segments, n), 0.0)
    zero = tf.cast(tf.equal(flat, 0.0), tf.float32)
    zeros = tf.math.unsorted_segment_sum(zero, segments, n)
    bad = tf.math.unsorted_segment_sum(tf.cast(tf.logical_not(finite), tf.float32), segments, n)
    # Dead units: entry j of gradient i (row-major) belongs to unit
    # first_unit[i] + (j - start[i]) % units[i] (units: the last axis; one
    # never-dead unit for a gradient of rank 0 or of one column).
    sizes = [int(g.shape.num_elements()) for g in grads]
    units = [int(g.shape[-1]) if g.shape.rank and g.shape[-1] >= 2 else 1 for g in grads]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    first_unit = np.concatenate([[0], np.cumsum(units)[:-1]]).astype(np.int32)
    full = np.concatenate([np.full(u, size // u if u > 1 else -1, np.float32)
                           for size, u in zip(sizes, units)])
    owner = np.repeat(np.arange(n, dtype=np.int32), units)
    position = tf.range(tf.shape(flat)[0], dtype=tf.int32)
    unit = tf.gather(tf.constant(first_unit), segments) + tf.math.floormod(
        position - tf.gather(tf.constant(starts), segments),
        tf.gather(tf.constant(np.array(units, np.int32)), segments))
    per_unit = tf.math.unsorted_segment_sum(zero, unit, int(sum(units)))
    dead = tf.math.unsorted_segment_sum(
        tf.cast(tf.equal(per_unit, tf.constant(full)), tf.float32), tf.constant(owner), n)
    return tf.stack([tf.cast(tf.sqrt(sumsq), tf.float32), highest,
                     tf.math.divide_no_nan(zeros, tf.constant(sizes, tf.float32)), bad, dead],
                    axis=1)


def build_model(model: Any, iterator: Any) -> None:
    """Builds a model that is not built yet (a subclassed or `Sequential` model
    never called) from the shapes and dtypes of the batches `iterator` (the one
    `fit` hands its train function) yields, without taking a batch from it: as
    Keras' `fit` builds a model under a distribution strategy.

    Raises:
        GradprobeError: Where the model cannot be built so, with the fix (call
            the model once on a batch before `fit`).
    """
    from gradprobe.errors import GradprobeError

    spec = getattr(iterator, "element_spec", None)
    fix = (f"Call the model once on a batch (model(x[:1])) before fit, so that it is built "
           f"when training starts. Received: model {model.name!r} (not built)")
    if spec is None:
        raise GradprobeError("GradientMonitor: cannot build the model from the training data "
                             f"(its iterator has no element_spec). {fix}.")
    try:
        _keras_private.symbolic_build(model, spec)
    except Exception as e:  # noqa: BLE001 - any failure of Keras' symbolic build
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GradprobeError("GradientMonitor: cannot build the model from the shapes of the "
                             f"training data ({type(e).__name__}: {first}). {fix}.") from e
    if not model.built:
        raise GradprobeError(f"GradientMonitor: the model is still not built after a call on "
                             f"the training data's shapes. {fix}.")


class SummaryWriter:
    """TensorBoard event files in `log_dir` (`tf.summary`): `scalar` and
    `histogram` write at the step of the enclosing `at_step`."""

    def __init__(self, log_dir: str):
        self._writer = tf.summary.create_file_writer(log_dir)

    @contextlib.contextmanager
    def at_step(self, step: int) -> Iterator[None]:
        with self._writer.as_default(step=step):
            yield

    def scalar(self, tag: str, value: float) -> None:
        tf.summary.scalar(tag, value)

    def histogram(self, tag: str, values: np.ndarray) -> None:
        tf.summary.histogram(tag, values)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
