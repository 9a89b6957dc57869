"""`gp.GradientMonitor`: the Keras callback and its lifecycle.

How it works: when training starts, the monitor builds (once per model,
optimizer and compiled train function) a fresh train function of the model, the
same as Keras' own, whose train step also hands back the monitor's status. At
each step, and only for the duration of that step's call, the model's
`train_function` is that function and the train-step and optimizer hooks are in
place; the statistics are computed in-graph and read after the call. No extra
forward or backward pass runs.

This module is backend-neutral (Keras and NumPy): the hooks, the per-step
statistics and the TensorBoard writer are backend code, in
`gradprobe.backends.tensorflow_monitor`, `jax_monitor` and `torch_monitor`
(`gradprobe.backends.monitor_backend` picks the current backend's, imported on
first use).

The model is always put back: the model's own train function is restored at the
start of every call of the monitor's function (so an exception raised anywhere,
by a train step or by any callback at any hook, leaves the model with its own
function), and the optimizer wrappers are removed in `finally`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import keras
import numpy as np

from gradprobe.backends import _keras_private
from gradprobe.backends import monitor_backend as hooks
from gradprobe.core import _patch, _validate
from gradprobe.core.stats import Finding
from gradprobe.core.stats import diagnose as diagnose_stats
from gradprobe.errors import GradprobeError
from gradprobe.monitor.layout import Skip, Status
from gradprobe.monitor.sinks import CsvSink, History, Row, TensorBoardSink, print_table

# The attribute naming, on a monitor's per-step train function, the function it stands in for.
OWN_ATTR = "_gradprobe_own_train_function"
_OVERFLOW = int(Skip.OVERFLOW)
# Steps whose update the optimizer did not apply (no iteration counted).
_NOT_APPLIED = (int(Skip.OVERFLOW), int(Skip.NONFINITE))
_GUARDED_HOOKS = ("on_epoch_begin", "on_train_batch_begin", "on_train_batch_end",
                  "on_epoch_end", "on_train_end", "on_test_begin", "on_test_batch_begin",
                  "on_test_batch_end", "on_test_end")


def own_train_function(fn: Any) -> Any:
    """The model's own train function behind any monitor wrapper left on it."""
    seen = 0
    while getattr(fn, OWN_ATTR, None) is not None and seen < 100:
        own = getattr(fn, OWN_ATTR)()
        if own is None or own is fn:
            return fn
        fn, seen = own, seen + 1
    return fn


def set_train_function(model: Any, function: Any) -> None:
    # Relies on: Keras' `fit` looking up `self.train_function` at every step
    # (keras/src/backend/tensorflow/trainer.py), after `make_train_function()`.
    model.train_function = function


