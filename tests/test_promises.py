"""README promises that no other test checked (issue 12, item 8), each against an
independent expectation: hand-written tapes, or counts of traces."""

from __future__ import annotations

import importlib.util
import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp
from gradprobe.core import cache
from oracle import assert_close
from tolerance import F32


class Block(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(3, 3, padding="same", activation="tanh", name="conv")
        self.proj = layers.Dense(3, name="proj")

    def call(self, x):
        return self.proj(self.conv(x))


def _blocks():
    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 5, 2))
    h = Block(name="block1")(inp)
    h = Block(name="block2")(h)
    out = layers.Dense(4, name="head")(layers.Flatten()(h))
    model = keras.Model(inp, out)
    return model, np.random.default_rng(0).normal(size=(2, 5, 5, 2)).astype("float32")


def _tape_vars(model, x, target_fn, variables):
    with tf.GradientTape() as t:
        obj = tf.reduce_sum(target_fn(model(tf.constant(x))))
    return t.gradient(obj, [v.value for v in variables])


def test_glob_patterns_star_kernel_and_block_weights():
    model, x = _blocks()
    b1, b2 = model.get_layer("block1"), model.get_layer("block2")
    head = model.get_layer("head")
    g = gp.gradients(model, x, 1, "*.kernel")
    kernels = {"block1/conv.kernel": b1.conv.kernel, "block1/proj.kernel": b1.proj.kernel,
               "block2/conv.kernel": b2.conv.kernel, "block2/proj.kernel": b2.proj.kernel,
               "head.kernel": head.kernel}
    assert list(g) == list(kernels)  # forward order, no bias
    refs = _tape_vars(model, x, lambda y: y[:, 1], list(kernels.values()))
    for (key, _), ref in zip(kernels.items(), refs):
        assert_close(g[key], ref, F32, key)

    g = gp.gradients(model, x, 1, "block1/*.weights")
    expected = {"block1/conv.kernel": b1.conv.kernel, "block1/conv.bias": b1.conv.bias,
                "block1/proj.kernel": b1.proj.kernel, "block1/proj.bias": b1.proj.bias}
    assert set(g) == set(expected)
    refs = _tape_vars(model, x, lambda y: y[:, 1], list(expected.values()))
    for (key, _), ref in zip(expected.items(), refs):
        assert_close(g[key], ref, F32, key)


def test_inputs_by_index():
    keras.utils.set_random_seed(1)
    a, b = keras.Input((3,)), keras.Input((2,))
    h = layers.Concatenate()([layers.Dense(4, activation="tanh")(a), b])
    model = keras.Model([a, b], layers.Dense(2)(h))
    rng = np.random.default_rng(1)
    xa, xb = rng.normal(size=(3, 3)).astype("float32"), rng.normal(size=(3, 2)).astype("float32")
    ta, tb = tf.constant(xa), tf.constant(xb)
    with tf.GradientTape(persistent=True) as t:
        t.watch([ta, tb])
        s = tf.reduce_sum(model([ta, tb])[:, 0])
    g = gp.gradients(model, [xa, xb], 0, "inputs:0")
    assert list(g) == ["inputs:0"]
    assert_close(g["inputs:0"], t.gradient(s, ta), F32)
    g = gp.gradients(model, [xa, xb], 0, "inputs:1")
    assert_close(g["inputs:1"], t.gradient(s, tb), F32)
    # a single-input model: "inputs:0" is its one input
    single = keras.Sequential([keras.Input((3,)), layers.Dense(2)])
    with tf.GradientTape() as t:
        t.watch(ta)
        s = tf.reduce_sum(single(ta)[:, 1])
    assert_close(gp.gradients(single, xa, 1, "inputs:0")["inputs"], t.gradient(s, ta), F32)
    with pytest.raises(gp.GradprobeError, match="inputs:2"):
        gp.gradients(model, [xa, xb], 0, "inputs:2")


def test_class_targets_on_rank_3_outputs_need_a_position():
    """A class target on a sequence output names a position (gp.at); a bare class is refused."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((4, 3)), layers.Dense(5, activation="tanh", name="h"),
                              layers.Dense(3, name="per_step")])
    x = np.random.default_rng(2).normal(size=(2, 4, 3)).astype("float32")
    for target in (2, [1, 0], "predicted"):
        with pytest.raises(gp.GradprobeError, match=r"gp\.at\("):
            gp.gradients(model, x, target, "inputs")
    y = model(x).numpy()
    predicted = y[:, 1].argmax(-1)
    cases = [(gp.at(1, 2), lambda o: o[:, 1, 2]),
             (gp.at(-1, [1, 0]), lambda o: tf.stack([o[0, -1, 1], o[1, -1, 0]])),
             (gp.at(1), lambda o: tf.stack([o[i, 1, predicted[i]] for i in range(2)]))]
    for target, fn in cases:
        xt = tf.constant(x)
        with tf.GradientTape() as t:
            t.watch(xt)
            value = fn(model(xt))
            total = tf.reduce_sum(value)
        g = gp.gradients(model, x, target, "inputs")
        assert_close(g.target, value, F32, str(target))
        assert_close(g["inputs"], t.gradient(total, xt), F32, str(target))


def test_class_targets_on_rank_4_outputs_sum_the_other_axes():
    """Last axis = classes, the spatial axes summed (a segmentation map)."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((4, 4, 2)),
                              layers.Conv2D(3, 3, padding="same", name="seg")])
    x = np.random.default_rng(2).normal(size=(2, 4, 4, 2)).astype("float32")
    xt = tf.constant(x)
    with tf.GradientTape() as t:
        t.watch(xt)
        value = tf.reduce_sum(model(xt)[..., 2], axis=(1, 2))
        total = tf.reduce_sum(value)
    g = gp.gradients(model, x, 2, "inputs")
    assert_close(g.target, value, F32)
    assert_close(g["inputs"], t.gradient(total, xt), F32)


