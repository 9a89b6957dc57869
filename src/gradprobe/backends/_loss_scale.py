"""Loss scaling of float16 backward passes on JAX and PyTorch.

Shared by `gradprobe.backends.jax` and `gradprobe.backends.torch` (each seeds its
own backward pass: a `jax.vjp` pullback, `torch.autograd.grad`'s
`grad_outputs`); the rule is TensorFlow's (`gradprobe.backends.tensorflow.
scaled_gradient`), so a float16 model gets the same gradients on every backend.

A float16 backward pass flushes gradients below ~6e-8 (the smallest subnormal)
to zero and loses precision below ~6e-5. As Keras' `LossScaleOptimizer` does,
the backward pass is seeded with a power of two and the result unscaled in
float32; the power is measured, not guessed: a first backward pass at scale 1
gives the largest source gradient, and the second runs at the power of two that
brings it to about 2**14 (between 2**-14 and 2**15, so that the seed itself is a
normal float16 number; 2**15 when every gradient is zero at scale 1, which is
what a float16 pass gives when all of them underflow). A source whose scaled gradient is not finite (an
intermediate gradient overflowed at that scale) keeps its unscaled one; when
the first pass itself overflowed, the scale is 2**-2 (the largest gradient is
taken as 2**16). bfloat16 has float32's exponent range: it needs no scaling.

Written with `keras.ops` only, so the same code runs on JAX arrays (also
traced, under `jax.jit` and `jax.vmap`) and PyTorch tensors. Nothing branches on
values.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

HEADROOM = 2.0 ** 14  # the largest source gradient is scaled to about this (float16 max 65504)
MIN_EXPONENT, MAX_EXPONENT = -14.0, 15.0
_OVERFLOWED = 2.0 ** 16  # the largest gradient assumed when the first pass overflowed


def scale_for(first: list) -> Any:
    """The loss scale (a float32 scalar, a power of two) for the gradients `first`
    of a backward pass at scale 1 (`None` for a source without one); `None`
    when no source has a gradient with any entry (nothing to scale)."""
    peaks = [ops.max(ops.abs(ops.cast(g, "float32"))) for g in first
             if g is not None and int(np.prod(tuple(g.shape), dtype=np.int64)) > 0]
    if not peaks:
        return None
    peak = peaks[0]
    for p in peaks[1:]:
        peak = ops.maximum(peak, p)
    peak = ops.where(ops.isfinite(peak), peak, _OVERFLOWED)
    # (every gradient zero at scale 1 may be every gradient underflowed: the largest scale)
    peak = ops.where(peak > 0, peak, HEADROOM * 2.0 ** -MAX_EXPONENT)
    exponent = ops.clip(ops.floor(ops.log2(HEADROOM / peak)), MIN_EXPONENT, MAX_EXPONENT)
    return ops.cast(ops.power(2.0, exponent), "float32")


def seed(objective: Any, scale: Any) -> Any:
    """The cotangent of the objective for the scaled backward pass, in its dtype."""
    return ops.ones_like(objective) * ops.cast(scale, objective.dtype)


def unscale(first: list, second: list, scale: Any) -> list:
    """The float32 gradients: each of `second` (the pass at `scale`) divided by
    `scale`, or the matching one of `first` (the pass at scale 1) where the
    scaled one has a non-finite entry. `None` (no gradient) stays `None`."""
    out = []
    for g1, g2 in zip(first, second):
        if g1 is None or g2 is None:
            out.append(None if g1 is None else to_float32(g1))
            continue
        g1 = ops.cast(g1, "float32")
        g2 = ops.cast(g2, "float32") / scale
        out.append(ops.where(ops.all(ops.isfinite(g2)), g2, g1))
    return out


def to_float32(x: Any) -> Any:
    """`x` in float32 when it is a float16 or bfloat16 array, else unchanged."""
    if keras.backend.standardize_dtype(x.dtype) in ("float16", "bfloat16"):
        return ops.cast(x, "float32")
    return x
