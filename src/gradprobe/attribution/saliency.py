"""`gp.saliency` and `gp.gradient_x_input`: maps from one input gradient."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from gradprobe.attribution._common import (
    Attribution,
    ModelInputs,
    input_gradients,
    layer_key,
    mean,
    target_values,
)
from gradprobe.core import _validate
from gradprobe.core.engine import resolve_request
from gradprobe.errors import GradprobeError


def reduce_map(g: Any, absolute: bool, reduce_channels: str | None) -> Any:
    """Post-processing shared by saliency and SmoothGrad: absolute value, then
    the channel (last) axis reduced by `"max"`, `"mean"`, `"sum"` or kept (`None`)."""
    if absolute:
        g = ops.abs(g)
    if reduce_channels is None or len(g.shape) <= 2:
        return g
    if reduce_channels == "max":
        return ops.max(g, axis=-1)
    if reduce_channels == "mean":
        return mean(g, axis=-1)
    if reduce_channels == "sum":
        return ops.sum(g, axis=-1)
    raise GradprobeError(
        "Expected `reduce_channels` to be one of 'max', 'mean', 'sum' or None (keep the "
        f"channel axis). Received: reduce_channels={_validate.shown(reduce_channels)}")


def saliency(model: keras.Model, inputs: Any, target: Any, *, absolute: bool = True,
             reduce_channels: str | None = "max", output: Any = None, training: bool = False,
             batch_size: int | None = None, layer: Any = None) -> Attribution:
    """Saliency map: the gradient of the target with respect to the input (or,
    with `layer=`, with respect to that layer's output).

    Args:
        model, inputs, target, output, training: As in `gp.gradients`. For a
            model with several inputs (list, tuple or dict), the result has the
            same structure: one map per floating-point input, `None` for inputs
            held fixed (token ids, masks; listed in `result.fixed`).
        absolute: Take the absolute value of the gradient.
        reduce_channels: Reduce the last (channel) axis of inputs of rank > 2 with
            `"max"` (default), `"mean"` or `"sum"`; `None` keeps it.
        batch_size: Compute in chunks of this many examples (input maps only; a
            layer map is computed in one pass over the batch).
        layer: Attribute to this layer's output instead of the input (any
            selector of `gp.gradients` naming one activation, e.g. an
            `Embedding` fed by integer token ids, or `"token_embedding@0"` for
            the first call of a tied embedding). Integer inputs are then fine.

    Returns:
        An `Attribution`: one map per example (`result.layer` names the layer).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.GlobalAveragePooling2D(name="gap"),
    ...     keras.layers.Dense(3, name="dense"),
    ... ])
    >>> images = np.random.default_rng(0).random((2, 8, 8, 1), dtype="float32")
    >>> maps = gp.saliency(model, images, target="predicted")
    >>> np.asarray(maps).shape    # (batch, height, width)
    (2, 8, 8)
    >>> text_model = keras.Sequential([
    ...     keras.Input((4,), dtype="int32"),
    ...     keras.layers.Embedding(6, 3, name="embedding"),
    ...     keras.layers.GlobalAveragePooling1D(name="pool"),
    ...     keras.layers.Dense(2, name="dense"),
    ... ])
    >>> ids = np.array([[1, 2, 3, 0], [4, 5, 0, 0]])          # token ids, padded
    >>> tokens = gp.saliency(text_model, ids, 1, layer="embedding")
    >>> np.asarray(tokens).shape  # (batch, steps): the embedding axis reduced by max
    (2, 4)
    """
    _validate.flag("absolute", absolute)
    if layer is not None:
        grad, _, values, key = _layer_gradient(model, inputs, target, layer, output, training)
        return Attribution(reduce_map(grad, absolute, reduce_channels), values, "saliency",
                           layer=key)
    mi, grads, values = _gradient(model, inputs, target, output, training, batch_size,
                                  "saliency")
    maps = {i: reduce_map(g, absolute, reduce_channels) for i, g in grads.items()}
    return Attribution(mi.pack(maps), values, "saliency", fixed=mi.fixed)


def gradient_x_input(model: keras.Model, inputs: Any, target: Any, *, output: Any = None,
                     training: bool = False, batch_size: int | None = None,
                     layer: Any = None) -> Attribution:
    """Gradient x Input: the input gradient times the input, element-wise (or,
    with `layer=`, gradient x activation at that layer's output).

    Args:
        model, inputs, target, output, training, batch_size: As in `gp.saliency`.
        layer: Attribute to this layer's output (as in `gp.saliency`): the
            gradient of the target with respect to the activation, times the
            activation. For an embedding, `result.reduce("sum")` gives one score
            per token.

    Returns:
        An `Attribution` shaped like the input (or the layer's output).

    Example:

    >>> text_model = keras.Sequential([
    ...     keras.Input((4,), dtype="int32"),
    ...     keras.layers.Embedding(6, 3, name="embedding"),
    ...     keras.layers.GlobalAveragePooling1D(name="pool"),
    ...     keras.layers.Dense(2, name="dense"),
    ... ])
    >>> ids = np.array([[1, 2, 3, 0], [4, 5, 0, 0]])          # token ids, padded
    >>> gxa = gp.gradient_x_input(text_model, ids, 1, layer="embedding")
    >>> gxa.reduce("sum").shape   # (batch, steps): one score per token
    (2, 4)
    """
    if layer is not None:
        grad, act, values, key = _layer_gradient(model, inputs, target, layer, output, training)
        return Attribution(grad * ops.cast(act, grad.dtype), values, "gradient_x_input",
                           layer=key)
    mi, grads, values = _gradient(model, inputs, target, output, training, batch_size,
                                  "gradient_x_input")
    maps = {i: g * ops.cast(mi.leaves[i], g.dtype) for i, g in grads.items()}
    return Attribution(mi.pack(maps), values, "gradient_x_input", fixed=mi.fixed)


def _layer_gradient(model: Any, inputs: Any, target: Any, layer: Any, output: Any,
                    training: bool) -> tuple[Any, Any, Any, str]:
    """`(gradient, activation, target values, key)` at one layer's output."""
    _validate.layer(layer)
    req = resolve_request(model, inputs, target, output=output, training=training).fixed()
    g = req.gradients(layer)
    key = layer_key(g, layer)
    return g[key], g.activations[key], g.target, key


def _gradient(model: Any, inputs: Any, target: Any, output: Any, training: bool,
              batch_size: int | None, method: str) -> tuple[ModelInputs, dict[int, Any], Any]:
    """`(inputs, {leaf index: input gradient}, target values)` for one batch."""
    _validate.optional_count("batch_size", batch_size, "examples per chunk")
    req = resolve_request(model, inputs, target, output=output, training=training)
    mi = ModelInputs(req.x, req.model)
    mi.require_floating(f"gp.{method}")
    req = req.fixed()
    grads, values = input_gradients(req, mi, batch_size_=batch_size, label=method)
    if values is None:
        values = target_values(req)
    return mi, grads, values
