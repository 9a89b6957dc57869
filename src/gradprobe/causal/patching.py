"""Activation patching (`gp.activation_patching`) and the result both patching
functions return (`Patching`).

Two runs of the model, one on *clean* inputs and one on *corrupted* inputs of
the same shape. Exact patching runs the corrupted inputs again with one
selected activation (a whole layer call, or one position of it along the
sequence axis) taken from the clean run, and reports how much the target moves:

    effect[layer, position] = target(corrupted, activation patched in) - target(corrupted)

(`direction="noise"` swaps the roles: clean inputs, corrupted activations.)

Batched: the patched variants are stacked along the batch axis (the base inputs
repeated once per variant) and each selected layer's hook writes the source
activation into the rows of its own variants with one `where`, so a sweep over
every layer and position is one forward pass (or a few, `batch_size` rows each),
not one Python call per layer or position.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from gradprobe.causal import _sites
from gradprobe.causal._sites import Hooks, Site
from gradprobe.core import _validate, engine
from gradprobe.core.inputs import batch_size, prepare_inputs
from gradprobe.core.targets import evaluate, to_numpy
from gradprobe.errors import GradprobeError

_DIRECTIONS = ("denoise", "noise")


# -------------------------------------------------------------------- result
@dataclass(frozen=True)
class Agreement:
    """How well one patching table (an estimate) matches another (exact patching).

    Attributes:
        pearson: Pearson correlation of the two tables' entries (`nan` when one
            is constant).
        spearman: Spearman rank correlation.
        max_abs_error: Largest |estimate - exact|.
        scale: Largest |exact|, for reading `max_abs_error`.
    """

    pearson: float
    spearman: float
    max_abs_error: float
    scale: float


@dataclass(frozen=True)
class Patching:
    """A patching table: the effect on the target of patching each selected
    activation, by layer call (rows) and position (columns).

    Attributes:
        method: `"exact"` (activation patching) or `"attribution"` (its gradient
            estimate).
        direction: `"denoise"` (clean activations patched into the corrupted
            run) or `"noise"` (corrupted activations into the clean run).
        layers: The row keys: a layer's path, `"path@i"` for each call of a
            layer called more than once.
        positions: The column positions along axis 1 of the activations, or
            `[None]` (each activation patched whole).
        effects: `(layers, positions)` array: the mean over examples of
            target(patched) - target(base run).
        per_example: `(layers, positions, batch)` array of the same effects per
            example.
        clean: The target on the clean inputs, per example.
        corrupted: The target on the corrupted inputs, per example.
        forward_passes: How many forward passes (and, for attribution
            patching, backward passes) computed the table.
    """

    method: str
    direction: str
    layers: list[str]
    positions: list[int | None]
    effects: np.ndarray
    per_example: np.ndarray
    clean: np.ndarray
    corrupted: np.ndarray
    forward_passes: int = 0
    backward_passes: int = 0

    @property
    def recovered(self) -> np.ndarray:
        """The effects as a fraction of the whole gap: `effects / (mean clean -
        mean corrupted)` for `"denoise"` (1 = the patch restores the clean
        target), `effects / (mean corrupted - mean clean)` for `"noise"`."""
        gap = float(np.mean(self.clean) - np.mean(self.corrupted))
        if self.direction == "noise":
            gap = -gap
        if gap == 0:
            return np.full_like(self.effects, np.nan)
        return self.effects / gap

    def _columns(self) -> list[str]:
        return ["all" if p is None else str(p) for p in self.positions]

    def table(self, print_fn: Callable[[str], Any] | None = None,
              other: Patching | None = None) -> None:
        """Prints the table (layers as rows, positions as columns) with rich.

        Args:
            print_fn: Called with the rendered text (like `model.summary`);
                default: print to the terminal.
            other: Another table of the same layers and positions (attribution
                patching against exact patching): each cell shows both,
                `this / other`, and the agreement is printed below.
        """
        from rich.console import Console
        from rich.table import Table

        if print_fn is not None and not callable(print_fn):
            raise _validate.fail("print_fn", print_fn, "None or a function taking the text.")
        if other is not None:
            self._check_same(other)
        title = f"gradprobe: {self.method} patching ({self.direction}), effect on the target"
        if other is not None:
            title += f"; each cell: {self.method} / {other.method}"
        rows = []
        for i in range(len(self.layers)):
            cells = []
            for j in range(len(self.positions)):
                cell = f"{self.effects[i, j]:.3g}"
                if other is not None:
                    cell += f" / {other.effects[i, j]:.3g}"
                cells.append(cell)
            rows.append(cells)
        table = Table(title=title)
        table.add_column("layer", no_wrap=True)
        for j, col in enumerate(self._columns()):
            table.add_column(col, justify="right", no_wrap=True,
                             min_width=max([len(col)] + [len(r[j]) for r in rows]))
        for key, cells in zip(self.layers, rows):
            table.add_row(key, *cells)
        width = max(len(k) for k in self.layers) + 4 + sum(
            3 + max([len(c)] + [len(r[j]) for r in rows]) for j, c in enumerate(self._columns()))
        lines = [f"target: clean {np.mean(self.clean):.4g}, corrupted "
                 f"{np.mean(self.corrupted):.4g} (mean over {len(self.clean)} example(s))"]
        if other is not None:
            a = self.agreement(other)
            lines.append(f"agreement: pearson {a.pearson:.3f}, spearman {a.spearman:.3f}, "
                         f"max |difference| {a.max_abs_error:.3g} (largest |effect| "
                         f"{a.scale:.3g})")
        if print_fn is None:
            console = Console()
            if not console.is_terminal:
                console = Console(width=max(console.width, width))
            console.print(table)
            for line in lines:
                console.print(line, highlight=False)
            return
        buf = io.StringIO()
        console = Console(file=buf, width=max(120, width), force_terminal=False,
                          color_system=None)
        console.print(table)
        for line in lines:
            console.print(line, highlight=False)
        print_fn(buf.getvalue().rstrip("\n"))

    def plot(self, path: str | None = None, ax: Any = None, cmap: str = "RdBu_r",
             title: str | None = None) -> Any:
        """A heat map of the effects, layer (rows) x position (columns), with
        matplotlib, centred on 0.

        Args:
            path: Save the figure as a PNG here (optional).
            ax: A matplotlib Axes to draw on (default: a new figure).
            cmap: A diverging matplotlib colormap name.
            title: The title (default: the method and direction).

        Returns:
            The matplotlib Figure.
        """
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(self.positions),
                                            1.0 + 0.35 * len(self.layers)))
        else:
            fig = ax.figure
        lim = float(np.nanmax(np.abs(self.effects))) if self.effects.size else 0.0
        lim = lim or 1.0
        image = ax.imshow(self.effects, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
        ax.set_yticks(range(len(self.layers)), self.layers, fontsize=7)
        ax.set_xticks(range(len(self.positions)), self._columns(), fontsize=7)
        ax.set_xlabel("position")
        ax.set_title(title or f"{self.method} patching ({self.direction})", fontsize=9)
        fig.colorbar(image, ax=ax, label="effect on target")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
        return fig

    def _check_same(self, other: Any) -> None:
        if not isinstance(other, Patching):
            raise _validate.fail("other", other, "a Patching result (from "
                                 "gp.activation_patching or gp.attribution_patching).")
        if other.layers != self.layers or other.positions != self.positions:
            raise GradprobeError(
                "Expected `other` to cover the same layers and positions. Received: layers "
                f"{other.layers} x positions {other.positions}, against {self.layers} x "
                f"{self.positions}. Run both with the same `layers` and `positions`.")

    def agreement(self, other: Patching) -> Agreement:
        """How well this table and `other` (same layers and positions) agree."""
        from gradprobe.attribution.checks import spearman

        self._check_same(other)
        a = np.asarray(self.effects, np.float64).ravel()
        b = np.asarray(other.effects, np.float64).ravel()
        if a.size > 1 and a.std() > 0 and b.std() > 0:
            pearson = float(np.corrcoef(a, b)[0, 1])
        else:
            pearson = float("nan")
        rank = spearman(a, b) if a.size > 1 else float("nan")
        exact = b if other.method == "exact" else a
        return Agreement(pearson, rank, float(np.max(np.abs(a - b))) if a.size else 0.0,
                         float(np.max(np.abs(exact))) if a.size else 0.0)

    def __repr__(self) -> str:
        return (f"Patching(method={self.method!r}, direction={self.direction!r}, "
                f"layers={len(self.layers)}, positions={len(self.positions)})")


# -------------------------------------------------------------- preparation
@dataclass(frozen=True)
class Unit:
    """One row of the table: one call of one layer."""

    site: Site
    call: int  # the call index in the forward pass
    key: str  # the row key: the path, or "path@i" for a layer called several times

    @property
    def wrt(self) -> str:
        return self.key


@dataclass
class Runs:
    """The clean and corrupted runs, resolved for one patching request."""

    model: Any
    request: Any  # engine.Request on the base inputs, target fixed on the clean ones
    base: Any  # the inputs patched into (corrupted for "denoise")
    source: Any  # the inputs the activations come from
    units: list[Unit]
    positions: list[int | None]
    source_acts: dict[str, Any]  # unit key -> activation of the source run
    clean: np.ndarray
    corrupted: np.ndarray
    n: int
    direction: str


def _per_example(value: Any, n: int) -> np.ndarray:
    v = np.asarray(to_numpy(value), np.float64)
    if v.shape != (n,):
        raise GradprobeError(
            "Expected `target` to give one value per example for patching (an int class, "
            "per-example classes, 'predicted', gp.at(...), a loss function or a callable "
            f"returning shape ({n},)). Received: a target of shape {v.shape} (a scalar "
            "summed over the batch cannot tell the patched variants apart).")
    return v


def _record(model: Any, x: Any, tgt: Any, sites: list[Site], output: Any,
            training: bool) -> tuple[dict[tuple[int, int], Any], Hooks, Any]:
    """One forward pass recording every call of the selected layers; returns
    `({(layer id, call): output}, hooks, target value)`."""
    hooks = Hooks()
    found: dict[tuple[int, int], Any] = {}
    for site in sites:
        def keep(layer: Any, index: int, outputs: Any, site: Site = site) -> Any:
            found[(id(layer), index)] = ops.stop_gradient(
                _sites.single_output(site, outputs, "layers"))
            return outputs

        hooks.add(site.layer, site.call, keep)
    with _sites.installed(model, hooks):
        ev = evaluate(model, x, tgt, output=output, training=training)
    _sites.check_calls(sites, hooks, lambda s: f"layers ({s.requested!r})")
    return found, hooks, ev.value


def _positions(value: Any) -> Any:
    if value is None or isinstance(value, str) and value == "all":
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return [int(value)]
    if isinstance(value, Sequence) and not isinstance(value, str) and value and all(
            isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in value):
        return [int(p) for p in value]
    raise _validate.fail("positions", value, "None (patch each activation whole), 'all' (each "
                         "position along axis 1, the sequence axis) or a list of positions.")


def _same_structure(clean: Any, corrupted: Any, n: int) -> None:
    a, b = keras.tree.flatten(clean), keras.tree.flatten(corrupted)
    shapes_a = [tuple(t.shape) for t in a]
    shapes_b = [tuple(t.shape) for t in b]
    if len(a) != len(b) or shapes_a != shapes_b:
        raise GradprobeError(
            "Expected `corrupted` to have the structure and shapes of `clean` (the same "
            f"prompts, corrupted). Received: corrupted shapes {shapes_b}, clean shapes "
            f"{shapes_a}.")


def prepare_runs(model: Any, clean: Any, corrupted: Any, target: Any, layers: Any,
                 positions: Any, direction: str, output: Any, training: bool) -> Runs:
    """Validates a patching request, runs the clean and corrupted inputs once
    each (recording the source activations), and lists the table's rows."""
    _validate.model(model)
    _validate.flag("training", training)
    _validate.choice("direction", direction, _DIRECTIONS,
                     "'denoise' (clean activations patched into the corrupted run) or "
                     "'noise' (corrupted activations patched into the clean run)")
    positions = _positions(positions)
    request = engine.resolve_request(model, clean, target, output=output,
                                     training=training).fixed()
    x_corr = prepare_inputs(model, corrupted)
    n = batch_size(request.x)
    _same_structure(request.x, x_corr, n)
    sites = _sites.resolve_sites(model, layers, "layers")
    acts_clean, hooks, t_clean = _record(model, request.x, request.target, sites, output,
                                         training)
    acts_corr, _, t_corr = _record(model, x_corr, request.target, sites, output, training)
    units: list[Unit] = []
    seen: set[tuple[int, int]] = set()
    for site in sites:
        ran = hooks.seen[id(site.layer)]
        for i in range(ran) if site.call is None else [site.call]:
            if (id(site.layer), i) in seen:
                continue
            seen.add((id(site.layer), i))
            units.append(Unit(site, i, site.path if ran == 1 else f"{site.path}@{i}"))
    if direction == "denoise":
        base, source, acts_source = x_corr, request.x, acts_clean
    else:
        base, source, acts_source = request.x, x_corr, acts_corr
    source_acts = {u.key: acts_source[(id(u.site.layer), u.call)] for u in units}
    positions = [None] if positions is None else _check_positions(units, source_acts, positions)
    return Runs(model, dataclasses.replace(request, x=base), base, source, units, positions,
                source_acts, _per_example(t_clean, n), _per_example(t_corr, n), n, direction)


