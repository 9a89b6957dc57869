"""The user's model is exactly as before after any call, successful or failed:
no wrapper left on any layer, every variable bit-identical (moving statistics and
seed-generator state included), the same attributes, the same outputs."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp


class Net(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.conv = layers.Conv2D(4, 3, activation="relu")
        self.bn = layers.BatchNormalization()
        self.drop = layers.Dropout(0.5)
        self.flat = layers.Flatten()
        self.proj = layers.Dense(6)
        self.shared = layers.Dense(6, activation="tanh")
        self.out = layers.Dense(3)

    def call(self, x, training=False):
        h = self.drop(self.bn(self.conv(x), training=training), training=training)
        return self.out(self.shared(self.shared(self.proj(self.flat(h)))))


def _functional():
    inp = keras.Input((6, 6, 2))
    h = layers.Conv2D(4, 3, name="conv")(inp)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.Dropout(0.5, name="drop")(h)
    h = layers.Flatten()(h)
    return keras.Model(inp, [layers.Dense(3, name="a")(h), layers.Dense(2, name="b")(h)])


def _all_layers(model):
    return [model, *model._flatten_layers(include_self=False, recursive=True)]


def snapshot(model, x):
    return {
        "vars": [v.numpy().copy() for v in model.variables],
        "attrs": [{k: id(v) for k, v in vars(layer).items()} for layer in _all_layers(model)],
        "out": [o.numpy() for o in tf.nest.flatten(model(x, training=False))],
    }


def assert_unchanged(model, x, before):
    for layer in _all_layers(model):
        assert "call" not in vars(layer), f"wrapper left on {layer.name}"
    after_vars = [v.numpy() for v in model.variables]
    assert len(after_vars) == len(before["vars"])
    for a, b in zip(after_vars, before["vars"]):
        assert np.array_equal(a, b)
    assert [{k: id(v) for k, v in vars(layer).items()} for layer in _all_layers(model)] \
        == before["attrs"]
    for a, b in zip(tf.nest.flatten(model(x, training=False)), before["out"]):
        assert np.array_equal(a.numpy(), b)


FAILING = [
    ("unknown layer", dict(target=0, wrt="nope")),
    ("class out of range", dict(target=99, wrt="*")),
    ("bad callable", dict(target=lambda y: tf.nest.flatten(y)[0], wrt="*")),
    ("callable raises", dict(target=lambda y: 1 / 0, wrt="*")),
]


@pytest.mark.parametrize("compile", ["auto", False])
@pytest.mark.parametrize("training", [False, True])
def test_subclassed_unchanged(compile, training):
    keras.utils.set_random_seed(0)
    model = Net()
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32")
    model(x)
    before = snapshot(model, x)
    g = gp.gradients(model, x, 1, ["*", "*.weights", "inputs"], training=training,
                     compile=compile)
    assert len(g) > 5
    assert_unchanged(model, x, before)
    for _, kwargs in FAILING:
        with pytest.raises((gp.GradprobeError, ZeroDivisionError)):
            gp.gradients(model, x, training=training, compile=compile, **kwargs)
        assert_unchanged(model, x, before)
    with pytest.raises(gp.GradprobeError):  # wrong input shape: fails inside the model
        gp.gradients(model, x[:, :4, :4], 0, "*", compile=compile)
    assert_unchanged(model, x, before)


@pytest.mark.parametrize("compile", ["auto", False])
def test_functional_multi_output_unchanged(compile):
    keras.utils.set_random_seed(0)
    model = _functional()
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32")
    model(x)  # a model's first call sets Keras' own bookkeeping, with or without gradprobe
    before = snapshot(model, x)
    gp.gradients(model, x, 0, ["conv", "bn.weights"], output="a", training=True, compile=compile)
    assert_unchanged(model, x, before)
    with pytest.raises(gp.GradprobeError, match="does not depend"):
        gp.gradients(model, x, 0, ["a", "b"], output="a", compile=compile)
    assert_unchanged(model, x, before)
    with pytest.raises(gp.GradprobeError, match="needs one"):
        gp.gradients(model, x, 0, "conv", compile=compile)
    assert_unchanged(model, x, before)


def test_users_own_instance_call_is_restored():
    model = keras.Sequential([keras.Input((3,)), layers.Dense(2, name="d")])
    d = model.get_layer("d")
    original = d.call

    def mine(*args, **kwargs):
        return original(*args, **kwargs) * 2.0

    d.__dict__["call"] = mine
    x = np.ones((2, 3), "float32")
    g = gp.gradients(model, x, 0, "d", compile=False)
    assert vars(d)["call"] is mine
    assert np.allclose(g.activations["d"], 2.0 * original(tf.constant(x)))


def test_report_and_attribution_calls_leave_the_model_unchanged(tmp_path):
    keras.utils.set_random_seed(0)
    model = Net()
    x = np.random.default_rng(0).random((3, 6, 6, 3)).astype("float32")
    model(x)
    before = snapshot(model, x)
    assert gp.grad_cam_layer(model, x) == model.drop.name  # last layer with (N, H, W, C) output
    gp.write_report(str(tmp_path / "r.html"), model, x, "predicted", labels=[0, 1, 2])
    assert_unchanged(model, x, before)
    with pytest.raises(gp.GradprobeError):
        gp.write_report(str(tmp_path / "r2.html"), model, x, 0, attribution_layer="nope")
    assert_unchanged(model, x, before)


@pytest.mark.parametrize("compile", ["auto", True])
def test_a_failed_trace_leaves_no_keras_name_scope_open(compile):
    # TensorFlow rejects the scope name "m<script>" while tracing; Keras has
    # already pushed its own name scope then. Variables created afterwards in
    # the process must not be named under it.
    inp = keras.Input((4,))
    model = keras.Model(inp, layers.Dense(2, name="out")(inp), name="m<script>")
    x = np.ones((3, 4), "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            gp.gradients(model, x, 1, "out", compile=compile)
        except Exception as e:  # compile=True: the trace error is raised as it is
            assert compile is True and "scope name" in str(e)
    fresh = keras.Sequential([keras.Input((3,)), layers.Dense(2, name="later")])
    assert [v.path for v in fresh.weights] == [f"{fresh.name}/later/kernel",
                                               f"{fresh.name}/later/bias"]