class GradientMonitor(keras.callbacks.Callback):
    """Records gradient statistics of every training step (or every `every`).

    Args:
        layers: Which variables to record: a selector as in `gp.gradients`
            (`"*"`: all trainable variables; `"conv*"`: the variables of the
            matching layers; a list of selectors). Resolved against the model
            when training starts.
        exclude: Variables NOT to record, with the same selectors as `layers`
            (`"embedding"`, `"*norm*"`, `"dense.bias"`, a list): applied after
            `layers`, so `layers="*", exclude="*norm*"` records every
            trainable variable outside normalisation layers. `None`: none.
        every: Record every `every` steps (non-finite gradients are checked at
            every step regardless).
        activations: Also record the gradients of the selected layers'
            activations, captured in the training step's own backward pass.
        histograms: Also write gradient histograms to TensorBoard (needs `log_dir`).
        log_dir: Write TensorBoard scalars (`gradients/<var>/<stat>`, e.g.
            `gradients/dense.kernel/norm`) here.
        csv: Write one row per recorded step to this CSV file (its folder must
            exist): a `step` column, then `<var>/<stat>` columns
            (`dense.kernel/norm`). An existing file is never replaced unless
            `overwrite=True`; the later fits of the same monitor append to the
            file it wrote.
        on_nonfinite: `"stop"` ends training after the execution holding the
            first step with a NaN/Inf gradient the optimizer applied, and reports
            the step and the first variable (in forward order) where it appeared;
            `"warn"`; `"ignore"`. A step that ran without the monitor's hooks is a
            `GradprobeError` with `"stop"`, a warning otherwise.
        print_every: Print a compact table every this many recorded steps.
        overwrite: Replace an existing `csv` file. Without it an existing file
            is never touched: a `GradprobeError` is raised before any work.
        replay: Find where the first NaN/Inf starts (with `on_nonfinite="stop"`):
            the step with a non-finite gradient is not applied (the model keeps
            its last finite weights), and its batch is replayed eagerly to name
            the first layer whose output is not finite, or, where the forward
            pass is finite, the layer whose backward pass first makes a gradient
            non-finite (`nonfinite_origin`, and the warning). Costs nothing on
            healthy steps but one sum per gradient (the non-finite check every
            step has) and keeping each step's batch until the next. Needs
            `steps_per_execution=1`, no distribution strategy and no loss scaling.

    Variables are spelled as in `gp.gradients`' results: `"<layer path>.<name>"`
    (`"dense.kernel"`, `"block1/conv.bias"`), in `history`, the CSV columns, the
    TensorBoard tags, the printed tables and messages. A lookup in `history`
    also accepts the Keras path that `v.path` and Keras print
    (`"sequential/dense/kernel"`), `"dense/kernel"`, or a unique suffix; a name
    that matches nothing raises a `KeyError` naming the closest keys.

    A model that is not built yet (a subclassed or `Sequential` model never
    called) is built at the start of the first training step, from the shapes
    and dtypes of the training data (what Keras does under a distribution
    strategy), and recorded from that step on.

    Runs on TensorFlow, JAX and PyTorch; the hooks of each backend are in
    `gradprobe.backends.*_monitor`.

    Attributes:
        steps: The recorded step numbers (1-based; numbered like the
            optimizer's iterations when the monitor first sees the model, then
            one per train step, steps skipped by loss scaling included).
        history: variable key (`"dense.kernel"`) -> statistic -> NumPy array
            over `steps`; the
            statistics are `norm`, `max_abs`, `zero_fraction`, `nonfinite`,
            `update_ratio` (`||delta w|| / ||w||` of that step's update, 0 where
            `||w|| = 0` or where no update was applied), `dead_units`.
        skipped: Per recorded step: 0 applied, 1 skipped by dynamic loss scaling
            (the scaled gradients overflowed), 2 accumulated (gradient accumulation).
        loss_scale: Per recorded step, the loss scale of that step (1 without
            loss scaling).
        activation_history: layer path -> statistic -> array (with `activations=True`).
        first_nonfinite: `None`, or `(step, variable key)`.
        nonfinite_origin: With `replay=True`, where the first non-finite step's
            NaN/Inf starts (a `gradprobe.monitor.replay.NonfiniteOrigin`: `step`,
            `phase`, `layer`, `message`), else `None`.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)),
    ...                           keras.layers.Dense(8, activation="relu", name="dense"),
    ...                           keras.layers.Dense(1, name="dense_1")])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> y = x.sum(axis=1, keepdims=True)
    >>> monitor = gp.GradientMonitor(every=2, log_dir="logs", csv="grads.csv")
    >>> history = model.fit(x, y, epochs=2, batch_size=16, callbacks=[monitor], verbose=0)
    >>> monitor.steps
    array([2, 4, 6, 8])
    >>> monitor.history["dense.kernel"]["norm"].shape
    (4,)
    >>> findings = monitor.diagnose()   # vanishing, exploding, non-finite, dead, over time
    """

    def __init__(self, layers: Any = "*", every: int = 1, activations: bool = False,
                 histograms: bool = False, log_dir: str | os.PathLike | None = None,
                 csv: str | os.PathLike | None = None, on_nonfinite: str = "stop",
                 print_every: int | None = None, overwrite: bool = False,
                 exclude: Any = None, replay: bool = False):
        _validate.backend_supported("gp.GradientMonitor", functional=("jax", "torch"))
        super().__init__()
        self.layers = _check_layers(layers)
        self.exclude = None if exclude is None else _check_layers(exclude, "exclude")
        self.every = _positive_int("every", every)
        self.activations = _check_bool("activations", activations)
        self.histograms = _check_bool("histograms", histograms)
        if on_nonfinite not in ("stop", "warn", "ignore"):
            raise GradprobeError("Expected on_nonfinite to be one of 'stop', 'warn', 'ignore'. "
                                 f"Received: on_nonfinite={on_nonfinite!r}.")
        self.on_nonfinite = on_nonfinite
        self.print_every = None if print_every is None else _positive_int(
            "print_every", print_every, none_ok=True)
        self.overwrite = _check_bool("overwrite", overwrite)
        self.replay = _check_bool("replay", replay)
        if self.replay and on_nonfinite != "stop":
            raise GradprobeError(
                "Expected on_nonfinite='stop' with replay=True (the replayed step is not "
                f"applied, and training stops there). Received: on_nonfinite={on_nonfinite!r}.")
        self.log_dir = None if log_dir is None else _check_dir("log_dir", log_dir)
        self.csv = None if csv is None else _check_file("csv", csv)
        # Whether the file at `csv` is this monitor's own (it wrote it): later fits
        # append to it, or start it over for another model, with no flag.
        self._csv_own = False
        if self.csv is not None:
            self._check_csv_new()
        if self.histograms and self.log_dir is None:
            raise GradprobeError("Expected log_dir with histograms=True (histograms go to "
                                 "TensorBoard). Received: log_dir=None. Pass log_dir='logs'.")
        if keras.backend.backend() != "tensorflow":
            hooks.check_options(activations=self.activations, log_dir=self.log_dir)
        self.first_nonfinite: tuple[int, str] | None = None
        self.nonfinite_origin: Any = None
        self._pending_batch: Any = None
        self._history = History()
        self._paths: list[str] = []  # the variables' keys, as in gp.gradients
        self._aliases: dict[str, str] = {}  # v.path -> key
        self._variables: list[Any] = []
        # With a model not built when training starts: (model's own function,
        # the function armed for the first step, which builds the model).
        self._unbuilt: tuple[Any, Any] | None = None
        self._layer_paths: list[str] = []
        self._built: tuple | None = None  # (key, probe, function, read_status, wrapper, own)
        self._csv_sink: CsvSink | None = None
        self._tb_sink: TensorBoardSink | None = None
        self._guards: contextlib.ExitStack | None = None
        self._callback_list: Any = None
        self._fitting = False
        self._armed = False
        self._last_step = 0
        self._last_iterations: int | None = None
        self._pending_status: Status | None = None
        self._recorded_since_print = 0

    # ------------------------------------------------------------ results
    @property
    def steps(self) -> np.ndarray:
        return self._history.steps

    @property
    def skipped(self) -> np.ndarray:
        return self._history.skipped

    @property
    def loss_scale(self) -> np.ndarray:
        return self._history.loss_scale

    @property
    def history(self) -> dict[str, dict[str, np.ndarray]]:
        return self._history.arrays(self._paths, self._layer_paths, self._aliases)[0]

    @property
    def activation_history(self) -> dict[str, dict[str, np.ndarray]]:
        return self._history.arrays(self._paths, self._layer_paths, self._aliases)[1]

    # ------------------------------------------------------------ lifecycle
    def on_train_begin(self, logs: Any = None) -> None:
        # Left by a fit that failed outside any callback: sinks open, guards on its
        # CallbackList, a status no callback of this monitor will see.
        self._close_sinks()
        self._pending_status, self._armed, self._unbuilt = None, False, None
        if self._guards is not None:
            guards, self._guards = self._guards, None
            guards.close()
        model = self.model
        # A wrapper of ours left on the model (by a fit that failed where no
        # callback could see it): put the model's own function back.
        own = own_train_function(model.train_function)
        if own is not model.train_function:
            set_train_function(model, own)
        optimizer = getattr(model, "optimizer", None)
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise GradprobeError("GradientMonitor needs a model compiled with a Keras optimizer "
                                 f"(model.compile(optimizer=...)). Received: optimizer={optimizer!r}.")
        # Everything that can fail is checked before the model is touched.
        if not getattr(model, "built", True):
            # Not built yet (a subclassed or Sequential model never called): Keras
            # builds it when the first step runs; the monitor builds it then, from
            # the data's shapes, and sets up (see `_arm`).
            self._check_sink_paths()
            self._unbuilt = (own, None)
        else:
            self._setup(model, optimizer, own)
        try:
            self._guard(_keras_private.running_callback_list(self))
        except BaseException:
            self._close_sinks()
            raise
        self._fitting = True

    def _setup(self, model: Any, optimizer: Any, own: Any) -> None:
        """Selects the variables, opens the sinks and builds (or reuses) the
        monitor's train function; `own` is the model's own train function."""
        paths, variables = self._select(model)
        layers = self._activation_layers(model) if self.activations else []
        key = (model, optimizer, own, *variables)
        same = self._built is not None and len(self._built[0]) == len(key) and all(
            a is b for a, b in zip(self._built[0], key))
        if not same and self._history.rows and paths != self._paths:
            self._history.clear()
        append = bool(self._history.rows) and paths == self._paths
        self._open_sinks(paths, [p for p, _ in layers], optimizer, append)
        try:
            if self.replay:
                self._check_replay(model, optimizer)
            if not same:
                probe = hooks.StepProbe(model, variables, layers, self.every, self.histograms,
                                        **({"replay": True} if self.replay else {}))
                function, read_status = hooks.make_train_function(model, probe)
                own_cell: dict[str, Any] = {"own": None}
                self._built = (key, probe, function, read_status,
                               self._step_function(model, probe, function, read_status, own_cell),
                               own_cell)
                self._last_iterations = None
            self._paths, self._variables = paths, variables
            self._aliases = {v.path: p for p, v in zip(paths, variables)
                             if getattr(v, "path", None) and v.path != p}
            self._layer_paths = [p for p, _ in layers]
            probe = self._built[1]
            iterations = probe.iterations()
            if self._last_iterations is None:
                self._last_step = iterations
            else:  # fits without this monitor ran in between: one step per iteration
                self._last_step += max(iterations - self._last_iterations, 0)
            self._last_iterations = iterations
            probe.set_step(self._last_step)
        except BaseException:
            self._close_sinks()
            raise

    def _check_replay(self, model: Any, optimizer: Any) -> None:
        why = None
        if int(model.steps_per_execution or 1) != 1:
            why = (f"steps_per_execution={model.steps_per_execution} (the batch of every step "
                   "but the last of an execution is not handed back)")
        elif hooks.is_distributed(model):
            why = "a distribution strategy (the update runs per replica)"
        elif hooks.loss_scaler(optimizer) is not None:
            why = "loss scaling (its skipped steps are not NaN origins)"
        elif getattr(hooks.applying_optimizer(optimizer), "gradient_accumulation_steps", None):
            why = "gradient accumulation"
        if why is not None:
            raise GradprobeError(
                f"GradientMonitor(replay=True) cannot replay a step of model {model.name!r} "
                f"with {why}. Received: replay=True. Fit with steps_per_execution=1 on one "
                "device in float32 to find where the NaN starts, or pass replay=False.")

    def _guard(self, callback_list: Any) -> None:
        """Wraps the running fit's `CallbackList` so that the model's own train
        function is armed with the monitor's only after every callback's
        `on_train_batch_begin` ran, and the sinks are closed whatever callback
        raises."""
        self._guards = contextlib.ExitStack()
        self._callback_list = callback_list
        if callback_list is None:
            return

        def guard(name: str):
            def make(original):
                def hook(*args: Any, **kwargs: Any) -> Any:
                    try:
                        out = original(*args, **kwargs)
                    except BaseException:
                        self._abort()
                        raise
                    if name == "on_train_batch_begin" and self._fitting:
                        self._arm()
                    return out
                return hook
            return make

        self._guards.enter_context(_patch.wrapped_methods(
            callback_list, {name: guard(name) for name in _GUARDED_HOOKS}))

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self._callback_list is None:
            self._arm()  # without the fit's CallbackList: armed here

    def _arm(self) -> None:
        # (not `self.model`: on JAX, reading it copies the training state back
        # into the model's variables, at every step)
        model = _keras_private.callback_model(self) or self.model
        if self._unbuilt is not None:
            self._arm_unbuilt(model)
            return
        self._built[5]["own"] = own_train_function(model.train_function)
        self._armed = True
        set_train_function(model, self._built[4])

    def _arm_unbuilt(self, model: Any) -> None:
        """Arms, for the first step of a fit of a model that is not built, a
        function that builds the model from the shapes and dtypes of the data the
        step's iterator yields (no batch is consumed), sets the monitor up, and
        runs the step with the monitor's function."""
        own = own_train_function(model.train_function)

        def first_step(*args: Any) -> Any:
            set_train_function(model, own)  # whatever happens next
            if self._unbuilt is None or self._unbuilt[1] is not first_step or not self._fitting:
                return own(*args)  # a wrapper left on the model; this fit is not ours
            self._unbuilt = None
            try:
                if not model.built:
                    hooks.build_model(model, args[-1])
                self._setup(model, model.optimizer, own)
            except BaseException:
                self._abort()
                raise
            self._arm()
            return model.train_function(*args)

        setattr(first_step, OWN_ATTR, lambda: own)
        self._unbuilt = (own, first_step)
        set_train_function(model, first_step)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        status, self._pending_status = self._pending_status, None
        if status is None:
            return
        try:
            self._process(status)
        except BaseException:
            self._abort()
            raise

    def on_train_end(self, logs: Any = None) -> None:
        self._finish()

    def _abort(self) -> None:
        self._finish()

    def _finish(self) -> None:
        self._fitting = False
        self._armed = False
        self._pending_batch = None
        unbuilt, self._unbuilt = self._unbuilt, None
        if unbuilt is not None and unbuilt[1] is not None and self.model is not None and \
                self.model.train_function is unbuilt[1]:
            set_train_function(self.model, unbuilt[0])
        own = self._built[5]["own"] if self._built is not None else None
        if own is not None and self.model is not None and \
                self.model.train_function is not own and \
                own_train_function(self.model.train_function) is own:
            set_train_function(self.model, own)
        status, self._pending_status = self._pending_status, None
        if status is not None:
            # An execution whose on_train_batch_end never reached the monitor (a
            # callback before it raised): its steps are recorded all the same.
            with contextlib.suppress(GradprobeError):
                self._process(status)
        if self._built is not None:
            self._last_iterations = self._built[1].iterations()
        self._close_sinks()
        if self._guards is not None:
            guards, self._guards = self._guards, None
            guards.close()

    # ------------------------------------------------------------ per step
    def _step_function(self, model: Any, probe: Any, function: Any,
                       read_status: Any, own_cell: dict[str, Any]) -> Any:
        """The function armed as `model.train_function` for one step."""
        status_key, end_of_data = hooks.STATUS_KEY, hooks.END_OF_DATA
        batch_key = getattr(hooks, "BATCH_KEY", None)

        def train_function(*args: Any) -> Any:
            # (`iterator` on TensorFlow, `data` on PyTorch, `state, iterator` on JAX)
            own = own_cell["own"]
            # The model's own function goes back first: whatever happens next.
            set_train_function(model, own)
            if not (self._armed and self._fitting and self._built is not None
                    and self._built[4] is train_function):
                return own(*args)  # a wrapper left on the model; this fit is not ours
            self._armed = False
            try:
                with probe.installed():
                    logs = function(*args)
                status = None
                if isinstance(logs, dict) and (status_key in logs or batch_key in logs):
                    logs = dict(logs)
                    status = logs.pop(status_key, None)
                    self._pending_batch = logs.pop(batch_key, None)
                if status is None:
                    status = read_status()
                if hasattr(probe, "handed_batch"):
                    self._pending_batch = probe.handed_batch()  # (JAX: not in the logs)
                self._pending_status = probe.unpack(status)
            except end_of_data:
                # The end of the data: fit goes on (next epoch) and re-arms the
                # monitor. No batch, so no step ran; but where the data runs out
                # inside the compiled step (OutOfRange), the counters that do not
                # depend on the data (the optimizer's iterations, the monitor's
                # step) may have moved: follow them, as Keras' iterations do.
                status = probe.unpack(read_status())
                self._last_step, self._last_iterations = status.step, status.iterations
                raise
            except BaseException:
                self._abort()
                raise
            return logs

        # Marks the function as a monitor's, and names the function it stands in for.
        setattr(train_function, OWN_ATTR, lambda: own_cell["own"])
        return train_function

    def _process(self, status: Status) -> None:
        """Checks that every step of the execution was seen by the hooks, records
        the steps to record and reports the first non-finite gradient."""
        probe = self._built[1]
        first, last = self._last_step + 1, status.step
        applier_calls = status.iterations - (self._last_iterations or 0)
        self._last_iterations = status.iterations
        slots = probe.slots
        ran = np.arange(first, last + 1)
        rows = ran % slots
        ok = (status.slot_step[rows] == ran) & (status.proof[rows] == ran)
        seen, missing = ran[ok].tolist(), ran[~ok].tolist()
        overflowed = int(np.count_nonzero(np.isin(status.skipped[rows[ok]], _NOT_APPLIED)))
        extra = max(applier_calls - (len(seen) - overflowed), 0)
        if not len(ran) and extra == 0:
            extra = 1  # the call returned, so at least one step ran
        self._last_step = last + extra
        for s in seen:
            i = s % slots
            skipped = int(status.skipped[i])
            if s % self.every == 0:
                stats = np.concatenate([status.stats[i, :, :4], status.ratios[i][:, None],
                                        status.stats[i, :, 4:5]], 1)
                row = Row(s, skipped, float(status.loss_scale[i]), stats,
                          status.acts[:, i, :] if len(status.acts) else np.zeros((0, 4)))
                self._record(row, status)
            if self.first_nonfinite is None and skipped != _OVERFLOW and status.flags[i].any():
                where = self._paths[int(np.argmax(status.flags[i] > 0))]
                self.first_nonfinite = (s, where)
                self._nonfinite(s, where, self._replay(s, skipped, s == last))
        if missing or extra:
            probe.set_step(self._last_step)
            unseen = missing + list(range(last + 1, last + extra + 1))
            self._unseen(unseen)

    def _replay(self, step: int, skipped: int, last: bool) -> str:
        """With `replay=True`: replays the non-finite step (not applied) and
        returns the sentence naming where its NaN/Inf starts."""
        batch, self._pending_batch = self._pending_batch, None
        if not self.replay:
            return ""
        from gradprobe.monitor.replay import NonfiniteOrigin, find_origin

        if skipped != int(Skip.NONFINITE) or batch is None or not last:
            origin = NonfiniteOrigin(step, "not reproduced", None,
                                     f"step {step} could not be replayed (its batch or "
                                     "weights were not kept)")
        else:
            origin = find_origin(self.model, hooks.unbatch(batch), step)
        self.nonfinite_origin = origin
        return f" Replay: {origin.message}; the update of step {step} was not applied."

    def _nonfinite(self, step: int, where: str, origin: str = "") -> None:
        message = (f"gradprobe: non-finite gradient (NaN/Inf) at step {step}, first in "
                   f"forward order in {where!r}.{origin}")
        if self.on_nonfinite == "stop":
            self.model.stop_training = True
            warnings.warn(message + " Training stopped (on_nonfinite='stop').",
                          RuntimeWarning, stacklevel=3)
        elif self.on_nonfinite == "warn":
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _unseen(self, steps: list[int]) -> None:
        span = _steps_text(steps)
        message = (f"gradprobe: {span} ran without the monitor's hooks, so their gradients "
                   "were not recorded. The train step must apply its gradients with "
                   "model.optimizer.apply() or apply_gradients() (on JAX: "
                   "model.optimizer.stateless_apply()).")
        if self.on_nonfinite == "stop":
            raise GradprobeError(message + " (Pass on_nonfinite='warn' to only warn.)")
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _record(self, row: Row, status: Status) -> None:
        self._history.add(row)
        if self._csv_sink is not None:
            self._csv_sink.write(row)
        if self._tb_sink is not None:
            copies = None
            if self.histograms and status.copies_step == row.step:
                copies = self._built[1].histogram_values()
            self._tb_sink.write(row, copies)
        if self.print_every:
            self._recorded_since_print += 1
            if self._recorded_since_print >= self.print_every:
                self._recorded_since_print = 0
                print_table(self._paths, row)

    # ------------------------------------------------------------ sinks
    def _check_sink_paths(self) -> None:
        if self.csv is not None:
            _check_file("csv", self.csv)
            self._check_csv_new()
        if self.log_dir is not None:
            _check_dir("log_dir", self.log_dir)

    def _check_csv_new(self) -> None:
        """Nothing is lost: an existing file that this monitor did not write is
        replaced only with `overwrite=True`."""
        if not self.overwrite and not self._csv_own and os.path.lexists(self.csv):
            raise GradprobeError(
                f"Expected csv to be a file that does not exist yet. Received: csv={self.csv!r}, "
                "which exists; pass overwrite=True to replace it, or choose another path.")

    def _open_sinks(self, paths: list[str], layers: list[str], optimizer: Any,
                    append: bool) -> None:
        # Both paths are checked before either sink opens (opening the CSV truncates it).
        self._check_sink_paths()
        if self.csv is not None:
            self._csv_sink = CsvSink(self.csv, paths, append)
            self._csv_own = True
        if self.log_dir is not None:
            try:
                self._tb_sink = TensorBoardSink(hooks.SummaryWriter(self.log_dir), paths, layers,
                                                hooks.loss_scaler(optimizer) is not None)
            except BaseException:
                self._close_sinks()
                raise

    def _close_sinks(self) -> None:
        for sink in (self._csv_sink, self._tb_sink):
            if sink is not None:
                sink.close()
        self._csv_sink = self._tb_sink = None

    # ------------------------------------------------------------ selection
    def _select(self, model: Any) -> tuple[list[str], list[Any]]:
        """The monitored variables (forward order) and their keys, spelled as
        `gp.gradients` spells them (`"dense.kernel"`)."""
        from gradprobe.core.selectors import LayerTree, resolve

        variables = list(model.trainable_weights)
        if not variables:
            raise GradprobeError(
                f"GradientMonitor: model {model.name!r} has no trainable variables"
                + (" (every layer is frozen: trainable=False)." if model.weights else
                   ". If it is built in its first call, call it once on a batch "
                   "(model(x[:1])) before fit.")
                + " Received: model.trainable_weights=[].")
        tree = LayerTree(model)
        chosen = variables if self.layers == "*" else _selected(tree, self.layers, resolve)
        ordered = [v for v in variables if any(v is c for c in chosen)]
        if self.exclude is not None:
            dropped = _selected(tree, self.exclude, resolve, "exclude")
            ordered = [v for v in ordered if all(v is not d for d in dropped)]
        if not ordered:
            raise GradprobeError(
                "Expected layers (less exclude) to select at least one trainable variable. "
                f"Received: layers={self.layers!r}, exclude={self.exclude!r}. Pass '*' or "
                "layer names, and an exclude that leaves some of them.")
        return [tree.variable_key(v) for v in ordered], ordered

    def _activation_layers(self, model: Any) -> list[tuple[str, Any]]:
        from gradprobe.core.selectors import LayerTree, resolve

        tree = LayerTree(model)

        def layers_of(selectors: list[Any]) -> list[tuple[str, Any]]:
            out: list[tuple[str, Any]] = []
            for sel in selectors:
                if isinstance(sel, keras.Variable):
                    continue
                for src in resolve(tree, sel):
                    node = getattr(src, "node", None)
                    if node is not None and hasattr(src, "call") and all(
                            node.layer is not lay for _, lay in out):
                        out.append((node.path, node.layer))
            return out

        out = layers_of(["*"] if self.layers == "*" else self.layers)
        if self.exclude is not None:
            dropped = layers_of([s for s in self.exclude if not (
                isinstance(s, str) and "." in s)])  # a variable selector drops no layer
            out = [(p, lay) for p, lay in out if all(lay is not d for _, d in dropped)]
        return out

    # ------------------------------------------------------------- reading
    def diagnose(self, **thresholds: Any) -> list[Finding]:
        """Findings over the recorded steps (vanishing, exploding, non-finite,
        all-zero, dead units), one per variable and kind, naming the steps.
        Steps skipped by dynamic loss scaling are left out (their overflow is
        how loss scaling works, not a training failure).

        Args:
            **thresholds: `vanishing`, `exploding` and `window`, as in
                `gp.diagnose` (`gradprobe.core.stats.diagnose`); any other name
                is a `GradprobeError` listing these.

        Returns:
            A list of `Finding`, one per variable and kind, naming its steps.
        """
        _validate.thresholds({k: v for k, v in thresholds.items() if k != "window"},
                             ("vanishing", "exploding", "window"))
        found: dict[tuple[str, str], tuple[Finding, list[int]]] = {}
        history = self.history
        kinds = dict.fromkeys(history, "weight")
        skipped = self.skipped
        for t, step in enumerate(self.steps):
            if skipped[t] == _OVERFLOW:
                continue
            stats = {}
            for path, h in history.items():
                shape = tuple(int(d) for d in self._shape_of(path))
                stats[path] = {"shape": shape, "norm": h["norm"][t], "mean_abs": 0.0,
                               "max_abs": h["max_abs"][t], "std": 0.0,
                               "zero_fraction": h["zero_fraction"][t],
                               "nonfinite": int(h["nonfinite"][t])}
            for f in diagnose_stats(stats, kinds, **thresholds):
                found.setdefault((f.kind, f.key), (f, []))[1].append(int(step))
            for path, h in history.items():
                dead, units = int(h["dead_units"][t]), int(self._shape_of(path)[-1] or 0)
                if 0 < dead < units:
                    f = Finding("dead", path, f"{path}: {dead} of {units} units receive exactly "
                                "zero gradient: dead units.", dead / units)
                    found.setdefault(("dead", path), (f, []))[1].append(int(step))
        out = []
        for (_, _), (f, steps) in found.items():
            span = f"step {steps[0]}" if len(steps) == 1 else \
                f"{len(steps)} recorded steps, {steps[0]} to {steps[-1]}"
            out.append(Finding(f.kind, f.key, f"{f.message} ({span})", f.value))
        return out

    def _shape_of(self, path: str) -> tuple:
        return tuple(self._variables[self._paths.index(path)].shape)

    def plot(self, path: str | None = None) -> Any:
        """Gradient norms per variable over the recorded steps, and a "gradient
        flow" bar chart (norm per variable, forward order) for the last step.

        Args:
            path: Save the figure as a PNG here (optional).

        Returns:
            The matplotlib figure.
        """
        from gradprobe.report.plot import gradient_history

        if not len(self.steps):
            raise GradprobeError("Nothing recorded yet: fit the model with this monitor first.")
        return gradient_history(self.steps, self.history, path)


