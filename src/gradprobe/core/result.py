"""The `Gradients` result: a read-only mapping from source key to gradient."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras
import numpy as np

from gradprobe import backends
from gradprobe.core import _validate
from gradprobe.core.stats import Finding, diagnose, tensor_stats
from gradprobe.errors import GradprobeError, closest, quoted


class GradprobeKeyError(GradprobeError, KeyError):
    """A key that is not in a result (also a `KeyError`, as a mapping should raise)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class _Keys:
    """The keys of one result and the one rule that resolves a name to one of them
    (`Gradients.resolve`), shared by the result and its views. It holds no tensor
    and no reference to the result: a view kept alive does not keep the result's
    gradients alive, and a result is freed as soon as its last reference goes
    (no reference cycle left to the garbage collector)."""

    __slots__ = ("order", "kinds", "aliases")

    def __init__(self, order: list[str], kinds: dict[str, str], aliases: dict[str, list]):
        self.order = tuple(order)
        self.kinds = kinds
        self.aliases = {a: ks for a, ks in aliases.items() if a not in kinds}

    def resolve(self, key: str) -> str:
        if key in self.kinds:
            return key
        keys = self.aliases.get(key)
        if keys is None and isinstance(key, str):
            keys = self._by_suffix(key)
        if keys and len(keys) == 1:
            return keys[0]
        if keys:
            raise GradprobeKeyError(
                f"{key!r} selected {len(keys)} sources; index one of them: {quoted(keys)}.")
        hint = closest(str(key), list(self.order) + list(self.aliases))
        raise GradprobeKeyError(
            f"No gradient for {key!r}." + (f" Did you mean {quoted(hint)}?" if hint else "")
            + f" The keys are: {quoted(self.order)}.")

    def _by_suffix(self, name: str) -> list[str] | None:
        """Keys that `name` names as a layer path suffix, as selectors do: `"d1"`
        for `"inner/d1"`, `"d1.kernel"` for `"inner/d1.kernel"` (also each
        call `"inner/d1@i"` of a layer called several times)."""
        def names(k: str) -> bool:
            if k.endswith("/" + name):
                return True
            base = k.split("@")[0]  # "inner/d1@1" -> "inner/d1", for name "d1"
            return "@" in k and "@" not in name and (base == name or base.endswith("/" + name))

        return [k for k in self.order if names(k)] or None


class _View(Mapping):
    """A read-only view of one part of a result (`activations`, `kinds`,
    `variables`) that takes the same keys as the result itself (`Gradients.resolve`):
    `g.activations["d1"]` works wherever `g["d1"]` does."""

    __slots__ = ("_data", "_keys", "_what")

    def __init__(self, data: dict[str, Any], keys: _Keys, what: str):
        self._data, self._keys, self._what = data, keys, what

    def __getitem__(self, key: str) -> Any:
        if key in self._data:
            return self._data[key]
        resolved = self._keys.resolve(key)
        if resolved not in self._data:
            raise GradprobeKeyError(
                f"No {self._what} for {key!r} ({resolved!r}, a {self._keys.kinds[resolved]} "
                f"key); the {self._what} keys are: {quoted(self._data)}.")
        return self._data[resolved]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)