def _check_positions(units: list[Unit], acts: dict[str, Any], positions: Any) -> list[int]:
    steps = set()
    for u in units:
        shape = tuple(acts[u.key].shape)
        if len(shape) < 3:
            raise GradprobeError(
                f"Expected every layer in `layers` to have a sequence axis (outputs of shape "
                f"(batch, positions, ...)) when `positions` is given. Received: layer "
                f"{u.key!r} with output shape {shape}. Select only sequence layers, or pass "
                "positions=None to patch whole activations.")
        steps.add(shape[1])
    if positions == "all":
        if len(steps) != 1:
            raise GradprobeError(
                "positions='all' needs the same number of positions in every selected layer; "
                f"they have {sorted(steps)}. Pass a list of positions.")
        return list(range(steps.pop()))
    shortest = min(steps)
    bad = [p for p in positions if not -shortest <= p < shortest]
    if bad:
        raise _validate.fail("positions", positions, f"positions within the {shortest} "
                             f"positions of the selected layers; {bad} are not.")
    return [p % shortest for p in positions]


# ------------------------------------------------------------ exact patching
def _tile(x: Any, reps: int) -> Any:
    def one(t: Any) -> Any:
        return ops.tile(t, [reps] + [1] * (len(t.shape) - 1))

    return keras.tree.map_structure(one, x)


