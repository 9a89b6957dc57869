"""`gp.grad_cam` (Selvaraju et al., 2017) and `gp.grad_cam_plus_plus`
(Chattopadhyay et al., 2018): class-activation maps from a layer's feature maps
and their gradients, per example."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from gradprobe import _validate
from gradprobe.attribution import Attribution, fixed_target, layer_key, single_input
from gradprobe.engine import gradients
from gradprobe.errors import GradprobeError


def grad_cam(model: keras.Model, inputs: Any, target: Any, layer: Any, *, channel_axis: int = -1,
             relu: bool = True, upsample: bool = True, normalize: bool = True,
             output: Any = None, training: bool = False) -> Attribution:
    """Grad-CAM: `relu(sum_k w_k A_k)` with `w_k` the spatial mean of the target's
    gradient with respect to feature map `A_k` of `layer`, for each example.

    Args:
        layer: The convolutional layer (any selector of `gp.gradients`, e.g. a
            nested path `"backbone/conv5_block3_out"` or `"conv@1"`; a layer called
            more than once needs the call index).
        channel_axis: The feature maps' channel axis (`-1`, or `1` for channels_first).
        relu: Keep only positive evidence (the published method); `False` gives the
            signed map.
        upsample: Resize the maps to the input's spatial size (1-D and 2-D maps).
        normalize: Scale each map into [0, 1] (min-max; a constant map becomes 0);
            `False` gives the raw map.
        model, inputs, target, output, training: As in `gp.gradients`.

    Returns:
        An `Attribution` of maps `(batch, *spatial)`.

    Example:

    >>> cams = gp.grad_cam(model, images, "predicted", layer="conv5_block3_out")
    """
    return _cam(model, inputs, target, layer, channel_axis, relu, upsample, normalize, output,
                training, plus_plus=False)


def grad_cam_plus_plus(model: keras.Model, inputs: Any, target: Any, layer: Any, *,
                       channel_axis: int = -1, relu: bool = True, upsample: bool = True,
                       normalize: bool = True, output: Any = None,
                       training: bool = False) -> Attribution:
    """Grad-CAM++: like `gp.grad_cam`, with channel weights
    `w_k = sum_ij alpha_kij relu(g_kij)`, `alpha = g^2 / (2 g^2 + sum_ab A_kab g^3)`
    (the paper's closed form with an exponential output; 0/0 taken as 0).

    Arguments and result as in `gp.grad_cam`.
    """
    return _cam(model, inputs, target, layer, channel_axis, relu, upsample, normalize, output,
                training, plus_plus=True)


def _cam(model, inputs, target, layer, channel_axis, relu, upsample, normalize, output,
         training, plus_plus):
    _validate.channel_axis(channel_axis)
    _validate.layer(layer)
    for name, value in (("relu", relu), ("upsample", upsample), ("normalize", normalize)):
        _validate.flag(name, value)
    x = single_input(model, inputs, "gp.grad_cam")
    target = fixed_target(model, x, target, output, training)
    g = gradients(model, x, target, layer, output=output, training=training)
    key = layer_key(g, layer)
    A, dA = g.activations[key], g[key]
    if A.shape.rank < 3:
        raise GradprobeError(
            f"Layer {key!r} outputs shape {tuple(A.shape)}: Grad-CAM needs spatial feature "
            "maps (batch, ..., channels). Choose a convolutional layer.")
    channel_axis = _validate.channel_axis(channel_axis, A.shape.rank, f"layer {key!r}")
    if channel_axis not in (-1, A.shape.rank - 1):
        perm = [0] + [i for i in range(1, A.shape.rank) if i != channel_axis % A.shape.rank] \
            + [channel_axis % A.shape.rank]
        A, dA = tf.transpose(A, perm), tf.transpose(dA, perm)
    spatial = list(range(1, A.shape.rank - 1))
    if plus_plus:
        g2, g3 = tf.square(dA), dA * tf.square(dA)
        denom = 2.0 * g2 + tf.reduce_sum(A, axis=spatial, keepdims=True) * g3
        alpha = tf.math.divide_no_nan(g2, denom)
        weights = tf.reduce_sum(alpha * tf.nn.relu(dA), axis=spatial, keepdims=True)
    else:
        weights = tf.reduce_mean(dA, axis=spatial, keepdims=True)
    cam = tf.reduce_sum(weights * A, axis=-1)
    if relu:
        cam = tf.nn.relu(cam)
    if upsample:
        cam = _upsample(cam, x, channel_axis)
    if normalize:
        axes = list(range(1, cam.shape.rank))
        lo = tf.reduce_min(cam, axis=axes, keepdims=True)
        hi = tf.reduce_max(cam, axis=axes, keepdims=True)
        cam = tf.math.divide_no_nan(cam - lo, hi - lo)
    return Attribution(cam, g.target, "grad_cam_plus_plus" if plus_plus else "grad_cam",
                       layer=key)


def _upsample(cam: Any, x: Any, channel_axis: int) -> Any:
    rank = x.shape.rank
    c = channel_axis % rank
    size = [x.shape[i] for i in range(1, rank) if i != c]
    if cam.shape.rank - 1 != len(size):
        raise GradprobeError(
            f"Cannot upsample a {cam.shape.rank - 1}-D map to an input with spatial shape "
            f"{tuple(size)}; pass upsample=False.")
    if len(size) == 1:
        return tf.image.resize(cam[:, None, :, None], [1, size[0]], "bilinear")[:, 0, :, 0]
    if len(size) == 2:
        return tf.image.resize(cam[..., None], size, "bilinear")[..., 0]
    raise GradprobeError("upsample=True supports 1-D and 2-D maps; pass upsample=False.")


def grad_cam_layer(model: keras.Model, inputs: Any) -> str:
    """The layer Grad-CAM uses by default: the last leaf layer, in forward order,
    whose output has two spatial axes (a 4-D activation), found in one pass.

    Args:
        model: The model.
        inputs: A batch of inputs (one example is enough).

    Returns:
        That layer's key, usable as `layer=` of `gp.grad_cam`.

    Example:

    >>> layer = gp.grad_cam_layer(model, images[:1])
    >>> cams = gp.grad_cam(model, images, "predicted", layer)
    """
    g = gradients(model, inputs, _zero, "*", unconnected="zero")
    spatial = [k for k in g.activations
               if g.kinds[k] == "activation" and len(g.activations[k].shape) == 4]
    if not spatial:
        raise GradprobeError(
            "The model has no layer with a spatial (2-D) output, so Grad-CAM has no default "
            "layer; pass layer= explicitly (a layer with output (batch, H, W, C)).")
    return spatial[-1]


def _zero(outputs: Any) -> Any:
    return tf.add_n([0.0 * tf.reduce_sum(tf.cast(t, tf.float32))
                     for t in tf.nest.flatten(outputs)])