class Gradients(Mapping):
    """Gradients of one target, keyed by source, in forward order.

    Keys are layer paths (`"dense"`, `"encoder/conv"`), with `"@i"` for the
    i-th call of a layer called more than once, weight keys (`"dense.kernel"`),
    and `"inputs"` (or `"inputs:0"`, `"inputs:name"` for several inputs). The
    selector you passed in `wrt` also works as a key when it named exactly one
    source (e.g. `result["lstm.kernel"]` for `"lstm/lstm_cell.kernel"`).

    Attributes:
        activations: key -> forward value of each captured activation or input.
        target: The target's value (one per example where the target is per example).
        outputs: The model's outputs from the same forward pass.
        kinds: key -> `"activation"`, `"weight"` or `"input"`.
        variables: key -> the variable object, for weight keys.
        unconnected: Keys the target does not depend on (zero gradients; only
            with `unconnected="zero"`).
        skipped: Layers a pattern matched that had nothing to differentiate
            (never called, or integer outputs), with the reason.
    """

    def __init__(self, grads: dict[str, Any], meta: dict[str, Any], values: dict[str, Any],
                 outputs: Any, target: Any, variables: Mapping[str, Any] | None = None):
        order = meta["order"]
        variables = variables or {}
        self._grads = {k: grads[k] for k in order}
        self._keys = keys = _Keys(order, {k: meta["kinds"][k] for k in order},
                                  meta.get("aliases", {}))
        self.variables: Mapping[str, Any] = _View(
            {k: variables[k] for k in order if k in variables}, keys, "variable")
        self.kinds: Mapping[str, str] = _View(dict(meta["kinds"]), keys, "kind")
        self.activations: Mapping[str, Any] = _View(
            {k: values[k] for k in order if k in values}, keys, "activation")
        self.outputs = outputs
        self.target = target
        self.unconnected: tuple[str, ...] = tuple(meta.get("unconnected", ()))
        self.skipped: tuple[str, ...] = tuple(meta.get("skipped", ()))
        self._output_keys = tuple(meta.get("output_keys", ()))
        self._stats: dict[str, dict] | None = None

    # ------------------------------------------------------------- mapping
    def __getitem__(self, key: str) -> Any:
        if key in self._grads:
            return self._grads[key]
        return self._grads[self.resolve(key)]

    def resolve(self, key: str) -> str:
        """The result key that `key` names: a key itself, the `wrt` selector that
        named exactly one source, or a nested layer's short name (`"d1"` for
        `"inner/d1"`). One rule for every view of the result (the gradients,
        `activations`, `kinds`, `variables`)."""
        return self._keys.resolve(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._grads)

    def __len__(self) -> int:
        return len(self._grads)

    def __repr__(self) -> str:
        items = ", ".join(f"{k!r}: {self.kinds[k]} {backends.static_shape(v)}"
                          for k, v in list(self._grads.items())[:8])
        more = f", ... ({len(self) - 8} more)" if len(self) > 8 else ""
        return f"Gradients({{{items}{more}}})"

    # -------------------------------------------------------------- views
    def numpy(self) -> dict[str, np.ndarray]:
        """The gradients as a dict of NumPy arrays."""
        return {k: _to_numpy(v) for k, v in self._grads.items()}

    def stats(self) -> dict[str, dict]:
        """key -> `shape`, `norm` (L2), `mean_abs`, `max_abs`, `std`,
        `zero_fraction` (exact zeros) and `nonfinite` (NaN/Inf count)."""
        if self._stats is None:
            self._stats = {k: _stats_of(v) for k, v in self._grads.items()}
        return {k: dict(v) for k, v in self._stats.items()}

    def diagnose(self, **thresholds: Any) -> list[Finding]:
        """Plain-language findings: vanishing, exploding, non-finite, all-zero
        gradients and dead units.

        Vanishing and exploding are judged across depth, within this result:
        each activation is compared with the activations nearest the target
        (its sum of |gradient| against the median of the `window` activations
        closest to the target after it), each kernel-like weight with the
        weights nearest the target (RMS of its non-zero entries, same median).
        Inputs, biases, normalisation scales/offsets and the layer producing
        the selected output are not judged. See `gradprobe.core.stats.diagnose`.

        Args:
            **thresholds: `vanishing=1e-2` (a source below this fraction of its
                reference is vanishing), `exploding=1e3` (above this multiple:
                exploding), `window=3` (how many sources nearest the target form
                the reference).

        Returns:
            A list of `Finding` (each prints as its message); empty when all is well.

        Example:

        >>> import keras, numpy as np, gradprobe as gp
        >>> keras.utils.set_random_seed(0)
        >>> model = keras.Sequential([keras.Input((16,))] + [
        ...     keras.layers.Dense(32, activation="sigmoid") for _ in range(10)]
        ...     + [keras.layers.Dense(3)])
        >>> x = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
        >>> g = gp.gradients(model, x, 0, "*")
        >>> sorted({f.kind for f in g.diagnose()})
        ['vanishing']
        """
        for name, value in thresholds.items():
            if name == "window":
                continue  # an integer, checked by `diagnose`
            _validate.thresholds({name: value}, ("vanishing", "exploding", "window"))
        arrays, acts = _unit_views(self._grads, self.activations, self.kinds)
        return diagnose(self.stats(), self.kinds, arrays, acts,
                        skip_dead=self._output_keys, heads=self._output_keys, **thresholds)

    def summary(self, print_fn: Callable[[str], Any] | None = None,
                findings: bool = True) -> None:
        """Prints the statistics as a table, in forward order, then the findings.

        Args:
            print_fn: Like Keras' `model.summary(print_fn=...)`: called with the
                rendered text. Default: print to the terminal with rich.
            findings: Also print `diagnose()` below the table.
        """
        from rich.console import Console
        from rich.table import Table

        if print_fn is not None and not callable(print_fn):
            raise _validate.fail("print_fn", print_fn, "None or a function taking the text "
                                                       "(like model.summary(print_fn=...)).")
        _validate.flag("findings", findings)

        table = Table(title="gradprobe: gradients by source (forward order)")
        stats = self.stats()
        shown = shorten_keys(list(stats))
        for col, justify in [("source", "left"), ("kind", "left"), ("shape", "left"),
                             ("norm", "right"), ("mean |g|", "right"), ("max |g|", "right"),
                             ("std", "right"), ("zeros", "right"), ("non-finite", "right")]:
            # the source column is never cut by rich: shorten_keys already made it fit
            table.add_column(col, justify=justify, no_wrap=col == "source",
                             min_width=max(map(len, shown.values()), default=6)
                             if col == "source" else None)
        for key, s in stats.items():
            table.add_row(shown[key], self.kinds[key], str(s["shape"]), f"{s['norm']:.4g}",
                          f"{s['mean_abs']:.4g}", f"{s['max_abs']:.4g}", f"{s['std']:.4g}",
                          f"{s['zero_fraction']:.1%}", str(s["nonfinite"]))
        found = self.diagnose() if findings else []
        if print_fn is None:
            console = Console()
            if not console.is_terminal:
                console = Console(width=max(console.width, 130))
            console.print(table)
            for f in found:
                console.print(f"[yellow]finding[/yellow] {f.message}", highlight=False)
            return
        buf = io.StringIO()
        console = Console(file=buf, width=140, force_terminal=False, color_system=None)
        console.print(table)
        for f in found:
            console.print(f"finding {f.message}", highlight=False)
        print_fn(buf.getvalue().rstrip("\n"))


