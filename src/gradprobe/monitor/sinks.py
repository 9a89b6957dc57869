"""Where recorded steps go: the in-memory history, the CSV file, TensorBoard and
the console. Each sink receives `Row`s in step order."""

from __future__ import annotations

import csv as csv_module
import os
from typing import Any, NamedTuple

import numpy as np

from gradprobe.errors import GradprobeError
from gradprobe.monitor.layout import ACT_STATS, STATS, STEP_COLUMNS, Skip

# Columns of `Row.stats`: the public STATS, then dead_units.
ROW_STATS = (*STATS, "dead_units")


class KeyedHistory(dict):
    """`monitor.history` (and `activation_history`, `read_csv`'s history): a dict
    keyed by gradprobe's one spelling of a source, the keys of `gp.gradients`'
    results (`"dense.kernel"`, `"encoder/conv.bias"`, layer paths for
    activations), that a lookup by another spelling also finds.

    A lookup (`[]`, `in`, `get`) accepts the key, the variable's Keras path
    (`"sequential/dense/kernel"`, as `v.path` and Keras print it), the key with
    `/` for its last `.` (`"dense/kernel"`), or a unique `/`-suffix of any of
    them (`"conv.bias"` for `"encoder/conv.bias"`). A name that matches nothing,
    or several keys, raises a `KeyError` (also a `GradprobeError`) naming the
    closest keys. Iteration, `keys()` and printing use the keys only.

    Args:
        data: key -> statistic -> values.
        aliases: other spelling -> key (e.g. each variable's `v.path`).
        prefixed: Also accept a name with one leading path part more than an
            alias (`"sequential/dense/kernel"` for `"dense/kernel"`): for a
            history read back from a CSV, where the model's name is not known.
    """

    def __init__(self, data: dict | None = None, aliases: dict[str, str] | None = None,
                 prefixed: bool = False):
        super().__init__(data or {})
        table: dict[str, set[str]] = {}
        for key in self:
            for name in (key, *_spellings(key)):
                table.setdefault(name, set()).add(key)
        for name, key in (aliases or {}).items():
            if key in self:
                table.setdefault(name, set()).add(key)
        self._aliases = table
        self._prefixed = prefixed

    def _lookup(self, name: Any) -> list[str]:
        """The keys `name` may stand for (one: found; several: ambiguous)."""
        if not isinstance(name, str):
            return []
        if dict.__contains__(self, name):
            return [name]
        found = self._aliases.get(name)
        if not found:
            found = {k for alias, keys in self._aliases.items()
                     if alias.endswith("/" + name) for k in keys}
        if not found and self._prefixed and "/" in name:
            found = set(self._aliases.get(name.split("/", 1)[1], ()))
        return sorted(found, key=list(self).index)

    def __missing__(self, name: Any) -> Any:
        from gradprobe.core.result import GradprobeKeyError
        from gradprobe.errors import closest, quoted

        keys = self._lookup(name)
        if len(keys) == 1:
            return dict.__getitem__(self, keys[0])
        if keys:
            raise GradprobeKeyError(f"{name!r} names {len(keys)} recorded sources; index one "
                                    f"of them: {quoted(keys)}.")
        spelled = {alias: min(ks, key=list(self).index) for alias, ks in self._aliases.items()}
        hint = list(dict.fromkeys(spelled[c] for c in closest(str(name), list(spelled))))
        raise GradprobeKeyError(
            f"Nothing recorded for {name!r}." + (f" Did you mean {quoted(hint)}?" if hint else "")
            + (f" The keys are: {quoted(self)}." if self else " Nothing was recorded."))

    def __contains__(self, name: Any) -> bool:
        return len(self._lookup(name)) == 1

    def get(self, name: Any, default: Any = None) -> Any:
        keys = self._lookup(name)
        return dict.__getitem__(self, keys[0]) if len(keys) == 1 else default


def _spellings(key: str) -> tuple[str, ...]:
    """Other spellings of a key: `"dense.kernel"` -> `"dense/kernel"` (the key
    with `/` for its last `.`), and for a key in Keras' path form (`"seq/dense/kernel"`,
    a CSV of an older version) the selector-like `"seq/dense.kernel"`."""
    if "." in key:
        owner, _, name = key.rpartition(".")
        return (f"{owner}/{name}",) if owner and "/" not in name else ()
    owner, _, name = key.rpartition("/")
    return (f"{owner}.{name}",) if owner else ()


