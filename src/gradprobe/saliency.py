"""`gp.saliency` and `gp.gradient_x_input`: maps from one input gradient."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from gradprobe import _validate
from gradprobe.attribution import (
    Attribution,
    ModelInputs,
    fixed_target,
    input_gradients,
    target_values,
)
from gradprobe.errors import GradprobeError


def reduce_map(g: Any, absolute: bool, reduce_channels: str | None) -> Any:
    """Post-processing shared by saliency and SmoothGrad: absolute value, then
    the channel (last) axis reduced by `"max"`, `"mean"`, `"sum"` or kept (`None`)."""
    if absolute:
        g = tf.abs(g)
    if reduce_channels is None or g.shape.rank <= 2:
        return g
    if reduce_channels == "max":
        return tf.reduce_max(g, axis=-1)
    if reduce_channels == "mean":
        return tf.reduce_mean(g, axis=-1)
    if reduce_channels == "sum":
        return tf.reduce_sum(g, axis=-1)
    raise GradprobeError(
        "Expected `reduce_channels` to be one of 'max', 'mean', 'sum' or None (keep the "
        f"channel axis). Received: reduce_channels={_validate.shown(reduce_channels)}")


def saliency(model: keras.Model, inputs: Any, target: Any, *, absolute: bool = True,
             reduce_channels: str | None = "max", output: Any = None, training: bool = False,
             batch_size: int | None = None) -> Attribution:
    """Saliency map: the gradient of the target with respect to the input.

    Args:
        model, inputs, target, output, training: As in `gp.gradients`. For a
            model with several inputs (list, tuple or dict), the result has the
            same structure: one map per floating-point input, `None` for inputs
            held fixed (token ids, masks; listed in `result.fixed`).
        absolute: Take the absolute value of the gradient.
        reduce_channels: Reduce the last (channel) axis of inputs of rank > 2 with
            `"max"` (default), `"mean"` or `"sum"`; `None` keeps it.
        batch_size: Compute in chunks of this many examples.

    Returns:
        An `Attribution`: one map per example.

    Example:

    >>> maps = gp.saliency(model, images, target="predicted")
    >>> np.asarray(maps).shape    # (batch, height, width)
    """
    _validate.flag("absolute", absolute)
    mi, grads, values = _gradient(model, inputs, target, output, training, batch_size,
                                  "saliency")
    maps = {i: reduce_map(g, absolute, reduce_channels) for i, g in grads.items()}
    return Attribution(mi.pack(maps), values, "saliency", fixed=mi.fixed)


def gradient_x_input(model: keras.Model, inputs: Any, target: Any, *, output: Any = None,
                     training: bool = False, batch_size: int | None = None) -> Attribution:
    """Gradient x Input: the input gradient times the input, element-wise.

    Returns:
        An `Attribution` shaped like the input.
    """
    mi, grads, values = _gradient(model, inputs, target, output, training, batch_size,
                                  "gradient_x_input")
    maps = {i: g * tf.cast(mi.leaves[i], g.dtype) for i, g in grads.items()}
    return Attribution(mi.pack(maps), values, "gradient_x_input", fixed=mi.fixed)


def _gradient(model: Any, inputs: Any, target: Any, output: Any, training: bool,
              batch_size: int | None, method: str) -> tuple[ModelInputs, dict[int, Any], Any]:
    """`(inputs, {leaf index: input gradient}, target values)` for one batch."""
    _validate.optional_count("batch_size", batch_size, "examples per chunk")
    mi = ModelInputs(model, inputs)
    mi.require_floating(f"gp.{method}")
    target = fixed_target(model, mi.x, target, output, training)
    grads, values = input_gradients(model, mi, target, output=output, training=training,
                                    batch_size_=batch_size, label=method)
    if values is None:
        values = target_values(model, mi.x, target, output, training)
    return mi, grads, values
