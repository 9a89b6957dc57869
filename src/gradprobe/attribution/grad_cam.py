"""`gp.grad_cam` (Selvaraju et al., 2017) and `gp.grad_cam_plus_plus`
(Chattopadhyay et al., 2018): class-activation maps from a layer's feature maps
and their gradients, per example."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from gradprobe import backends
from gradprobe.attribution._common import (
    Attribution,
    is_floating,
    layer_key,
    mean,
    single_input,
)
from gradprobe.core import _validate
from gradprobe.core.engine import batch_size, gradients, prepare, resolve_request
from gradprobe.core.selectors import LayerTree
from gradprobe.core.targets import CallableTarget, output_names
from gradprobe.errors import GradprobeError, quoted


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

    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.GlobalAveragePooling2D(name="gap"),
    ...     keras.layers.Dense(3, name="dense"),
    ... ])
    >>> images = np.random.default_rng(0).random((2, 8, 8, 1), dtype="float32")
    >>> cams = gp.grad_cam(model, images, "predicted", layer="conv")
    >>> np.asarray(cams).shape     # upsampled to the input, each map in [0, 1]
    (2, 8, 8)
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
    req = resolve_request(model, inputs, target, output=output, training=training)
    x = single_input(req.x, "gp.grad_cam")
    g = req.fixed().gradients(layer)
    key = layer_key(g, layer)
    A, dA = g.activations[key], g[key]
    rank = len(A.shape)
    if rank < 3:
        raise GradprobeError(
            f"Layer {key!r} outputs shape {tuple(A.shape)}: Grad-CAM needs spatial feature "
            "maps (batch, ..., channels). Choose a convolutional layer.")
    channel_axis = _validate.channel_axis(channel_axis, rank, f"layer {key!r}")
    if channel_axis not in (-1, rank - 1):
        perm = [0] + [i for i in range(1, rank) if i != channel_axis % rank] \
            + [channel_axis % rank]
        A, dA = ops.transpose(A, perm), ops.transpose(dA, perm)
    spatial = tuple(range(1, rank - 1))
    if plus_plus:
        g2, g3 = ops.square(dA), dA * ops.square(dA)
        denom = 2.0 * g2 + ops.sum(A, axis=spatial, keepdims=True) * g3
        alpha = ops.divide_no_nan(g2, denom)
        weights = ops.sum(alpha * ops.relu(dA), axis=spatial, keepdims=True)
    else:
        weights = mean(dA, axis=spatial, keepdims=True)
    cam = ops.sum(weights * A, axis=-1)
    if relu:
        cam = ops.relu(cam)
    if upsample:
        cam = _upsample(cam, x, channel_axis)
    if normalize:
        axes = tuple(range(1, len(cam.shape)))
        lo = ops.min(cam, axis=axes, keepdims=True)
        hi = ops.max(cam, axis=axes, keepdims=True)
        cam = ops.divide_no_nan(cam - lo, hi - lo)
    return Attribution(cam, g.target, "grad_cam_plus_plus" if plus_plus else "grad_cam",
                       layer=key)


def _upsample(cam: Any, x: Any, channel_axis: int) -> Any:
    """`cam` resized (bilinear, half-pixel centers, no antialiasing:
    `keras.ops.image.resize`) to the input's spatial size."""
    rank = len(x.shape)
    c = channel_axis % rank
    size = tuple(int(x.shape[i]) for i in range(1, rank) if i != c)
    if len(cam.shape) - 1 != len(size):
        raise GradprobeError(
            f"Cannot upsample a {len(cam.shape) - 1}-D map to an input with spatial shape "
            f"{size}; pass upsample=False.")
    resize = ops.image.resize
    if len(size) == 1:
        return resize(cam[:, None, :, None], (1, size[0]), interpolation="bilinear",
                      data_format="channels_last")[:, 0, :, 0]
    if len(size) == 2:
        return resize(cam[..., None], size, interpolation="bilinear",
                      data_format="channels_last")[..., 0]
    raise GradprobeError("upsample=True supports 1-D and 2-D maps; pass upsample=False.")


