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
    fraction of entries that are exactly zero.
    """
    g = np.asarray(g)
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
    window: int = 3,
    skip_dead: Sequence[str] = (),
) -> list[Finding]:
    """Findings over sources given in forward order.

    Args:
        stats: key -> `tensor_stats` dict, in forward order.
        kinds: key -> `"activation"`, `"weight"` or `"input"`.
        arrays: key -> gradient array, for the dead-unit check (optional).
        activations: key -> forward value, to tell never-active units apart.
        vanishing: A source whose gradient RMS is below this fraction of the
            median RMS of its neighbours (same kind, `window` on each side) is
            reported as vanishing.
        exploding: Likewise above this multiple: exploding.
        window: How many neighbours on each side are compared.
        skip_dead: Keys not checked for dead units (the model's output layer,
            whose zero-gradient channels are simply other classes).

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
        i = group.index(k)
        neighbours = [rms[j] for j in group[max(0, i - window): i] + group[i + 1: i + 1 + window]
                      if stats[j]["nonfinite"] == 0 and rms[j] > 0]
        if len(neighbours) >= 2:
            median = float(np.median(neighbours))
            ratio = rms[k] / median if median > 0 else 1.0
            if ratio < vanishing:
                findings.append(Finding(
                    "vanishing", k,
                    f"{k}: vanishing gradient: its RMS {rms[k]:.3g} is {ratio:.2g} times the "
                    f"median of its neighbouring {kinds.get(k)}s ({median:.3g}).", ratio))
            elif ratio > exploding:
                findings.append(Finding(
                    "exploding", k,
                    f"{k}: exploding gradient: its RMS {rms[k]:.3g} is {ratio:.3g} times the "
                    f"median of its neighbouring {kinds.get(k)}s ({median:.3g}).", ratio))
        if arrays is not None and kinds.get(k) == "activation" and k not in skip_dead:
            f = _dead_units(k, arrays[k], None if activations is None else activations.get(k))
            if f is not None:
                findings.append(f)
    return findings


def _size(s: dict) -> int:
    return int(np.prod(s["shape"])) if s["shape"] else 1


def _rms(s: dict) -> float:
    n = _size(s)
    return s["norm"] / np.sqrt(n) if n else 0.0


def _dead_units(key: str, g: np.ndarray, act: np.ndarray | None) -> Finding | None:
    g = np.asarray(g)
    if g.ndim < 2 or g.shape[-1] < 2:
        return None
    axes = tuple(range(g.ndim - 1))
    zero = np.all(g == 0, axis=axes)
    dead = int(np.count_nonzero(zero))
    if dead == 0:
        return None
    n = g.shape[-1]
    quiet = ""
    if act is not None and np.asarray(act).shape == g.shape:
        inactive = np.all(np.asarray(act) == 0, axis=axes) & zero
        if np.count_nonzero(inactive):
            quiet = f" ({int(np.count_nonzero(inactive))} of them output 0 for every example)"
    return Finding(
        "dead", key,
        f"{key}: {dead} of {n} units/channels ({dead / n:.0%}) receive exactly zero gradient "
        f"for every example{quiet}: dead units.", dead / n)
