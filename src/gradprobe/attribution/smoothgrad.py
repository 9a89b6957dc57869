"""`gp.smoothgrad`: saliency averaged over noisy copies of each input."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import keras
import numpy as np
from keras import ops

from gradprobe.attribution._common import (
    Attribution,
    ModelInputs,
    accumulator_dtype,
    chunk_rows,
    compiled_target_values,
    noisy_rows,
    row_bytes,
    stream,
)
from gradprobe.attribution.saliency import reduce_map
from gradprobe.core import _validate
from gradprobe.core.engine import resolve_request


def smoothgrad(model: keras.Model, inputs: Any, target: Any, *, samples: int = 25,
               noise: float = 0.15, seed: int | None = None, absolute: bool = True,
               reduce_channels: str | None = "max", output: Any = None, training: bool = False,
               batch_size: int | None = None, max_bytes: int | None = None,
               progress: bool | None = None) -> Attribution:
    """SmoothGrad (Smilkov et al., 2017): the input gradient averaged over
    `samples` copies of each input with Gaussian noise added, then post-processed
    like `gp.saliency`.

    Args:
        samples: Noisy copies per example.
        noise: Noise standard deviation as a fraction of each example's value
            range (max - min).
        seed: Makes the noise reproducible. Copy `s` of example `i` of a batch of
            `n` is row `r = s * n + i`; its noise on its `j`-th floating-point
            input (standard normal, in float32, or float64 for a float64 input,
            then scaled) is drawn per row, so it is the same whatever
            `batch_size` is. On TensorFlow it is
            `tf.random.stateless_normal(shape, seed=(seed + j, r))`; on JAX and
            PyTorch it is NumPy's `np.random.default_rng((seed, j,
            r)).standard_normal(shape)` (the same numbers on both backends, not
            TensorFlow's). Without a seed, one is drawn from NumPy's global
            generator (so `keras.utils.set_random_seed` makes runs repeatable).
        absolute, reduce_channels: As in `gp.saliency` (applied after averaging).
        batch_size: Evaluate this many noisy copies at a time (default: all
            `samples x batch` at once). Each chunk is built only when it is
            needed, so memory is bounded by `batch_size`, not by `samples`; every
            chunk runs through one compiled function, and a progress bar shows
            when there are several chunks.
        max_bytes: Refuse (with the numbers and the fix) a request whose chunk
            of noisy inputs and their gradients would need more than this many
            bytes; default: the memory available now. The model's own
            activations are not in this estimate.
        model, inputs, target, output, training: As in `gp.gradients`. With
            several inputs (list, tuple or dict) the maps have the same
            structure: one per floating-point input (each with its own noise
            scale), `None` for the integer inputs held fixed (`result.fixed`).

    Returns:
        An `Attribution`: one map per example (gradients averaged in float32 at
        least).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.GlobalAveragePooling2D(name="gap"),
    ...     keras.layers.Dense(3, name="dense"),
    ... ])
    >>> images = np.random.default_rng(0).random((2, 8, 8, 1), dtype="float32")
    >>> maps = gp.smoothgrad(model, images, "predicted", samples=32, batch_size=32, seed=0,
    ...                      progress=False)
    >>> np.asarray(maps).shape    # (batch, height, width)
    (2, 8, 8)
    """
    samples = _validate.count("samples", samples, "the number of noisy copies per example")
    noise = _validate.nonnegative("noise", noise, "the noise standard deviation as a fraction "
                                  "of each example's value range")
    _validate.seed(seed)
    _validate.optional_count("batch_size", batch_size, "noisy copies per chunk")
    req = resolve_request(model, inputs, target, output=output, training=training)
    mi = ModelInputs(req.x, req.model)
    mi.require_floating("gp.smoothgrad")
    n, floating, keys = mi.n, mi.floating, mi.float_keys
    wide = {i: accumulator_dtype(mi.leaves[i].dtype) for i in floating}
    noise_bytes = row_bytes([SimpleNamespace(shape=(1, *mi.leaves[i].shape[1:]), dtype=wide[i])
                             for i in floating])
    rows = chunk_rows(what=f"gp.smoothgrad(samples={samples})", reps_name="samples",
                      reps=samples, n=n, batch_size_=batch_size,
                      per_row=row_bytes(mi.leaves) + noise_bytes, max_bytes=max_bytes)
    req = req.fixed()
    scales = {}
    for i in floating:
        xw = ops.cast(mi.leaves[i], wide[i])
        axes = tuple(range(1, len(xw.shape)))
        span = ops.max(xw, axis=axes, keepdims=True) - ops.min(xw, axis=axes, keepdims=True)
        scales[i] = ops.convert_to_tensor(float(noise), wide[i]) * span
    if seed is None:
        seed = int(np.random.randint(0, 2**31 - 1))

    def step(idx: np.ndarray, s: np.ndarray, r: np.ndarray) -> Any:
        new = {i: noisy_rows(mi.leaves[i], scales[i], idx, r, int(seed), j)
               for j, i in enumerate(floating)}
        g = req.gradients(keys, x=mi.rows(idx, new), rows=idx)
        return [g[k] for k in keys], None

    acc, _ = stream(n=n, reps=samples, rows=rows,
                    weights=lambda s: np.full(s.shape, 1.0 / samples), step=step,
                    acc=[ops.zeros(tuple(mi.leaves[i].shape), wide[i]) for i in floating],
                    label="smoothgrad", progress=progress, target=req.target)
    maps = {i: reduce_map(g, absolute, reduce_channels) for i, g in zip(floating, acc)}
    values = compiled_target_values(req)
    return Attribution(mi.pack(maps), values, "smoothgrad", fixed=mi.fixed)


__all__ = ["smoothgrad"]
