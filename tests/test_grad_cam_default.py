"""`gp.grad_cam_layer` (issue 12, item 2): the last layer, in forward order, with
spatial maps larger than 1x1 that the selected output depends on, found from one
forward pass; a clear error when no layer qualifies (MLP, vision transformer)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp


def _last_spatial_in_graph(model):
    """Independent expectation from Keras' own graph: model.layers is in
    topological order; the last layer whose output is (batch, H, W, C), H*W > 1."""
    found = [la.name for la in model.layers
             if len(la.output.shape) == 4 and la.output.shape[1] * la.output.shape[2] > 1]
    return found[-1]


@pytest.mark.parametrize("ctor, size", [(keras.applications.MobileNet, 64),
                                        (keras.applications.MobileNetV3Small, 96)])
def test_mobilenets_default_layer_is_spatial_and_its_map_is_not_zero(ctor, size):
    keras.utils.set_random_seed(0)
    model = ctor(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    # the old rule (last 4-D output) lands after global pooling, on 1x1 maps
    last_4d = [la for la in model.layers if len(la.output.shape) == 4][-1]
    assert tuple(last_4d.output.shape[1:3]) == (1, 1)
    x = np.random.default_rng(0).random((2, size, size, 3)).astype("float32")
    layer = gp.grad_cam_layer(model, x)
    assert layer == _last_spatial_in_graph(model)
    g = gp.gradients(model, x, 3, layer)
    h, w = g.activations[layer].shape[1:3]
    assert h * w > 1
    cam = np.asarray(gp.grad_cam(model, x, 3, layer, normalize=False, upsample=False))
    assert cam.shape == (2, h, w)
    # the independent map: relu(sum_k mean_ij(dA) A) from the same gradients
    A, dA = g.activations[layer].numpy(), g[layer].numpy()
    ref = np.maximum(np.sum(dA.mean(axis=(1, 2), keepdims=True) * A, axis=-1), 0.0)
    np.testing.assert_allclose(cam, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    assert np.abs(cam).max() > 0


class _Tokens(layers.Layer):
    def call(self, x):
        return tf.reshape(x, [tf.shape(x)[0], -1, x.shape[-1]])


def _vit_like():
    keras.utils.set_random_seed(1)
    inp = keras.Input((16, 16, 3))
    patches = layers.Conv2D(8, 4, strides=4, name="patch_embed")(inp)  # (4, 4, 8)
    t = _Tokens(name="tokens")(patches)
    t = layers.MultiHeadAttention(2, 4, name="attn")(t, t) + t
    t = layers.LayerNormalization(name="ln")(t)
    out = layers.Dense(3, name="head")(layers.GlobalAveragePooling1D()(t))
    return keras.Model(inp, out), np.random.default_rng(1).random((2, 16, 16, 3))


def test_vit_like_and_mlp_raise_saying_why_and_how():
    model, x = _vit_like()
    with pytest.raises(gp.GradprobeError, match=r"'patch_embed'.*sequence of tokens.*layer="):
        gp.grad_cam_layer(model, x.astype("float32"))
    mlp = keras.Sequential([keras.Input((4,)), layers.Dense(5, name="h"), layers.Dense(2)])
    with pytest.raises(gp.GradprobeError, match="no layer with a spatial.*Pass layer="):
        gp.grad_cam_layer(mlp, np.zeros((1, 4), "float32"))
    # a CNN whose maps are all pooled to 1x1 before the last convolution
    inp = keras.Input((6, 6, 1))
    h = layers.GlobalAveragePooling2D(keepdims=True)(layers.Conv2D(3, 3, name="c")(inp))
    out = layers.Flatten()(layers.Conv2D(2, 1, name="head")(h))
    pooled = keras.Model(inp, out)
    assert gp.grad_cam_layer(pooled, np.ones((1, 6, 6, 1), "float32")) == "c"


def test_default_layer_follows_the_selected_output():
    """The output named by `output=` must depend on the layer; a later branch's
    layer feeding only another output is not chosen."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((8, 8, 1))
    a = layers.Conv2D(4, 3, padding="same", name="conv_a")(inp)
    b = layers.Conv2D(4, 3, padding="same", name="conv_b")(a)
    out_a = layers.Dense(2, name="out_a")(layers.GlobalAveragePooling2D()(a))
    out_b = layers.Dense(2, name="out_b")(layers.GlobalAveragePooling2D()(b))
    model = keras.Model(inp, [out_a, out_b])
    x = np.random.default_rng(2).random((1, 8, 8, 1)).astype("float32")
    assert gp.grad_cam_layer(model, x) == "conv_b"
    assert gp.grad_cam_layer(model, x, output="out_a") == "conv_a"
    assert gp.grad_cam_layer(model, x, output=1) == "conv_b"
    # by construction out_a depends on conv_a only: its maps explain out_a
    cam_a = np.asarray(gp.grad_cam(model, x, 0, "conv_a", output="out_a", normalize=False))
    assert cam_a.max() > 0


def test_shared_spatial_layer_gets_its_call_index():
    keras.utils.set_random_seed(3)
    conv = layers.Conv2D(2, 3, padding="same", name="shared")
    inp = keras.Input((6, 6, 2))
    h = conv(conv(inp))
    model = keras.Model(inp, layers.Dense(2)(layers.Flatten()(h)))
    x = np.random.default_rng(3).random((1, 6, 6, 2)).astype("float32")
    layer = gp.grad_cam_layer(model, x)
    assert layer == "shared@1"
    assert np.asarray(gp.grad_cam(model, x, 0, layer)).shape == (1, 6, 6)
