"""`gp.gradient_penalty`: per-example gradient norms, ready to add to a loss."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradprobe import _validate
from gradprobe.engine import gradients
from gradprobe.errors import GradprobeError


def gradient_penalty(model: keras.Model, inputs: Any, target: Any, wrt: Any = "inputs", *,
                     norm: float | str = 2, output: Any = None,
                     training: bool = False) -> tf.Tensor:
    """Per-example norms of the gradient of `target` with respect to `wrt`.

    The norm of each example's gradient, taken over every non-batch axis of every
    source together. The result is differentiable (with respect to the model's
    weights, under your tape), as a gradient penalty needs: for WGAN-GP,
    `lam * tf.reduce_mean((gp.gradient_penalty(critic, x_hat, lambda y: y[:, 0]) - 1) ** 2)`.

    Args:
        model, inputs, target, output, training: As in `gp.gradients`.
        wrt: Activation or input selectors (default `"inputs"`): per-example sources.
        norm: `2` (default), `1`, or `"inf"`.

    Returns:
        A tensor of shape `(batch,)`.
    """
    _validate.backend_supported("gp.gradient_penalty")
    _validate.model(model)
    if isinstance(norm, (bool, np.bool_)) or norm not in (1, 2, "inf", float("inf")):
        raise _validate.fail("norm", norm, "1, 2 (default) or 'inf', the norm taken over each "
                                           "example's gradient.")
    g = gradients(model, inputs, target, wrt, output=output, training=training)
    weights = [k for k in g if g.kinds[k] == "weight"]
    if weights:
        raise GradprobeError(
            f"gradient_penalty needs per-example sources (activations or inputs); "
            f"{weights[0]!r} is a weight. Use gp.per_example_norms for weights.")
    flat = tf.concat([tf.reshape(v, [tf.shape(v)[0], -1]) for v in g.values()], axis=1)
    if norm == 2:
        return tf.sqrt(tf.reduce_sum(tf.square(flat), axis=1))
    if norm == 1:
        return tf.reduce_sum(tf.abs(flat), axis=1)
    return tf.reduce_max(tf.abs(flat), axis=1)