def test_grad_cam_channel_axis_on_channels_first_maps():
    keras.utils.set_random_seed(3)
    inp = keras.Input((6, 6, 2))
    conv = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")
    h = conv(inp)
    cf = layers.Permute((3, 1, 2), name="maps_cf")(h)  # (batch, C=4, H=6, W=6)
    out = layers.Dense(3, name="head")(layers.Flatten()(cf))
    model = keras.Model(inp, out)
    x = np.random.default_rng(3).random((2, 6, 6, 2)).astype("float32")
    # by hand: channels on axis 1; weights = spatial mean of the gradient
    xt = tf.constant(x)
    with tf.GradientTape() as t:
        A = model.get_layer("maps_cf")(conv(xt))
        t.watch(A)
        score = model.get_layer("head")(layers.Flatten()(A))[:, 2]
    dA = t.gradient(score, A).numpy()
    A = A.numpy()
    expected = np.maximum(np.sum(dA.mean(axis=(2, 3), keepdims=True) * A, axis=1), 0)
    cam = gp.grad_cam(model, x, 2, "maps_cf", channel_axis=1, upsample=False, normalize=False)
    assert cam.shape == (2, 6, 6)
    assert_close(np.asarray(cam), expected, 1e-5)
    # the default channel axis (-1) reads W as channels: a different map
    other = gp.grad_cam(model, x, 2, "maps_cf", upsample=False, normalize=False)
    assert other.shape == (2, 4, 6)


@pytest.mark.parametrize("norm", [1, "inf", 2])
def test_gradient_penalty_norms(norm):
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((3, 2)), layers.Flatten(),
                              layers.Dense(5, activation="tanh"), layers.Dense(1)])
    x = np.random.default_rng(4).normal(size=(4, 3, 2)).astype("float32")
    xt = tf.constant(x)
    with tf.GradientTape() as t:
        t.watch(xt)
        s = tf.reduce_sum(model(xt)[:, 0])
    g = t.gradient(s, xt).numpy().reshape(4, -1)
    expected = {1: np.abs(g).sum(1), "inf": np.abs(g).max(1), 2: np.sqrt((g ** 2).sum(1))}[norm]
    assert_close(gp.gradient_penalty(model, x, lambda y: y[:, 0], norm=norm), expected, F32)


def test_clear_cache_and_the_per_model_cache_bound():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((3,)), layers.Dense(4, name="a"),
                              layers.Dense(2, name="b")], name="cache_probe")
    x = np.ones((2, 3), "float32")
    gp.gradients(model, x, 0, "a")
    first = cache.entries_by_model[model][next(iter(cache.entries_by_model[model]))].fn
    gp.gradients(model, x, 0, "a")
    assert first.experimental_get_tracing_count() == 1  # reused, not retraced
    # 20 distinct requests: the model keeps only the 16 most recently used
    sources = ["inputs", "a", "b", "a.kernel", "b.kernel", "a.bias", "b.bias"]
    requests = [list(c) for c in itertools.combinations(sources, 2)][:20]
    for wrt in requests:
        gp.gradients(model, x, 0, wrt)
    assert len(cache.entries_by_model[model]) == cache.CACHE_SIZE == 16
    # the least recently used (the first request, "a") was evicted
    assert all(e.fn is not first for e in cache.entries_by_model[model].values())
    # the most recent request is still cached: calling it again traces nothing new
    last = list(cache.entries_by_model[model].values())[-1].fn
    gp.gradients(model, x, 1, requests[-1])
    assert last.experimental_get_tracing_count() == 1
    assert len(cache.entries_by_model[model]) == 16
    gp.clear_cache()
    assert model not in cache.entries_by_model
    g = gp.gradients(model, x, 0, "a")  # rebuilt on demand: a fresh function, traced once
    fresh = list(cache.entries_by_model[model].values())[0].fn
    assert fresh is not first and fresh.experimental_get_tracing_count() == 1
    assert_close(g["a"], np.tile(model.get_layer("b").kernel.numpy()[:, 0], (2, 1)), F32)


@pytest.mark.skipif(importlib.util.find_spec("tf_keras") is None,
                    reason="tf_keras (Keras 2) is not installed")
def test_tf_keras_models_are_rejected():
    import tf_keras

    model = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,))])
    with pytest.raises(gp.GradprobeError, match="tf_keras"):
        gp.gradients(model, np.ones((1, 3), "float32"), 0, "inputs")
