"""`gp.smoothgrad`: saliency averaged over noisy copies of each input."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradprobe import _validate
from gradprobe.attribution import (
    Attribution,
    fixed_target,
    input_gradients,
    repeat_target,
    single_input,
    target_values,
)
from gradprobe.errors import GradprobeError  # noqa: F401 (kept for merges)
from gradprobe.saliency import reduce_map


def smoothgrad(model: keras.Model, inputs: Any, target: Any, *, samples: int = 25,
               noise: float = 0.15, seed: int | None = None, absolute: bool = True,
               reduce_channels: str | None = "max", output: Any = None, training: bool = False,
               batch_size: int | None = None, progress: bool | None = None) -> Attribution:
    """SmoothGrad (Smilkov et al., 2017): the input gradient averaged over
    `samples` copies of each input with Gaussian noise added, then post-processed
    like `gp.saliency`.

    Args:
        samples: Noisy copies per example.
        noise: Noise standard deviation as a fraction of each example's value
            range (max - min).
        seed: Makes the noise reproducible.
        absolute, reduce_channels: As in `gp.saliency` (applied after averaging).
        batch_size: Compute in chunks of this many noisy copies (bounded memory);
            a progress bar shows when there are several chunks.
        model, inputs, target, output, training: As in `gp.gradients`.

    Returns:
        An `Attribution`: one map per example.
    """
    samples = _validate.count("samples", samples, "the number of noisy copies per example")
    noise = _validate.nonnegative("noise", noise, "the noise standard deviation as a fraction "
                                  "of each example's value range")
    _validate.seed(seed)
    _validate.optional_count("batch_size", batch_size, "noisy copies per chunk")
    x = single_input(model, inputs, "gp.smoothgrad")
    n = int(x.shape[0])
    target = fixed_target(model, x, target, output, training)
    axes = list(range(1, x.shape.rank))
    span = tf.reduce_max(x, axis=axes, keepdims=True) - tf.reduce_min(x, axis=axes, keepdims=True)
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal((int(samples), *x.shape)).astype(x.dtype.as_numpy_dtype)
    noisy = tf.reshape(x[None] + noise * span[None] * eps, [-1, *x.shape[1:]])
    g, _ = input_gradients(model, noisy, repeat_target(target, int(samples), n), output=output,
                        training=training, batch_size_=batch_size, label="smoothgrad",
                        progress=progress)
    g = tf.reduce_mean(tf.reshape(g, [int(samples), n, *x.shape[1:]]), axis=0)
    return Attribution(reduce_map(g, absolute, reduce_channels),
                       target_values(model, x, target, output, training), "smoothgrad")


__all__ = ["smoothgrad"]