def grad_cam_layer(model: keras.Model, inputs: Any, *, output: Any = None) -> str:
    """The layer Grad-CAM uses by default: the last leaf layer, in forward order,
    whose output still has spatial extent (a `(batch, H, W, C)` activation with
    `H * W > 1`) and that the selected output depends on.

    It runs one forward pass on the first example, recording each leaf layer's
    output shape, then asks which of them the output depends on: on TensorFlow
    the tape, from the last candidate backwards (a backward pass only over the
    few layers after the chosen one); on JAX and PyTorch one `gp.gradients` call
    with respect to every leaf layer's output (its `unconnected` sources are
    those the output does not depend on). Layers after global pooling (1x1 maps)
    are never chosen.

    Args:
        model: The model.
        inputs: A batch of inputs (only the first example is used).
        output: For a multi-output model, the output the maps will explain (name
            or index, as in `gp.gradients`); default: any output.

    Returns:
        That layer's key, usable as `layer=` of `gp.grad_cam`.

    Raises:
        GradprobeError: When no layer qualifies: the model has no spatial maps (an
            MLP), or its last spatial maps are turned into a token sequence that
            later layers mix (a vision transformer), so there is no layer whose
            maps Grad-CAM can explain; pass `layer=` explicitly.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.GlobalAveragePooling2D(name="gap"),
    ...     keras.layers.Dense(3, name="dense"),
    ... ])
    >>> images = np.random.default_rng(0).random((2, 8, 8, 1), dtype="float32")
    >>> layer = gp.grad_cam_layer(model, images[:1])
    >>> layer
    'conv'
    >>> cams = gp.grad_cam(model, images, "predicted", layer)
    """
    x = prepare(model, inputs)
    batch_size(x)
    x = keras.tree.map_structure(lambda t: t[:1], x)
    if backends.is_functional():
        records, depends = _functional_records(model, x, output)
    else:
        records, depends = backends.tensorflow_attribution_backend.grad_cam_records(
            model, x, output, CallableTarget(_sum_of_outputs))
    spatial = [i for i, (n, _, t) in enumerate(records) if _spatial_extent(n.layer, t) > 1]
    chosen = next((i for i in reversed(spatial) if depends(i)), None)
    if chosen is None:
        flat = [k for _, k, t in records if len(t.shape) == 4]
        raise GradprobeError(
            "The model has no layer with a spatial (2-D) output larger than 1x1 that the "
            "output depends on, so Grad-CAM has no default layer"
            + (f" (its 4-D outputs are all 1x1: {quoted(flat)})" if flat else "")
            + ". Pass layer= explicitly: a layer with output (batch, H, W, C), or use "
            "gp.saliency or gp.integrated_gradients for models without feature maps.")
    _, key, value = records[chosen]
    sequences = [i for i in range(chosen + 1, len(records))
                 if len(records[i][2].shape) == 3 and (records[i][2].shape[1] or 0) > 1]
    later = next((i for i in reversed(sequences) if depends(i)), None)
    if later is not None:
        _, k2, t2 = records[later]
        raise GradprobeError(
            f"Grad-CAM has no default layer for this model: its last spatial maps "
            f"({key!r}, shape {tuple(value.shape)}) are turned into a sequence "
            f"of tokens ({k2!r}, shape {tuple(t2.shape)}) that later layers mix, as "
            "in a vision transformer, so no layer's maps explain the output the way "
            "Grad-CAM assumes. Pass layer= explicitly (e.g. "
            f"layer={key!r}), or use gp.saliency or gp.integrated_gradients.")
    return key


def _functional_records(model: Any, x: Any, output: Any) -> tuple[list, Callable[[int], bool]]:
    """JAX and PyTorch: `(records, depends)` as TensorFlow's
    `tensorflow_attribution.grad_cam_records` gives them, from
    one `gp.gradients` call with respect to every leaf layer's output, with the
    sum of the selected output(s) as the target (`unconnected="zero"`: the keys
    in its `unconnected` are the outputs the target does not depend on)."""
    tree = LayerTree(model)
    leaves = tree.leaves()
    wrt = [n.layer for n in leaves]
    if isinstance(output, str) and output not in output_names(model):
        node = tree.find(output)
        if all(n is not node for n in leaves):
            wrt.append(node.layer)

    g = gradients(model, x, _sum_of_outputs, wrt, output=output, unconnected="zero")
    unconnected = set(g.unconnected)
    records = []
    for k in g:
        if g.kinds[k] != "activation" or ":" in k:  # (one record per single-output call)
            continue
        records.append((tree.find(k.split("@")[0]), k, g.activations[k]))
    return records, lambda i: records[i][1] not in unconnected


def _sum_of_outputs(outputs: Any) -> Any:
    """The target of `grad_cam_layer`'s dependency question: the sum of every
    floating-point output selected (any output will do), in float32."""
    floats = [t for t in keras.tree.flatten(outputs) if is_floating(t)]
    if not floats:
        raise GradprobeError("The selected output is not floating point: nothing to explain.")
    total = ops.sum(ops.cast(floats[0], "float32"))
    for t in floats[1:]:
        total = total + ops.sum(ops.cast(t, "float32"))
    return total


def _spatial_extent(layer: Any, t: Any) -> int:
    """H * W of a 4-D feature map (channels_last, or the layer's channels_first), else 0."""
    shape = tuple(t.shape)
    if len(shape) != 4:
        return 0
    h, w = (shape[2], shape[3]) if getattr(layer, "data_format", None) == "channels_first" \
        else (shape[1], shape[2])
    return int(h or 0) * int(w or 0)