def _patch_action(unit: Unit, mask: np.ndarray, source: Any, reps: int) -> Any:
    """Writes `source` (one row per example) into the rows and positions of
    `mask` (one row per patched row of the stacked batch)."""
    def action(layer: Any, index: int, outputs: Any) -> Any:
        out = _sites.single_output(unit.site, outputs, "layers")
        m = mask.reshape(mask.shape + (1,) * (len(out.shape) - mask.ndim))
        tiled = ops.cast(ops.tile(source, [reps] + [1] * (len(out.shape) - 1)), out.dtype)
        new = ops.where(ops.convert_to_tensor(m), tiled, out)
        if isinstance(outputs, (list, tuple, dict)):
            return keras.tree.pack_sequence_as(outputs, [new])
        return new

    return action


def exact_effects(runs: Runs, output: Any, training: bool, batch_size: int | None
                  ) -> tuple[np.ndarray, int]:
    """`(per_example effects (units, positions, n), forward passes)`."""
    n, units, positions = runs.n, runs.units, runs.positions
    variants = [(u, j) for u in range(len(units)) for j in range(len(positions))]
    # each pass also runs the base inputs unpatched (its last n rows): an effect is a
    # difference within one pass, so an activation that changes nothing gives 0
    per = max(1, batch_size // n - 1) if batch_size is not None else len(variants)
    out = np.zeros((len(units), len(positions), n))
    passes = 0
    model, tgt = runs.model, runs.request.target
    for start in range(0, len(variants), per):
        chunk = variants[start:start + per]
        reps = len(chunk) + 1
        hooks = Hooks()
        for ui, unit in enumerate(units):
            rows = [k for k, (u, _) in enumerate(chunk) if u == ui]
            if not rows:
                continue
            steps = tuple(runs.source_acts[unit.key].shape)[1] if positions != [None] else 1
            mask = np.zeros((reps, steps), bool)
            for k in rows:
                p = positions[chunk[k][1]]
                mask[k, slice(None) if p is None else p] = True
            mask = np.repeat(mask, n, axis=0)
            if positions == [None]:
                mask = mask[:, 0]
            hooks.add(unit.site.layer, unit.call,
                      _patch_action(unit, mask, runs.source_acts[unit.key], reps))
        x = _tile(runs.base, reps)
        rows_target = tgt.take(np.tile(np.arange(n), reps))
        with _sites.installed(model, hooks):
            ev = evaluate(model, x, rows_target, output=output, training=training)
        passes += 1
        values = _per_example(ev.value, n * reps).reshape(reps, n)
        for k, (u, j) in enumerate(chunk):
            out[u, j] = values[k] - values[-1]
    return out, passes


def activation_patching(model: keras.Model, clean: Any, corrupted: Any, target: Any,
                        layers: Any = "*", *, positions: Any = None,
                        direction: str = "denoise", output: Any = None,
                        training: bool = False, batch_size: int | None = 256) -> Patching:
    """Exact activation patching: the effect on `target` of patching each selected
    activation from one run into the other.

    For each selected layer call (and, with `positions`, each position along the
    activation's axis 1, the sequence axis), the base inputs are run again with
    that activation taken from the source run; the effect is
    `target(patched) - target(base)`, per example and averaged. `"denoise"`
    (default) patches clean activations into the corrupted run (which
    activations restore the clean behaviour); `"noise"` patches corrupted
    activations into the clean run. A `"predicted"` target is fixed to each
    example's class on the clean inputs. The variants are stacked along the
    batch axis: `batch_size` rows per forward pass.

    Args:
        model: A Keras 3 model of any kind.
        clean: The clean inputs (what `model(...)` accepts).
        corrupted: The corrupted inputs, same structure and shapes.
        target: A per-example target, as in `gp.gradients` (class index,
            per-example classes, `"predicted"`, `gp.at(...)`, `gp.loss(...)`,
            a function returning one value per example).
        layers: Selectors as in `wrt=` (names, `"name@i"`, patterns; default
            `"*"`, every leaf layer). A layer called several times gives one
            row per call.
        positions: `None` (each activation whole), `"all"` or a list of
            positions along axis 1 of every selected activation (the sequence
            axis of `(batch, steps, ...)` outputs; attention scores, `(batch,
            heads, query, key)`, have the heads there).
        direction: `"denoise"` or `"noise"`.
        output: As in `gp.gradients`.
        training: Passed to the model (state updates are discarded).
        batch_size: Most rows per forward pass ((variants + 1) x examples: each
            pass also runs the base inputs unpatched, and effects are differences
            within one pass); `None`: the whole sweep in one pass.

    Returns:
        A `Patching` table: `effects`, `table()`, `plot()`, `agreement(other)`.

    Example:

    >>> import keras, numpy as np
    >>> import gradprobe as gp
    >>> model = keras.Sequential([keras.Input((3,)),
    ...                           keras.layers.Dense(4, name="hidden"),
    ...                           keras.layers.Dense(2, name="out")])
    >>> clean, corrupted = np.ones((2, 3), "float32"), np.zeros((2, 3), "float32")
    >>> p = gp.activation_patching(model, clean, corrupted, target=0)
    >>> p.layers, p.effects.shape
    (['hidden', 'out'], (2, 1))
    >>> bool(np.allclose(p.recovered, 1.0, atol=1e-5))   # either layer carries everything
    True
    """
    batch_size = _validate.optional_count("batch_size", batch_size,
                                          "the most rows of one forward pass")
    runs = prepare_runs(model, clean, corrupted, target, layers, positions, direction, output,
                        training)
    per_example, passes = exact_effects(runs, output, training, batch_size)
    return Patching("exact", direction, [u.key for u in runs.units], runs.positions,
                    per_example.mean(axis=2), per_example, runs.clean, runs.corrupted,
                    forward_passes=passes + 2)