class Row(NamedTuple):
    """One recorded step."""

    step: int
    skipped: int            # a `Skip` code
    loss_scale: float
    stats: np.ndarray       # (n, len(ROW_STATS))
    acts: np.ndarray        # (m, len(ACT_STATS))


class History:
    """The rows in memory, and the arrays `monitor.history` & co. are made of."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self._cached: tuple[int, dict, dict] | None = None

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def clear(self) -> None:
        self.rows.clear()
        self._cached = None

    @property
    def steps(self) -> np.ndarray:
        return np.array([r.step for r in self.rows], dtype=np.int64)

    @property
    def skipped(self) -> np.ndarray:
        return np.array([r.skipped for r in self.rows], dtype=np.int8)

    @property
    def loss_scale(self) -> np.ndarray:
        return np.array([r.loss_scale for r in self.rows], dtype=np.float64)

    def arrays(self, paths: list[str], layers: list[str],
               aliases: dict[str, str] | None = None) -> tuple[dict, dict]:
        """`(history, activation_history)`: `KeyedHistory`s keyed by `paths` (the
        variables' keys) and `layers` (the layers' paths); `aliases` maps other
        spellings (each variable's `v.path`) to keys."""
        if self._cached is None or self._cached[0] != len(self.rows) or \
                list(self._cached[1]) != list(paths):
            n = len(self.rows)
            grads = (np.stack([r.stats for r in self.rows]) if n
                     else np.zeros((0, len(paths), len(ROW_STATS))))
            hist = KeyedHistory(
                {p: {s: grads[:, i, j].astype(np.float64) for j, s in enumerate(ROW_STATS)}
                 for i, p in enumerate(paths)}, aliases)
            acts = KeyedHistory()
            if layers and n:
                a = np.stack([r.acts for r in self.rows])
                acts = KeyedHistory(
                    {p: {s: a[:, i, j].astype(np.float64) for j, s in enumerate(ACT_STATS)}
                     for i, p in enumerate(layers)})
            self._cached = (n, hist, acts)
        return self._cached[1], self._cached[2]


class CsvSink:
    """One row per recorded step, flushed at once; closed at the end of `fit`
    (or when it fails)."""

    def __init__(self, path: str, paths: list[str], append: bool):
        fresh = not append or not os.path.exists(path)
        try:
            self.file = open(path, "w" if fresh else "a", newline="")  # noqa: SIM115
        except OSError as e:
            raise GradprobeError(
                f"Expected csv to be a writable file path. Received: csv={path!r} "
                f"({e.strerror}). Pass a path in an existing, writable folder.") from None
        self.writer = csv_module.writer(self.file)
        if fresh:
            self.writer.writerow(["step", *STEP_COLUMNS]
                                 + [f"{p}/{s}" for p in paths for s in STATS])
            self.file.flush()

    def write(self, row: Row) -> None:
        self.writer.writerow([row.step, row.skipped, f"{row.loss_scale:.9g}"]
                             + [f"{v:.9g}" for v in row.stats[:, :len(STATS)].ravel()])
        self.file.flush()

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


class TensorBoardSink:
    """Scalars `gradients/<var>/<stat>` (`<var>` the variable's key, as in
    `gp.gradients`: `gradients/dense.kernel/norm`), `activation_gradients/<layer>/norm`,
    with loss scaling `train_step/skipped` and `train_step/loss_scale`, and
    gradient histograms.

    Args:
        writer: The event-file writer (`at_step(step)`, `scalar(tag, value)`,
            `histogram(tag, values)`, `close()`): TensorFlow's
            `gradprobe.backends.tensorflow_monitor.SummaryWriter`.
        paths: The monitored variables' keys.
        layers: The monitored activation layers' paths.
        scaled: Whether the optimizer scales the loss (writes the step-level tags).
    """

    def __init__(self, writer: Any, paths: list[str], layers: list[str], scaled: bool):
        self.writer = writer
        self.paths, self.layers, self.scaled = paths, layers, scaled

    def write(self, row: Row, histograms: list[Any] | None) -> None:
        writer = self.writer
        with writer.at_step(row.step):
            for i, path in enumerate(self.paths):
                for j, name in enumerate(STATS):
                    writer.scalar(f"gradients/{path}/{name}", float(row.stats[i, j]))
                if histograms is not None:
                    writer.histogram(f"gradients/{path}", histograms[i])
            for i, path in enumerate(self.layers):
                writer.scalar(f"activation_gradients/{path}/norm", float(row.acts[i, 0]))
            if self.scaled:
                writer.scalar("train_step/skipped", float(row.skipped))
                writer.scalar("train_step/loss_scale", float(row.loss_scale))

    def close(self) -> None:
        self.writer.close()


def print_table(paths: list[str], row: Row) -> None:
    """A rich table of one recorded step."""
    from rich.console import Console
    from rich.table import Table

    title = f"gradients at step {row.step}"
    if row.skipped == Skip.OVERFLOW:
        title += f" (skipped: loss scale {row.loss_scale:g} overflowed)"
    elif row.skipped == Skip.ACCUMULATED:
        title += " (accumulated, not applied yet)"
    elif row.skipped == Skip.NONFINITE:
        title += " (not applied: non-finite, replayed)"
    table = Table(title=title, title_justify="left")
    for col in ("variable", "norm", "max |g|", "zeros", "non-finite", "update ratio"):
        table.add_column(col, justify="left" if col == "variable" else "right")
    col = {s: j for j, s in enumerate(ROW_STATS)}
    for path, stats in zip(paths, row.stats):
        table.add_row(path, f"{stats[col['norm']]:.3g}", f"{stats[col['max_abs']]:.3g}",
                      f"{stats[col['zero_fraction']]:.0%}", f"{int(stats[col['nonfinite']])}",
                      f"{stats[col['update_ratio']]:.2g}")
    Console().print(table)


def read_csv(path: str, step_columns: bool = False) -> tuple:
    """Reads back the CSV a `GradientMonitor(csv=...)` wrote.

    Args:
        path: The CSV file: a `step` column, the step-level `skipped` and
            `loss_scale` columns (files of older versions lack them), then one
            `<variable key>/<statistic>` column per variable and statistic
            (`dense.kernel/norm`; files of older versions used the Keras path,
            `sequential/dense/kernel/norm`).
        step_columns: Also return the step-level columns.

    Returns:
        `(steps, history)`, shaped like `monitor.steps` and `monitor.history`
        (without `dead_units`, which the CSV does not hold; looked up by the
        same spellings, see `KeyedHistory`); with
        `step_columns=True`, `(steps, history, {"skipped": ..., "loss_scale": ...})`.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)),
    ...                           keras.layers.Dense(8, activation="relu", name="dense"),
    ...                           keras.layers.Dense(1, name="dense_1")])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> y = x.sum(axis=1, keepdims=True)
    >>> history = model.fit(x, y, epochs=2, batch_size=16, verbose=0,
    ...                     callbacks=[gp.GradientMonitor(every=2, csv="grads.csv")])
    >>> steps, history = gp.monitor.read_csv("grads.csv")
    >>> steps
    array([2, 4, 6, 8])
    >>> history["dense.kernel"]["norm"].shape
    (4,)
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
    extra = {"skipped": np.zeros(len(body), np.int8), "loss_scale": np.ones(len(body))}
    for j, column in enumerate(header[1:], start=1):
        if column in STEP_COLUMNS:
            extra[column] = table[:, j].astype(extra[column].dtype)
            continue
        var, _, stat = column.rpartition("/")
        if stat not in STATS or not var:
            raise GradprobeError(f"{path!r}: unexpected column {column!r}; expected "
                                 f"'<variable>/<one of {', '.join(STATS)}>'.")
        history.setdefault(var, {})[stat] = table[:, j]
    steps = table[:, 0].astype(np.int64)
    history = KeyedHistory(history, prefixed=True)
    return (steps, history, extra) if step_columns else (steps, history)
