"""Gradient statistics and plain-language findings, shared by the result object,
the CLI's JSON and the training monitor (same field names everywhere)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

STAT_FIELDS = ("shape", "norm", "mean_abs", "max_abs", "std", "zero_fraction", "nonfinite")


def tensor_stats(g: np.ndarray) -> dict:
    """Statistics of one gradient array.

    `norm` (L2), `mean_abs`, `max_abs` and `std` are computed in float64 over the
    finite entries; `nonfinite` counts NaN and Inf entries; `zero_fraction` is the
    fraction of entries that are exactly zero. float16 and bfloat16 gradients are
    read as float32 first (exactly), so nothing is computed in half precision.
    """
    g = as_float32(g)
    finite_mask = np.isfinite(g)
    finite = g[finite_mask].astype(np.float64)
    size = g.size
    return {
        "shape": tuple(int(d) for d in g.shape),
        "norm": float(np.sqrt(np.sum(finite * finite))) if finite.size else 0.0,
        "mean_abs": float(np.mean(np.abs(finite))) if finite.size else 0.0,
        "max_abs": float(np.max(np.abs(finite))) if finite.size else 0.0,
        "std": float(np.std(finite)) if finite.size else 0.0,
        "zero_fraction": float(np.count_nonzero(g == 0) / size) if size else 0.0,
        "nonfinite": int(size - np.count_nonzero(finite_mask)),
    }


def as_float32(g: object) -> np.ndarray:
    """`g` as a NumPy array, with half-precision floats (float16, bfloat16, which
    NumPy sees as a non-native dtype) widened to float32; exact, as float32 holds
    every half-precision value."""
    g = np.asarray(g)
    if g.dtype.itemsize < 4 and g.dtype.kind not in "biu":
        return g.astype(np.float32)
    return g


@dataclass(frozen=True)
class Finding:
    """One diagnosis: `kind` is `"nonfinite"`, `"vanishing"`, `"exploding"`,
    `"zero"` or `"dead"`; `key` the source; `value` the number behind it."""

    kind: str
    key: str
    message: str
    value: float

    def __str__(self) -> str:
        return self.message


def diagnose(
    stats: Mapping[str, dict],
    kinds: Mapping[str, str],
    arrays: Mapping[str, np.ndarray] | None = None,
    activations: Mapping[str, np.ndarray] | None = None,
    *,
    vanishing: float = 1e-3,
    exploding: float = 1e3,
    skip_dead: Sequence[str] = (),
) -> list[Finding]:
    """Findings over sources given in forward order.

    Args:
        stats: key -> `tensor_stats` dict, in forward order.
        kinds: key -> `"activation"`, `"weight"` or `"input"`.
        arrays: key -> gradient array, for the dead-unit check (optional).
        activations: key -> forward value, to tell never-active units apart.
        vanishing: A source whose gradient RMS is below this fraction of the
            median RMS of the sources of the same kind after it in forward order
            (closer to the target, where the gradient starts) is reported as
            vanishing. The last source of each kind is the reference, never flagged.
        exploding: Likewise above this multiple: exploding.
        skip_dead: Keys not checked for dead units (the layer producing the
            selected output, whose zero-gradient units are simply other classes).

    Returns:
        A list of `Finding`, in forward order.
    """
    findings: list[Finding] = []
    keys = list(stats)
    rms = {k: _rms(stats[k]) for k in keys}
    for k in keys:
        s = stats[k]
        if s["nonfinite"]:
            findings.append(Finding(
                "nonfinite", k,
                f"{k}: {s['nonfinite']} of {_size(s)} gradient entries are NaN or Inf.",
                float(s["nonfinite"])))
            continue
        if _size(s) and s["zero_fraction"] == 1.0:
            findings.append(Finding(
                "zero", k, f"{k}: the gradient is exactly zero everywhere: no signal "
                "reaches it from the target.", 0.0))
            continue
        group = [j for j in keys if kinds.get(j) == kinds.get(k)]
        later = [rms[j] for j in group[group.index(k) + 1:]
                 if stats[j]["nonfinite"] == 0 and rms[j] > 0]
        if later:
            median = float(np.median(later))
            ratio = rms[k] / median
            where = f"the median of the {len(later)} {kinds.get(k)}(s) after it ({median:.3g})"
            if ratio < vanishing:
                findings.append(Finding(
                    "vanishing", k,
                    f"{k}: vanishing gradient: its RMS {rms[k]:.3g} is {ratio:.2g} times "
                    f"{where}.", ratio))
            elif ratio > exploding:
                findings.append(Finding(
                    "exploding", k,
                    f"{k}: exploding gradient: its RMS {rms[k]:.3g} is {ratio:.3g} times "
                    f"{where}.", ratio))
        if arrays is not None and kinds.get(k) in ("activation", "weight") and k not in skip_dead:
            act = None if activations is None else activations.get(k)
            f = _dead_units(k, arrays[k], act, per_example=kinds.get(k) == "activation")
            if f is not None:
                findings.append(f)
    return findings


def _size(s: dict) -> int:
    return int(np.prod(s["shape"])) if s["shape"] else 1


def _rms(s: dict) -> float:
    n = _size(s)
    return s["norm"] / np.sqrt(n) if n else 0.0


def _dead_units(key: str, g: np.ndarray, act: np.ndarray | None,
                per_example: bool) -> Finding | None:
    """Units (last axis) whose gradient is exactly zero everywhere: for an
    activation, at every example and position; for a weight (a kernel's output
    columns, a bias), summed over the batch it was computed on."""
    g = as_float32(g)
    if g.ndim < (2 if per_example else 1) or g.shape[-1] < 2:
        return None
    axes = tuple(range(g.ndim - 1))
    zero = np.all(g == 0, axis=axes)
    dead = int(np.count_nonzero(zero))
    if dead == 0:
        return None
    n = g.shape[-1]
    quiet = ""
    if act is not None and np.shape(act) == g.shape:
        inactive = np.all(as_float32(act) == 0, axis=axes) & zero
        if np.count_nonzero(inactive):
            quiet = f" ({int(np.count_nonzero(inactive))} of them output 0 for every example)"
    where = "for every example" if per_example else "on this batch"
    return Finding(
        "dead", key,
        f"{key}: {dead} of {n} units/channels ({dead / n:.0%}) receive exactly zero gradient "
        f"{where}{quiet}: dead units.", dead / n)
