"""`gp.GradientMonitor`: the gradients the optimizer actually applies, recorded
inside the compiled train step of `model.fit`, at almost no cost.

How it works: when training starts, the monitor gives `fit` a fresh train
function. While that function is traced (its first call), the optimizer's
gradient all-reduce is wrapped so that the aggregated gradients it is about to
apply (after clipping) are measured in-graph, and its update step so that the
size of each update is measured too; the statistics go into the monitor's own
variables, read after each step. No extra forward or backward pass runs. The
wrappers are removed right after tracing, and the model's own train function is
put back when training ends or a train step fails.
"""

from __future__ import annotations

import contextlib
import csv as csv_module
import os
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradprobe import _patch, backend
from gradprobe.errors import GradprobeError
from gradprobe.stats import Finding
from gradprobe.stats import diagnose as diagnose_stats

STATS = ("norm", "max_abs", "zero_fraction", "nonfinite", "update_ratio")
_STATUS = "_gradprobe_monitor_status"
_NORM, _MAX, _ZERO, _NONFINITE, _RATIO = range(5)


class GradientMonitor(keras.callbacks.Callback):
    """Records gradient statistics of every training step (or every `every`).

    Args:
        layers: Which variables to record: a selector as in `gp.gradients`
            (`"*"`: all trainable variables; `"conv*"`: the variables of the
            matching layers; a list of selectors).
        every: Record every `every` optimizer steps (non-finite gradients are
            checked at every step regardless).
        activations: Also record the gradients of the selected layers'
            activations, captured in the training step's own backward pass.
        histograms: Also write gradient histograms to TensorBoard (needs `log_dir`).
        log_dir: Write TensorBoard scalars (`gradients/<var>/<stat>`) here.
        csv: Write one row per recorded step to this CSV file.
        on_nonfinite: `"stop"` ends training at the first step with a NaN/Inf
            gradient and reports the step and the first variable (in forward
            order) where it appeared; `"warn"`; `"ignore"`.
        print_every: Print a compact table every this many recorded steps.

    Attributes:
        steps: The recorded global step numbers (1-based optimizer steps).
        history: variable path -> statistic -> NumPy array over `steps`; the
            statistics are `norm`, `max_abs`, `zero_fraction`, `nonfinite`,
            `update_ratio` (`||delta w|| / ||w||` of that step's update, 0 where
            `||w|| = 0`, e.g. a zero-initialised bias at the first step).
        activation_history: layer path -> statistic -> array (with `activations=True`).
        first_nonfinite: `None`, or `(step, variable path)`.

    Example:

    >>> monitor = gp.GradientMonitor(every=10, log_dir="logs", csv="grads.csv")
    >>> model.fit(x, y, epochs=3, callbacks=[monitor])
    >>> monitor.history["dense/kernel"]["norm"]
    >>> monitor.diagnose()
    """

    def __init__(self, layers: Any = "*", every: int = 1, activations: bool = False,
                 histograms: bool = False, log_dir: str | None = None, csv: str | None = None,
                 on_nonfinite: str = "stop", print_every: int | None = None):
        super().__init__()
        if int(every) < 1:
            raise GradprobeError(f"every must be >= 1; got {every}.")
        if on_nonfinite not in ("stop", "warn", "ignore"):
            raise GradprobeError(
                f"on_nonfinite must be 'stop', 'warn' or 'ignore'; got {on_nonfinite!r}.")
        if histograms and not log_dir:
            raise GradprobeError("histograms=True needs log_dir= (they go to TensorBoard).")
        self.layers = layers
        self.every = int(every)
        self.activations = activations
        self.histograms = histograms
        self.log_dir = log_dir
        self.csv = csv
        self.on_nonfinite = on_nonfinite
        self.print_every = print_every
        self.first_nonfinite: tuple[int, str] | None = None
        self._rows: list[tuple[int, np.ndarray, np.ndarray | None]] = []
        self._paths: list[str] = []
        self._act_layers: list[tuple[str, Any]] = []
        self._cached: dict | None = None
        self._state: tuple | None = None  # (model, optimizer, variables, function): reused
        self._active = False
        self._batch_begin = 0
        self._status: list[np.ndarray] = []

    @property
    def steps(self) -> np.ndarray:
        return np.array([r[0] for r in self._rows], dtype=np.int64)

    @property
    def history(self) -> dict[str, dict[str, np.ndarray]]:
        return self._histories()[0]

    @property
    def activation_history(self) -> dict[str, dict[str, np.ndarray]]:
        return self._histories()[1]

    def _histories(self) -> tuple[dict, dict]:
        if self._cached is None or self._cached["n"] != len(self._rows):
            names = (*STATS, "dead_units")
            grads = np.stack([r[1] for r in self._rows]) if self._rows else np.zeros(
                (0, len(self._paths), len(names)))
            hist = {p: {n: grads[:, i, j].astype(np.float64) for j, n in enumerate(names)}
                    for i, p in enumerate(self._paths)}
            acts = {}
            if self._act_layers and self._rows:
                a = np.stack([r[2] for r in self._rows])
                acts = {p: {n: a[:, i, j].astype(np.float64) for j, n in enumerate(STATS[:4])}
                        for i, (p, _) in enumerate(self._act_layers)}
            self._cached = {"n": len(self._rows), "h": hist, "a": acts}
        return self._cached["h"], self._cached["a"]

    # ------------------------------------------------------------ lifecycle
    def on_train_begin(self, logs: Any = None) -> None:
        model = self.model
        if getattr(model, "optimizer", None) is None:
            raise GradprobeError("GradientMonitor needs a compiled model (model.compile(...)).")
        paths, variables = self._select(model)
        self._saved_train_function = model.train_function
        state = self._state
        if (state is not None and state[0] is model and state[1] is model.optimizer
                and len(state[2]) == len(variables)
                and all(a is b for a, b in zip(state[2], variables))):
            # Same model, optimizer and variables as the last fit: reuse the traced
            # function and its variables (no retracing).
            model.train_function = state[3]
            self._start_outputs()
            return
        if self._rows and paths != self._paths:
            self._rows.clear()
        self._paths, self._variables = paths, variables
        strategy = model.distribute_strategy
        self._distributed = strategy.num_replicas_in_sync > 1 or not isinstance(
            strategy, type(tf.distribute.get_strategy()))
        n = len(self._variables)
        with strategy.scope():
            kw = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_WRITE,
                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self._stats = tf.Variable(tf.zeros((n, 5), tf.float32), **kw)
            self._ratios = tf.Variable(tf.zeros((n,), tf.float32), **kw)
            self._nonfinite = tf.Variable(tf.zeros((n,), tf.float32), **kw)
            self._recorded_step = tf.Variable(tf.constant(-1, tf.int64), **kw)
            self._grad_copies = ([tf.Variable(tf.zeros(v.shape, tf.float32), **kw)
                                  for v in self._variables] if self.histograms else [])
            self._act_layers = self._activation_layers(model) if self.activations else []
            self._act_stats = [tf.Variable(tf.zeros((4,), tf.float32), **kw)
                               for _ in self._act_layers]
        self._traced = False
        self._expect_call = False
        model.train_function = self._train_function(model)
        self._state = (model, model.optimizer, variables, model.train_function)
        self._start_outputs()

    def _start_outputs(self) -> None:
        self._global_step = int(self.model.optimizer.iterations.numpy())
        self._writer = tf.summary.create_file_writer(self.log_dir) if self.log_dir else None
        self._csv_file = None
        if self.csv:
            fresh = not os.path.exists(self.csv) or not self._rows
            self._csv_file = open(self.csv, "w" if fresh else "a", newline="")  # noqa: SIM115
            self._csv_writer = csv_module.writer(self._csv_file)
            if fresh:
                self._csv_writer.writerow(
                    ["step"] + [f"{p}/{s}" for p in self._paths for s in STATS])
        self._active = True

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._expect_call = True
        self._batch_begin = batch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._expect_call = False
        first = self._global_step + 1
        self._global_step += batch - self._batch_begin + 1
        nonfinite, recorded = self._status[0], int(self._status[1][0])
        ran = (self._global_step // self.every) >= -(-first // self.every)  # a multiple ran
        if ran and recorded >= 0 and (not self._rows or recorded != self._rows[-1][0]):
            self._record(recorded)
        if nonfinite.any() and self.first_nonfinite is None:
            where = self._paths[int(np.argmax(nonfinite > 0))]
            current = int(self.model.optimizer.iterations.numpy())
            self.first_nonfinite = (current, where)
            message = (f"gradprobe: non-finite gradient (NaN/Inf) at step {current}, first in "
                       f"forward order in {where!r}.")
            if self.on_nonfinite == "stop":
                self.model.stop_training = True
                warnings.warn(message + " Training stopped (on_nonfinite='stop').",
                              RuntimeWarning, stacklevel=2)
            elif self.on_nonfinite == "warn":
                warnings.warn(message, RuntimeWarning, stacklevel=2)

    def on_train_end(self, logs: Any = None) -> None:
        self._restore()
        if self._writer is not None:
            self._writer.flush()
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None

    def _restore(self) -> None:
        if self._active:
            self._state[0].train_function = self._saved_train_function
            self._active = False

    # ------------------------------------------------------ train function
    def _train_function(self, model: Any) -> Callable:
        """A fresh train function whose first call traces with the monitor's
        hooks in place; it restores the model's own function on failure, and
        when it is called from a `fit` the monitor is not part of."""
        if self._distributed or model.run_eagerly:
            model.make_train_function(force=True)
        else:
            # The monitor's numbers leave each step as one more output of the
            # step (reading variables from Python costs ~80 us each, per step).
            # Under a distribution strategy they are read from the variables.
            with _patch.wrapped_methods(model, {"train_step": self._wrap_train_step}):
                model.make_train_function(force=True)
        keras_step = model.train_function
        model.train_function = self._saved_train_function
        # Where the step cannot hand the status back: one compiled read per step.
        read_status = tf.function(self._pack_status, autograph=False)

        def fresh(iterator: Any) -> Any:
            logs = keras_step(iterator)
            status = None
            if isinstance(logs, dict) and _STATUS in logs:
                logs = dict(logs)
                status = logs.pop(_STATUS)
            if status is None:
                status = read_status()
            self._status = self._unpack_status(backend.to_numpy(status))
            return logs

        def train_function(iterator: Any) -> Any:
            if not self._expect_call and self._traced:
                # A later fit without this monitor: hand back the model's own function.
                self._active = True
                self._restore()
                return model.train_function(iterator)
            try:
                if self._traced:
                    return fresh(iterator)
                with self._hooks(model):
                    out = fresh(iterator)
                self._traced = True
                return out
            except BaseException:
                self._restore()
                raise

        return train_function

    def _wrap_train_step(self, original: Callable) -> Callable:
        def train_step(*args: Any, **kwargs: Any) -> Any:
            logs = original(*args, **kwargs)
            if not isinstance(logs, dict):
                return logs  # a custom train_step: the status is read from the variables
            return {**logs, _STATUS: self._pack_status()}

        return train_step

    @contextlib.contextmanager
    def _hooks(self, model: Any):
        optimizer = model.optimizer
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patch.wrapped_methods(optimizer, {
                "_all_reduce_sum_gradients": self._wrap_all_reduce,
                "_backend_update_step": self._wrap_update,
            }))
            if self._act_layers:
                stack.enter_context(_patch.wrapped_calls(
                    [layer for _, layer in self._act_layers], self._activation_hook))
            yield

    def _recording(self) -> Any:
        step = tf.cast(self.model.optimizer.iterations, tf.int64) + 1
        return tf.equal(step % self.every, 0), step

    def _wrap_all_reduce(self, original: Callable) -> Callable:
        def all_reduce(grads_and_vars: Any) -> Any:
            reduced = list(original(grads_and_vars))
            by_id = {id(v): g for g, v in reduced}
            grads = [by_id.get(id(_value(v))) for v in self._variables]
            grads = [tf.zeros(v.shape, tf.float32) if g is None else tf.cast(
                tf.convert_to_tensor(g), tf.float32) for g, v in zip(grads, self._variables)]
            # Every step: a NaN or Inf anywhere in a gradient makes its sum non-finite.
            sums = tf.stack([tf.reduce_sum(g) for g in grads])
            self._nonfinite.assign(tf.cast(~tf.math.is_finite(sums), tf.float32))
            recording, step = self._recording()

            def compute() -> Any:
                return tf.stack([tf.concat([_grad_stats(g), [_dead(g)]], 0) for g in grads])

            if self._distributed:
                # A write to a mirrored variable is a synchronisation point, not
                # allowed inside control flow: compute in the cond, write outside.
                self._stats.assign(tf.cond(recording, compute,
                                           lambda: tf.convert_to_tensor(self._stats)))
                for copy, g in zip(self._grad_copies, grads):
                    copy.assign(tf.cond(recording, lambda g=g: g,
                                        lambda copy=copy: tf.convert_to_tensor(copy)))
                self._recorded_step.assign(tf.where(recording, step, self._recorded_step))
                return reduced

            def record() -> Any:
                ops = [self._stats.assign(compute()), self._recorded_step.assign(step)]
                ops += [copy.assign(g) for copy, g in zip(self._grad_copies, grads)]
                with tf.control_dependencies(ops):
                    return tf.constant(True)

            tf.cond(recording, record, lambda: tf.constant(False))
            return reduced

        return all_reduce

    def _wrap_update(self, original: Callable) -> Callable:
        def update(grads: Any, trainable_variables: Any, learning_rate: Any) -> Any:
            values = [_value(v) for v in trainable_variables]
            mine = {id(_value(v)) for v in self._variables}
            tracked = [i for i, v in enumerate(values) if id(v) in mine]
            recording, _ = self._recording()
            # Snapshots on recorded steps (XLA needs both branches shaped alike).
            before = tf.cond(recording,
                             lambda: [tf.identity(values[i]) for i in tracked] or [tf.zeros(())],
                             lambda: [tf.zeros_like(values[i]) for i in tracked] or [tf.zeros(())])
            result = original(grads, trainable_variables, learning_rate)
            index = {id(_value(v)): k for k, v in enumerate(self._variables)}

            def ratios() -> Any:
                out = [tf.constant(0.0)] * len(self._variables)
                for b, i in zip(before, tracked):
                    new = tf.convert_to_tensor(values[i])
                    out[index[id(values[i])]] = tf.math.divide_no_nan(
                        tf.norm(tf.cast(new - b, tf.float32)), tf.norm(tf.cast(b, tf.float32)))
                return tf.stack(out)

            with tf.control_dependencies(tf.nest.flatten(result) if result is not None else []):
                if self._distributed:
                    self._ratios.assign(tf.cond(recording, ratios,
                                                lambda: tf.convert_to_tensor(self._ratios)))
                else:

                    def assign() -> Any:
                        with tf.control_dependencies([self._ratios.assign(ratios())]):
                            return tf.constant(True)

                    tf.cond(recording, assign, lambda: tf.constant(False))
            return result

        return update

    def _activation_hook(self, layer: Any, outputs: Any, args: tuple = (),
                         kwargs: dict | None = None) -> Any:
        index = next(i for i, (_, lay) in enumerate(self._act_layers) if lay is layer)
        if not (isinstance(outputs, tf.Tensor) and outputs.dtype.is_floating):
            return outputs
        stats, recording = self._act_stats, self._recording

        var = stats[index]

        @tf.custom_gradient
        def observe(x: Any) -> Any:
            def grad(dy: Any) -> Any:
                rec, _ = recording()
                new = tf.cond(rec, lambda: _grad_stats(tf.cast(dy, tf.float32)),
                              lambda: tf.convert_to_tensor(var))
                with tf.control_dependencies([var.assign(new)]):
                    return tf.identity(dy)

            return tf.identity(x), grad

        return observe(outputs)

    # ------------------------------------------------------------- selection
    def _select(self, model: Any) -> tuple[list[str], list[Any]]:
        from gradprobe.selectors import LayerTree, resolve

        variables = list(model.trainable_weights)
        if self.layers in ("*", None):
            return [v.path for v in variables], variables
        tree = LayerTree(model)
        selectors = self.layers if isinstance(self.layers, (list, tuple)) else [self.layers]
        chosen: list[Any] = []
        for sel in selectors:
            text = sel if not isinstance(sel, str) or "." in sel else sel + ".weights"
            for src in resolve(tree, text):
                var = getattr(src, "var", None)
                if var is not None and all(var is not c for c in chosen):
                    chosen.append(var)
        ordered = [v for v in variables if any(v is c for c in chosen)]
        if not ordered:
            raise GradprobeError(f"layers={self.layers!r} selects no trainable variable.")
        return [v.path for v in ordered], ordered

    def _activation_layers(self, model: Any) -> list[tuple[str, Any]]:
        from gradprobe.selectors import LayerTree, resolve

        tree = LayerTree(model)
        selectors = self.layers if isinstance(self.layers, (list, tuple)) else [self.layers]
        out: list[tuple[str, Any]] = []
        for sel in selectors:
            for src in resolve(tree, sel if isinstance(sel, str) else sel):
                node = getattr(src, "node", None)
                if node is not None and hasattr(src, "call") and all(
                        node.layer is not lay for _, lay in out):
                    out.append((node.path, node.layer))
        return out

    # ------------------------------------------------------------- recording
    def _pack_status(self) -> Any:
        """What each step hands back, as one float64 vector (one output costs
        far less than several): non-finite flags, the recorded step (exact in
        float64), the statistics, the update ratios, the activation statistics."""
        parts = [self._nonfinite, self._recorded_step, self._stats, self._ratios,
                 *self._act_stats]
        return tf.concat([tf.reshape(tf.cast(_value(v), tf.float64), [-1]) for v in parts], 0)

    def _unpack_status(self, flat: np.ndarray) -> list[np.ndarray]:
        n, m = len(self._variables), len(self._act_stats)
        stats = flat[n + 1:6 * n + 1].reshape(n, 5)
        acts = [flat[7 * n + 1 + 4 * k:7 * n + 5 + 4 * k] for k in range(m)]
        return [flat[:n], flat[n:n + 1], stats, flat[6 * n + 1:7 * n + 1], *acts]

    def _record(self, step: int) -> None:
        _, _, raw, ratios, *act_stats = self._status
        # columns: norm, max_abs, zero_fraction, nonfinite, update_ratio, dead_units
        stats = np.concatenate([raw[:, :4], ratios[:, None], raw[:, 4:5]], 1)
        acts = np.stack(act_stats) if self._act_layers else None
        self._rows.append((step, stats, acts))
        if self._writer is not None:
            with self._writer.as_default(step=step):
                for i, path in enumerate(self._paths):
                    for j, name in enumerate(STATS):
                        tf.summary.scalar(f"gradients/{path}/{name}", float(stats[i, j]))
                    if self.histograms:
                        tf.summary.histogram(f"gradients/{path}", self._grad_copies[i])
                for i, (path, _) in enumerate(self._act_layers):
                    tf.summary.scalar(f"activation_gradients/{path}/norm", float(acts[i, 0]))
        if self._csv_file is not None:
            self._csv_writer.writerow([step] + [f"{v:.9g}" for v in stats[:, :5].ravel()])
        if self.print_every and len(self._rows) % int(self.print_every) == 0:
            self._print(step, stats)

    def _print(self, step: int, stats: np.ndarray) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"gradients at step {step}", title_justify="left")
        for col in ("variable", "norm", "max |g|", "zeros", "non-finite", "update ratio"):
            table.add_column(col, justify="left" if col == "variable" else "right")
        for path, row in zip(self._paths, stats):
            table.add_row(path, f"{row[_NORM]:.3g}", f"{row[_MAX]:.3g}", f"{row[_ZERO]:.0%}",
                          f"{int(row[_NONFINITE])}", f"{row[_RATIO]:.2g}")
        Console().print(table)

    # ---------------------------------------------------------------- reading
    def diagnose(self, **thresholds: Any) -> list[Finding]:
        """Findings over the recorded steps (vanishing, exploding, non-finite,
        all-zero, dead units), one per variable and kind, naming the steps."""
        found: dict[tuple[str, str], tuple[Finding, list[int]]] = {}
        kinds = dict.fromkeys(self.history, "weight")
        for t, step in enumerate(self.steps):
            stats = {}
            for path, h in self.history.items():
                shape = tuple(int(d) for d in self._shape_of(path))
                stats[path] = {"shape": shape, "norm": h["norm"][t], "mean_abs": 0.0,
                               "max_abs": h["max_abs"][t], "std": 0.0,
                               "zero_fraction": h["zero_fraction"][t],
                               "nonfinite": int(h["nonfinite"][t])}
            for f in diagnose_stats(stats, kinds, **thresholds):
                found.setdefault((f.kind, f.key), (f, []))[1].append(int(step))
            for path, h in self.history.items():
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
        from gradprobe.plot import gradient_history

        if not len(self.steps):
            raise GradprobeError("Nothing recorded yet: fit the model with this monitor first.")
        return gradient_history(self.steps, self.history, path)