def shorten_keys(keys: list[str], limit: int = 48) -> dict[str, str]:
    """key -> display name, shortened in the middle when longer than `limit`.

    Whole path segments are dropped from the middle (`"gemma_backbone/…/query_dense/
    einsum.kernel"`: the root and the most specific end are kept), and two keys
    never display the same: where short forms collide, the segments that tell
    the keys apart are put back (`"…/transformer_layer_0/…"`).
    """
    segments = {k: k.split("/") for k in keys}
    keep: dict[str, set[int]] = {}
    for k, segs in segments.items():
        n = len(segs)
        kept = set(range(n)) if len(k) <= limit else {0, n - 1}
        for j in range(n - 2, 0, -1):
            if len(_join(segs, kept | {j})) > limit:
                break
            kept.add(j)
        keep[k] = kept

    shown = {k: _join(segments[k], keep[k]) for k in keys}
    for _ in range(max((len(v) for v in segments.values()), default=0) + 1):
        groups: dict[str, list[str]] = {}
        for k, v in shown.items():
            groups.setdefault(v, []).append(k)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            break
        for group in clashes:
            for k in group:
                segs = segments[k]
                for other in group:
                    if other == k:
                        continue
                    o = segments[other]
                    differ = next((j for j in range(len(segs))
                                   if j >= len(o) or segs[j] != o[j]), None)
                    if differ is not None:
                        keep[k].add(differ)
                shown[k] = _join(segs, keep[k])
    if len(set(shown.values())) < len(shown):
        return {k: k for k in keys}
    # still too long (long segment names): cut the longest kept segments in their
    # middle too, unless that would make two rows alike
    fitted = {k: _fit(v, limit) for k, v in shown.items()}
    counts: dict[str, int] = {}
    for v in fitted.values():
        counts[v] = counts.get(v, 0) + 1
    return {k: fitted[k] if counts[fitted[k]] == 1 and fitted[k] not in shown.values()
            or fitted[k] == shown[k] else shown[k] for k in keys}