def _steps_text(steps: list[int]) -> str:
    """'step 4', 'steps 1 to 3', 'steps 1, 3 and 5 to 7': the runs of `steps`."""
    runs: list[list[int]] = []
    for s in steps:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    parts = [str(a) if a == b else f"{a} to {b}" for a, b in runs]
    if len(steps) == 1:
        return f"step {parts[0]}"
    return "steps " + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])


# ---------------------------------------------------------------- validation
def _positive_int(name: str, value: Any, none_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        extra = " or None" if none_ok else ""
        raise GradprobeError(f"Expected {name} to be a positive integer{extra}. "
                             f"Received: {name}={value!r}.")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise GradprobeError(f"Expected {name} to be True or False. Received: {name}={value!r}.")
    return bool(value)


def _check_layers(layers: Any, name: str = "layers") -> Any:
    if name == "layers" and (layers is None or (isinstance(layers, str) and layers == "*")):
        return "*"
    items = [layers] if isinstance(layers, str | keras.Variable | keras.layers.Layer) else layers
    if not isinstance(items, list | tuple) or not items or not all(
            (isinstance(s, str) and s.strip()) or isinstance(s, keras.Variable | keras.layers.Layer)
            for s in items):
        start = "'*', " if name == "layers" else "None, "
        raise GradprobeError(f"Expected {name} to be {start}a selector (a layer name or glob, "
                             "'name.kernel', a layer, a variable) or a list of them (e.g. "
                             f"['conv*', 'dense']). Received: {name}={layers!r}.")
    return list(items)


def _selected(tree: Any, selectors: list[Any], resolve: Any, name: str = "layers") -> list[Any]:
    """The trainable variables that `selectors` name (as `layers=` reads them)."""
    chosen: list[Any] = []
    for sel in selectors:
        if isinstance(sel, keras.layers.Layer):
            tree.node_of(sel)  # raises if the layer is not part of the model
            found = list(sel.trainable_weights)
        else:
            # A layer name selects the layer's trainable weights; else a
            # variable's Keras path ("sequential/dense/kernel") selects it.
            text = sel if not isinstance(sel, str) or "." in sel else sel + ".weights"
            try:
                found = [getattr(src, "var", None) for src in resolve(tree, text)]
            except GradprobeError as e:
                var = tree.variable_by_path(sel) if text != sel else None
                if var is None:
                    if name == "layers":
                        raise
                    raise GradprobeError(f"exclude: {e}") from e
                found = [var]
        for var in found:
            if var is not None and all(var is not c for c in chosen):
                chosen.append(var)
    return chosen


def _check_file(name: str, path: Any) -> str:
    if not isinstance(path, str | os.PathLike):
        raise GradprobeError(f"Expected {name} to be a file path. Received: {name}={path!r}.")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise GradprobeError(f"Expected {name} to be a file path, not a folder. "
                             f"Received: {name}={path!r}. Pass e.g. {os.path.join(path, 'g.csv')!r}.")
    if not os.path.isdir(folder):
        raise GradprobeError(f"Expected {name} to be in an existing folder. Received: "
                             f"{name}={path!r} ({folder!r} does not exist). Create the folder "
                             "first or pass another path.")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise GradprobeError(f"Expected {name} to be writable. Received: {name}={path!r} "
                             "(permission denied). Pass a path in a writable folder.")
    return path


def _check_dir(name: str, path: Any) -> str:
    if not isinstance(path, str | os.PathLike):
        raise GradprobeError(f"Expected {name} to be a folder path. Received: {name}={path!r}.")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise GradprobeError(f"Expected {name} to be a folder. Received: {name}={path!r} "
                             "(an existing file). Pass a folder path.")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise GradprobeError(f"Expected {name} to be a writable folder. Received: {name}="
                             f"{path!r} ({existing!r} is not writable). Pass another folder.")
    return path


__all__ = ["GradientMonitor"]