def read_csv(path: str) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """Reads back the CSV a `GradientMonitor(csv=...)` wrote.

    Args:
        path: The CSV file: a `step` column, then one `<variable path>/<statistic>`
            column per variable and statistic.

    Returns:
        `(steps, history)`, shaped like `monitor.steps` and `monitor.history`
        (without `dead_units`, which the CSV does not hold).

    Example:

    >>> steps, history = gp.monitor.read_csv("grads.csv")
    >>> history["dense/kernel"]["norm"][-1]
    """
    with open(path, newline="") as f:
        rows = list(csv_module.reader(f))
    if not rows or not rows[0] or rows[0][0] != "step":
        raise GradprobeError(
            f"{path!r} is not a GradientMonitor CSV: its first column must be 'step'.")
    header, body = rows[0], [r for r in rows[1:] if r]
    try:
        table = np.array(body, dtype=np.float64).reshape(len(body), len(header))
    except ValueError:
        raise GradprobeError(f"{path!r} has rows that are not all numbers of "
                             f"{len(header)} columns.") from None
    history: dict[str, dict[str, np.ndarray]] = {}
    for j, column in enumerate(header[1:], start=1):
        var, _, stat = column.rpartition("/")
        if stat not in STATS or not var:
            raise GradprobeError(f"{path!r}: unexpected column {column!r}; expected "
                                 f"'<variable>/<one of {', '.join(STATS)}>'.")
        history.setdefault(var, {})[stat] = table[:, j]
    return table[:, 0].astype(np.int64), history


def _value(v: Any) -> Any:
    return v.value if isinstance(v, keras.Variable) else v


def _grad_stats(g: Any) -> Any:
    finite = tf.where(tf.math.is_finite(g), g, tf.zeros_like(g))
    size = tf.cast(tf.size(g), tf.float32)
    return tf.stack([
        tf.norm(tf.reshape(finite, [-1])),
        tf.reduce_max(tf.abs(finite)) if g.shape.num_elements() else tf.constant(0.0),
        tf.math.divide_no_nan(tf.reduce_sum(tf.cast(tf.equal(g, 0.0), tf.float32)), size),
        tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32)),
    ])


def _dead(g: Any) -> Any:
    """Units (last axis) whose gradient is exactly zero everywhere."""
    if g.shape.rank == 0 or g.shape[-1] is None or g.shape[-1] < 2:
        return tf.constant(0.0)
    zero = tf.equal(g, 0.0)
    if g.shape.rank > 1:
        zero = tf.reduce_all(zero, axis=list(range(g.shape.rank - 1)))
    return tf.reduce_sum(tf.cast(zero, tf.float32))