def _fit(shown: str, limit: int, shortest: int = 12) -> str:
    parts = shown.split("/")
    while len("/".join(parts)) > limit:
        # the last segment (the layer itself, with its variable) is cut last
        long = [i for i, p in enumerate(parts[:-1]) if len(p) > shortest] or \
            [i for i, p in enumerate(parts) if len(p) > shortest]
        if not long:
            break
        i = max(long, key=lambda j: len(parts[j]))
        n = max(shortest, len(parts[i]) - (len("/".join(parts)) - limit))
        head = (n - 1) // 2
        parts[i] = parts[i][:head] + "\u2026" + parts[i][len(parts[i]) - (n - 1 - head):]
    return "/".join(parts)


def _join(segments: list[str], kept: set[int]) -> str:
    parts: list[str] = []
    for j, seg in enumerate(segments):
        if j in kept:
            parts.append(seg)
        elif not parts or parts[-1] != "\u2026":
            parts.append("\u2026")
    return "/".join(parts)


def _to_numpy(x: Any) -> np.ndarray:
    """A gradient or activation of any backend as a NumPy array (PyTorch tensors
    detached and moved to the host, as `keras.ops.convert_to_numpy` does)."""
    if isinstance(x, np.ndarray):
        return x
    if backends.is_functional():
        return keras.ops.convert_to_numpy(x)
    return backends.get().to_numpy(x)


def _reducer(name: str) -> Callable[..., Any] | None:
    """The functional backend's on-device reduction `name` (JAX: `reduced_stats`,
    `unit_activity` for arrays sharded by `keras.distribution`), else `None`."""
    return getattr(backends.get(), name, None) if backends.is_functional() else None


def _stats_of(x: Any) -> dict:
    """`tensor_stats` of one gradient; a gradient sharded over several devices is
    reduced where it lies (`gradprobe.backends.jax_distribution`), not gathered."""
    reduce = _reducer("reduced_stats")
    stats = reduce(x) if reduce is not None else None
    return stats if stats is not None else tensor_stats(_to_numpy(x))


def _unit_views(grads: Mapping[str, Any], values: Mapping[str, Any],
                kinds: Mapping[str, str]) -> tuple[dict, dict]:
    """What `diagnose` reads of the gradients (and activations) to find dead
    units: the arrays themselves, or for a sharded gradient (and its activation)
    a `(1, ..., 1, units)` array of per-unit "any non-zero" flags computed on
    its devices, which gives the same findings."""
    units = _reducer("unit_activity")
    arrays, acts = {}, {}
    for k, g in grads.items():
        reduced = units(g) if units is not None else None
        arrays[k] = reduced if reduced is not None else _to_numpy(g)
        if kinds.get(k) == "activation" and k in values:
            act = units(values[k], always=True) if reduced is not None else None
            acts[k] = act if act is not None else _to_numpy(values[k])
    return arrays, acts
