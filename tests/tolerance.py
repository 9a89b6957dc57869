"""Tolerances that hold on any CPU, kernel library (oneDNN on or off) and thread count.

Two computations of the same float32 gradient (gradprobe's and a hand-written
tape, a batch and one of its examples, a compiled and an eager call) may sum in
other orders, with other kernels: they agree to a few units of the dtype's
precision *relative to the magnitude of the values summed*, not relative to each
entry (an entry near zero, the result of a cancellation, has a large relative
error and is no sign of a bug). So every comparison here is

    max |actual - expected|  <=  factor * eps(dtype) * scale

with `scale` the largest |expected| (or the magnitude of the terms `expected`
is the sum of, passed explicitly), and `factor` a small multiple for the size
and depth of the computation. A real bug (a wrong or missing term, an
unscaled loss, a wrong example) is off by O(1) of the scale, several orders of
magnitude above any tolerance given here.

Imports no backend library: usable from tests/ and tests/backends/ on every backend.
"""

from __future__ import annotations

import numpy as np

# Unit roundoff (machine epsilon) of each floating dtype, by name (numpy has no bfloat16).
EPS = {
    "float16": float(np.finfo(np.float16).eps),  # 9.8e-4
    "bfloat16": 2.0 ** -7,  # 7.8e-3
    "float32": float(np.finfo(np.float32).eps),  # 1.2e-7
    "float64": float(np.finfo(np.float64).eps),  # 2.2e-16
}

# The default multiple of eps: room for summation-order differences in the small
# models of this suite (widths up to ~100, a few layers). float32: 7.6e-6.
FACTOR = 64


def eps(dtype) -> float:
    """The machine epsilon of `dtype` (a name, a NumPy/Keras dtype or an array's dtype)."""
    name = getattr(dtype, "name", None)  # np/tf/jax dtypes
    if not isinstance(name, str):
        try:
            name = np.dtype(dtype).name  # np.float32, "f4"
        except TypeError:
            name = str(dtype)
    name = name.rsplit(".", 1)[-1]  # "torch.float32"
    name = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}.get(name, name)
    if name not in EPS:
        raise ValueError(f"No tolerance for dtype {dtype!r}; expected one of {sorted(EPS)}.")
    return EPS[name]


def tolerance(dtype, factor: float = FACTOR) -> float:
    """`factor` times the machine epsilon of `dtype`: a relative error against the
    largest magnitude compared."""
    return factor * eps(dtype)


def assert_close(actual, expected, dtype=None, factor: float = FACTOR, *, rtol=None,
                 scale=None, what: str = "", tiny: float = 1e-30):
    """Asserts max |actual - expected| <= tol * scale.

    Args:
        actual, expected: arrays (anything `np.asarray` takes) of the same shape.
        dtype: the dtype the values were computed in; tol = factor * eps(dtype).
        factor: the multiple of eps (the size/depth of the computation).
        rtol: an explicit relative tolerance instead of `dtype` and `factor`
            (for float64 oracles, whose error is set by the oracle, e.g. a finite difference).
        scale: the magnitude the error is relative to; defaults to max |expected|.
            Pass the magnitude of the terms when `expected` is a difference or
            sum of larger values (e.g. a completeness gap).
        what: a label for the failure message.
        tiny: the smallest scale (an all-zero `expected` is compared absolutely at tol * tiny).
    """
    if rtol is None:
        if dtype is None:
            raise TypeError("assert_close needs `dtype` (with `factor`) or `rtol`.")
        rtol = tolerance(dtype, factor)
    if hasattr(actual, "detach"):  # a torch.Tensor
        actual = actual.detach().cpu().numpy()
    if hasattr(expected, "detach"):
        expected = expected.detach().cpu().numpy()
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if not e.size:
        return
    if scale is None:
        scale = float(np.max(np.abs(e)))
    scale = max(float(scale), tiny)
    diff = np.abs(a - e)
    err = float(np.max(diff))
    if not err <= rtol * scale:  # also fails on NaN
        worst = tuple(int(i) for i in np.unravel_index(int(np.nanargmax(diff)) if not np.isnan(diff).all() else 0,
                                 diff.shape))
        raise AssertionError(
            f"{what}: max abs error {err:.3g} > tol {rtol:.3g} x scale {scale:.3g} "
            f"(= {rtol * scale:.3g}); relative error {err / scale:.3g}; worst at {worst}: "
            f"actual {a[worst]!r}, expected {e[worst]!r}")


# The float32 tolerance for the suite's small models, for `oracle.assert_close(a, e, F32)`.
F32 = tolerance("float32")
