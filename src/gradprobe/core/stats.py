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


VANISHING = 1e-2
EXPLODING = 1e3
WINDOW = 3


def diagnose(
    stats: Mapping[str, dict],
    kinds: Mapping[str, str],
    arrays: Mapping[str, np.ndarray] | None = None,
    activations: Mapping[str, np.ndarray] | None = None,
    *,
    vanishing: float = VANISHING,
    exploding: float = EXPLODING,
    window: int = WINDOW,
    skip_dead: Sequence[str] = (),
    heads: Sequence[str] = (),
) -> list[Finding]:
    """Findings over sources given in forward order.

    Vanishing and exploding gradients are judged by a ratio across depth, within
    one model and target: each judged source's *size* is divided by the median
    size of the `window` judged sources of the same kind that are nearest the
    target among those after it in forward order (where the gradient enters the
    network). Activations are compared with activations, weights with weights:

    - an activation's size is the sum of |gradient| over its entries (the L1
      norm, over the whole batch). Unlike the RMS or the L2 norm it does not
      shrink through pooling: a global average over H×W positions divides each
      entry by H×W but the sum is unchanged, so the first layers of a CNN are
      not mistaken for vanishing ones.
    - a weight's size is the RMS of its non-zero gradient entries (zeros are
      embedding rows absent from the batch or dead units, reported as `"dead"`).
      Only kernel-like weights are judged: rank >= 2 and not named `bias`.
      Biases and normalisation scales/offsets are sums of the activation
      gradient that can cancel exactly (a `Dense` bias before
      `BatchNormalization` in training, the key bias of attention), so their
      size says nothing about depth.
    - inputs (kind `"input"`) and the sources in `heads` (the layer producing
      the selected output and its weights, whose gradient is set by the target
      itself) are neither judged nor used as a reference.

    Measured on untrained Keras models (default initialisers): healthy CNNs,
    residual, batch-normalised, attention and embedding models stay within
    0.1x to 12x of the reference; a 10-layer sigmoid MLP reaches 1e-5 and a
    deep linear stack with weights 4x too large 1e4 and more.

    Args:
        stats: key -> `tensor_stats` dict, in forward order. The activation
            ratio uses its `mean_abs`, the weight ratio its `norm` and
            `zero_fraction`.
        kinds: key -> `"activation"`, `"weight"` or `"input"`.
        arrays: key -> gradient array, for the dead-unit check (optional).
        activations: key -> forward value, to tell never-active units apart.
        vanishing: A judged source whose size is below this fraction of its
            reference (the median described above) is reported as vanishing.
            A ratio in (0, 1); default 1e-2.
        exploding: Likewise above this multiple of its reference: exploding. A
            ratio > 1; default 1e3.
        window: How many same-kind sources nearest the target (after the judged
            one) form its reference; default 3. The last judged source of each
            kind is the reference of the others and is never flagged.
        skip_dead: Keys not checked for dead units (the layer producing the
            selected output, whose zero-gradient units are simply other classes).
            Dead units are looked for in activations and kernel-like weights
            only (a dead unit zeroes its kernel column too; a bias can receive
            an exact zero without any dead unit, e.g. before BatchNormalization).
        heads: Keys left out of the vanishing/exploding comparison (see above).

    Returns:
        A list of `Finding`, in forward order. A vanishing or exploding finding's
        `value` is the ratio to the reference.
    """
    from gradprobe.core import _validate

    _validate.thresholds({"vanishing": vanishing, "exploding": exploding},
                         ("vanishing", "exploding"))
    if vanishing >= 1:
        raise _validate.fail("vanishing", vanishing, "a ratio below 1: a source whose gradient "
                             "is smaller than this fraction of its reference is vanishing "
                             f"(default {VANISHING:g}).")
    if exploding <= 1:
        raise _validate.fail("exploding", exploding, "a ratio above 1: a source whose gradient "
                             "is larger than this multiple of its reference is exploding "
                             f"(default {EXPLODING:g}).")
    window = _validate.count("window", window, "the number of sources nearest the target "
                             "that form the reference of each source")
    findings: list[Finding] = []
    keys = list(stats)
    heads = set(heads)
    size = {k: _magnitude(stats[k], kinds.get(k)) for k in keys}
    judged = [k for k in keys if k not in heads and _judged(k, stats[k], kinds.get(k))]
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
        if k in judged:
            f = _depth_ratio(k, judged, stats, kinds, size, vanishing, exploding, window)
            if f is not None:
                findings.append(f)
        if arrays is not None and k not in skip_dead and (
                kinds.get(k) == "activation" or _judged(k, s, kinds.get(k))):
            act = None if activations is None else activations.get(k)
            f = _dead_units(k, arrays[k], act, per_example=kinds.get(k) == "activation")
            if f is not None:
                findings.append(f)
    return findings


def _judged(key: str, s: dict, kind: str | None) -> bool:
    """Whether a source takes part in the vanishing/exploding comparison."""
    if kind == "activation":
        return True
    if kind != "weight" or len(s["shape"]) < 2:
        return False
    name = key.replace("/", ".").rsplit(".", 1)[-1]  # "dense.bias", "model/dense/bias"
    return "bias" not in name.lower()


def _magnitude(s: dict, kind: str | None) -> float:
    """The size compared across depth: sum |g| for an activation, RMS of the
    non-zero entries for a weight (0 when nothing is finite and non-zero)."""
    n = _size(s)
    if kind == "activation":
        return float(s["mean_abs"]) * n
    nonzero = n * (1.0 - s["zero_fraction"])
    return float(s["norm"]) / np.sqrt(nonzero) if nonzero >= 1 else 0.0


def _depth_ratio(k: str, judged: list[str], stats: Mapping[str, dict],
                 kinds: Mapping[str, str], size: Mapping[str, float], vanishing: float,
                 exploding: float, window: int) -> Finding | None:
    kind = kinds.get(k)
    later = [j for j in judged[judged.index(k) + 1:]
             if kinds.get(j) == kind and stats[j]["nonfinite"] == 0 and size[j] > 0]
    ref = later[-window:]
    if not ref:
        return None
    median = float(np.median([size[j] for j in ref]))
    ratio = size[k] / median
    what = "sum |g|" if kind == "activation" else "RMS (non-zero entries)"
    names = ", ".join(ref)
    where = (f"the median of the {len(ref)} {kind}(s) nearest the target ({median:.3g}: "
             f"{names})")
    if ratio < vanishing:
        return Finding("vanishing", k, f"{k}: vanishing gradient: its {what} {size[k]:.3g} "
                       f"is {ratio:.2g} times {where}; threshold vanishing={vanishing:g}.",
                       ratio)
    if ratio > exploding:
        return Finding("exploding", k, f"{k}: exploding gradient: its {what} {size[k]:.3g} "
                       f"is {ratio:.3g} times {where}; threshold exploding={exploding:g}.",
                       ratio)
    return None


def _size(s: dict) -> int:
    return int(np.prod(s["shape"])) if s["shape"] else 1


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
