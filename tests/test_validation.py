"""Every bad argument of every public function ends in a GradprobeError that names
the argument and the received value, and leaves the model exactly as it was."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp
from tolerance import assert_close


# ------------------------------------------------------------------ models
class _Models:
    """Small models shared by the table (built once)."""

    def __init__(self):
        keras.utils.set_random_seed(0)
        inp = keras.Input((6, 6, 2))
        h = layers.Conv2D(3, 3, activation="relu", name="conv")(inp)
        h = layers.GlobalAveragePooling2D(name="gap")(h)
        self.cnn = keras.Model(inp, layers.Dense(4, name="logits")(h), name="cnn")
        self.x = np.random.default_rng(0).random((2, 6, 6, 2)).astype("float32")

        mi = keras.Input((5,))
        mh = layers.Dense(3, activation="tanh", name="h")(mi)
        self.mlp = keras.Model(mi, layers.Dense(2, name="o")(mh), name="mlp")
        self.xm = np.random.default_rng(1).random((2, 5)).astype("float32")

        a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
        cat = layers.Concatenate(name="cat")([a, b])
        self.two = keras.Model([a, b], layers.Dense(2, name="two_out")(cat), name="two")

        self.other = keras.Sequential([keras.Input((5,)), layers.Dense(2, name="od")],
                                      name="other")
        self.all = [self.cnn, self.mlp, self.two, self.other]
        for m, x in ((self.cnn, self.x), (self.mlp, self.xm), (self.other, self.xm)):
            m(x)
        self.two([np.ones((2, 3), "float32"), np.ones((2, 2), "float32")])


@pytest.fixture(scope="module")
def m():
    return _Models()


class _FakeTfKerasModel:
    """Stands in for a tf_keras (Keras 2) model: its class lives in `tf_keras`."""

    def __repr__(self):
        return "<tf_keras.Model 'legacy'>"


_FakeTfKerasModel.__module__ = "tf_keras.src.engine.training"


# ------------------------------------------------------------- the model is sacred
def _all_layers(model):
    # keras' private `_flatten_layers` is the only complete walk of nested layers
    # (sublayers of custom layers included); used read-only.
    return list(model._flatten_layers(include_self=True, recursive=True))


def snapshot(model, x):
    return {
        "weights": [np.array(v.numpy()) for v in model.weights],
        "attrs": [(id(layer), {k: id(v) for k, v in vars(layer).items()})
                  for layer in _all_layers(model)],
        "call": ["call" in vars(layer) for layer in _all_layers(model)],
        "out": np.asarray(keras.tree.flatten(model(x))[0]),
    }


def assert_unchanged(m, before):
    for model, (snap, x) in zip(m.all, before):
        after = snapshot(model, x)
        assert not any(after["call"]), f"an instance-level call is left on {model.name}"
        assert after["attrs"] == snap["attrs"], f"layer attributes of {model.name} changed"
        assert len(after["weights"]) == len(snap["weights"])
        for w0, w1 in zip(snap["weights"], after["weights"]):
            np.testing.assert_array_equal(w0, w1)
        np.testing.assert_array_equal(after["out"], snap["out"])


def _inputs_of(m, model):
    if model is m.cnn:
        return m.x
    if model is m.two:
        return [np.ones((2, 3), "float32"), np.ones((2, 2), "float32")]
    return m.xm


# ------------------------------------------------------------------- helpers
def _tape_gradient(m, **kw):
    with gp.Tape(m.mlp, watch=["h"]) as tape:
        y = m.mlp(m.xm)
    return tape.gradient(kw.pop("target", tf.reduce_sum(y)), "h", **kw)


def _report(m, tmp, model, inputs):
    return gp.write_report(str(tmp / "r.html"), model, inputs, 0, attribution=False)


NAN, INF = float("nan"), float("inf")
SPARSE_LOSS = "sparse_categorical_crossentropy"

# (id, call(m, tmp_path), argument name, received value as shown, text that must NOT appear)
CASES = [
    # ------------------------------------------------------------- gp.gradients
    ("gradients-model-None", lambda m, t: gp.gradients(None, m.x, 0, "conv"), "model", "None"),
    ("gradients-model-function", lambda m, t: gp.gradients(lambda v: v, m.x, 0, "conv"),
     "model", "<function"),
    ("gradients-model-tf_keras", lambda m, t: gp.gradients(_FakeTfKerasModel(), m.x, 0, "c"),
     "model", "<tf_keras.Model 'legacy'>"),
    ("gradients-inputs-None", lambda m, t: gp.gradients(m.cnn, None, 0, "conv"),
     "inputs", "None"),
    ("gradients-empty-batch", lambda m, t: gp.gradients(m.cnn, m.x[:0], 0, "conv"),
     "inputs", "shape=(0, 6, 6, 2)"),
    ("gradients-empty-list", lambda m, t: gp.gradients(m.two, [], 0, "cat"), "inputs", "[]"),
    ("gradients-scalar-input", lambda m, t: gp.gradients(m.mlp, np.float32(1.5), 0, "h"),
     "inputs", "1.5"),
    ("gradients-sparse-float", lambda m, t: gp.gradients(
        m.mlp, tf.sparse.from_dense(m.xm), 0, "inputs"), "inputs", "SparseTensor", "integer"),
    ("gradients-ragged-float", lambda m, t: gp.gradients(
        m.mlp, tf.RaggedTensor.from_tensor(tf.constant(m.xm)), 0, "inputs"),
     "inputs", "RaggedTensor", "integer"),
    ("gradients-complex", lambda m, t: gp.gradients(m.mlp, m.xm.astype("complex64"), 0, "h"),
     "inputs", "complex64", "integer"),
    ("gradients-string", lambda m, t: gp.gradients(m.mlp, np.full((2, 5), "a"), 0, "h"),
     "inputs", "dtype=string", "integer"),
    ("gradients-batch-mismatch", lambda m, t: gp.gradients(
        m.two, [np.ones((2, 3), "float32"), np.ones((3, 2), "float32")], 0, "cat"),
     "inputs", "shape=(3, 2)"),
    ("gradients-target-1e12", lambda m, t: gp.gradients(m.cnn, m.x, 10**12, "conv"),
     "target", "1000000000000"),
    ("gradients-target-negative", lambda m, t: gp.gradients(m.cnn, m.x, -1, "conv"),
     "target", "-1"),
    ("gradients-target-out-of-range", lambda m, t: gp.gradients(m.cnn, m.x, 7, "conv"),
     "target", "7"),
    ("gradients-targets-out-of-range", lambda m, t: gp.gradients(m.cnn, m.x, [0, 9], "conv"),
     "target", "[0, 9]"),
    ("gradients-target-float", lambda m, t: gp.gradients(m.cnn, m.x, 1.5, "conv"),
     "target", "1.5"),
    ("gradients-target-bool", lambda m, t: gp.gradients(m.cnn, m.x, True, "conv"),
     "target", "True"),
    ("gradients-target-string", lambda m, t: gp.gradients(m.cnn, m.x, "max", "conv"),
     "target", "'max'"),
    ("gradients-targets-wrong-length", lambda m, t: gp.gradients(m.cnn, m.x, [0, 1, 2], "conv"),
     "target", "[0, 1, 2]"),
    ("gradients-targets-2d", lambda m, t: gp.gradients(m.cnn, m.x, [[0], [1]], "conv"),
     "target", "[[0], [1]]"),
    ("gradients-target-float-array", lambda m, t: gp.gradients(
        m.cnn, m.x, np.array([0.0, 1.0]), "conv"), "target", "[0.0, 1.0]"),
    ("gradients-target-bare-loss", lambda m, t: gp.gradients(
        m.cnn, m.x, keras.losses.MeanSquaredError(), "conv"), "target", "MeanSquaredError"),
    ("gradients-unconnected", lambda m, t: gp.gradients(
        m.cnn, m.x, 0, "conv", unconnected="ignore"), "unconnected", "'ignore'"),
    ("gradients-compile", lambda m, t: gp.gradients(m.cnn, m.x, 0, "conv", compile="yes"),
     "compile", "'yes'"),
    ("gradients-training", lambda m, t: gp.gradients(m.cnn, m.x, 0, "conv", training="no"),
     "training", "'no'"),
    ("gradients-differentiable", lambda m, t: gp.gradients(
        m.cnn, m.x, 0, "conv", differentiable="yes"), "differentiable", "'yes'"),
    ("gradients-per_example", lambda m, t: gp.gradients(
        m.cnn, m.x, 0, "conv.kernel", per_example=1), "per_example", "1"),
    ("gradients-output-index", lambda m, t: gp.gradients(m.cnn, m.x, 0, "conv", output=5),
     "output", "5"),
    ("gradients-output-bool", lambda m, t: gp.gradients(m.cnn, m.x, 0, "conv", output=True),
     "output", "True"),
    ("gradients-output-float", lambda m, t: gp.gradients(m.cnn, m.x, 0, "conv", output=0.5),
     "output", "0.5"),
    ("gradients-wrt-int", lambda m, t: gp.gradients(m.cnn, m.x, 0, [3]), "wrt", "3"),
    ("gradients-foreign-variable-zero", lambda m, t: gp.gradients(
        m.mlp, m.xm, 0, m.other.get_layer("od").kernel, unconnected="zero"),
     "wrt", "other/od/kernel"),
    ("gradients-foreign-layer", lambda m, t: gp.gradients(
        m.mlp, m.xm, 0, m.other.get_layer("od"), unconnected="zero"), "wrt", "'od'"),
    ("gradients-inputs-count", lambda m, t: gp.gradients(m.two, np.ones((2, 3), "float32"), 0,
                                                         "cat"), "inputs", "shape=(2, 3)"),
    # ---------------------------------------------------------- Gradients methods
    ("result-diagnose-negative", lambda m, t: gp.gradients(m.mlp, m.xm, 0, "h").diagnose(
        vanishing=-1), "vanishing", "-1"),
    ("result-diagnose-nan", lambda m, t: gp.gradients(m.mlp, m.xm, 0, "h").diagnose(
        exploding=NAN), "exploding", "nan"),
    ("result-diagnose-unknown", lambda m, t: gp.gradients(m.mlp, m.xm, 0, "h").diagnose(
        vanish=0.1), "vanish", "0.1"),
    ("result-summary-print_fn", lambda m, t: gp.gradients(m.mlp, m.xm, 0, "h").summary(
        print_fn=3), "print_fn", "3"),
    ("result-summary-findings", lambda m, t: gp.gradients(m.mlp, m.xm, 0, "h").summary(
        print_fn=print, findings="no"), "findings", "'no'"),
    # ------------------------------------------------------------------ gp.loss
    ("loss-fn-int", lambda m, t: gp.loss(3, [0, 1]), "loss_fn", "3"),
    ("loss-fn-unknown-name", lambda m, t: gp.loss("nope", [0, 1]), "loss_fn", "'nope'"),
    ("loss-fn-class", lambda m, t: gp.loss(keras.losses.MeanSquaredError, [0, 1]),
     "loss_fn", "MeanSquaredError"),
    ("loss-y_true-None", lambda m, t: gp.loss(SPARSE_LOSS, None), "y_true", "None"),
    ("loss-y_true-strings", lambda m, t: gp.loss("mse", ["a", "b"]), "y_true", "['a', 'b']"),
    ("loss-labels-out-of-range", lambda m, t: gp.gradients(
        m.cnn, m.x, gp.loss(SPARSE_LOSS, [0, 9]), "conv"), "y_true", "[0, 9]"),
    ("loss-labels-out-of-range-object", lambda m, t: gp.gradients(
        m.cnn, m.x, gp.loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                            np.array([4, 1])), "conv"), "y_true", "[4, 1]"),
    ("loss-labels-negative", lambda m, t: gp.loss(SPARSE_LOSS, [-1, 0]), "y_true", "[-1, 0]"),
    ("loss-labels-fractional", lambda m, t: gp.loss(SPARSE_LOSS, [0.5, 1.0]),
     "y_true", "[0.5, 1.0]"),
    ("loss-labels-wrong-length", lambda m, t: gp.gradients(
        m.cnn, m.x, gp.loss(SPARSE_LOSS, [0, 1, 2]), "conv"), "y_true", "[0, 1, 2]"),
    ("loss-sample_weight-length", lambda m, t: gp.gradients(
        m.cnn, m.x, gp.loss(SPARSE_LOSS, [0, 1], sample_weight=[1.0]), "conv"),
     "sample_weight", "[1.0]"),
    ("loss-sample_weight-nan", lambda m, t: gp.loss("mse", [0, 1], sample_weight=[NAN, 1.0]),
     "sample_weight", "[nan, 1.0]"),
    # ------------------------------------------------------------------ saliency
    ("saliency-model-None", lambda m, t: gp.saliency(None, m.x, 0), "model", "None"),
    ("saliency-reduce_channels", lambda m, t: gp.saliency(m.cnn, m.x, 0,
                                                          reduce_channels="median"),
     "reduce_channels", "'median'"),
    ("saliency-batch_size-0", lambda m, t: gp.saliency(m.cnn, m.x, 0, batch_size=0),
     "batch_size", "0"),
    ("saliency-batch_size-float", lambda m, t: gp.saliency(m.cnn, m.x, 0, batch_size=2.5),
     "batch_size", "2.5"),
    ("saliency-batch_size-string", lambda m, t: gp.saliency(m.cnn, m.x, 0, batch_size="4"),
     "batch_size", "'4'"),
    ("saliency-absolute", lambda m, t: gp.saliency(m.cnn, m.x, 0, absolute="yes"),
     "absolute", "'yes'"),
    ("saliency-target-1e12", lambda m, t: gp.saliency(m.cnn, m.x, 10**12),
     "target", "1000000000000"),
    ("gradient_x_input-model-None", lambda m, t: gp.gradient_x_input(None, m.x, 0),
     "model", "None"),
    ("gradient_x_input-empty", lambda m, t: gp.gradient_x_input(m.cnn, m.x[:0], 0),
     "inputs", "shape=(0, 6, 6, 2)"),
    ("gradient_x_input-batch_size-bool", lambda m, t: gp.gradient_x_input(
        m.cnn, m.x, 0, batch_size=True), "batch_size", "True"),
    # ---------------------------------------------------------------- smoothgrad
    ("smoothgrad-noise-nan", lambda m, t: gp.smoothgrad(m.cnn, m.x, 0, noise=NAN, samples=2),
     "noise", "nan"),
    ("smoothgrad-noise-negative", lambda m, t: gp.smoothgrad(m.cnn, m.x, 0, noise=-0.1),
     "noise", "-0.1"),
    ("smoothgrad-noise-inf", lambda m, t: gp.smoothgrad(m.cnn, m.x, 0, noise=INF),
     "noise", "inf"),
    ("smoothgrad-noise-string", lambda m, t: gp.smoothgrad(m.cnn, m.x, 0, noise="0.1"),
     "noise", "'0.1'"),
    ("smoothgrad-samples-0", lambda m, t: gp.smoothgrad(m.cnn, m.x, 0, samples=0),
     "samples", "0"),
    ("smoothgrad-samples-float", lambda m, t: gp.smoothgrad(m.cnn, m.x, 0, samples=2.5),
     "samples", "2.5"),
    ("smoothgrad-samples-string", lambda m, t: gp.smoothgrad(m.cnn, m.x, 0, samples="25"),
     "samples", "'25'"),
    ("smoothgrad-seed", lambda m, t: gp.smoothgrad(m.cnn, m.x, 0, samples=2, seed="x"),
     "seed", "'x'"),
    ("smoothgrad-model-None", lambda m, t: gp.smoothgrad(None, m.x, 0, samples=2),
     "model", "None"),
    # -------------------------------------------------------- integrated gradients
    ("ig-steps-float", lambda m, t: gp.integrated_gradients(m.cnn, m.x, 0, steps=2.5),
     "steps", "2.5"),
    ("ig-steps-string", lambda m, t: gp.integrated_gradients(m.cnn, m.x, 0, steps="50"),
     "steps", "'50'"),
    ("ig-steps-1", lambda m, t: gp.integrated_gradients(m.cnn, m.x, 0, steps=1), "steps", "1"),
    ("ig-steps-bool", lambda m, t: gp.integrated_gradients(m.cnn, m.x, 0, steps=True),
     "steps", "True"),
    ("ig-method", lambda m, t: gp.integrated_gradients(m.cnn, m.x, 0, method="simpson"),
     "method", "'simpson'"),
    ("ig-baseline-shape", lambda m, t: gp.integrated_gradients(
        m.cnn, m.x, 0, baseline=np.zeros((3, 3), "float32")), "baseline", "shape=(3, 3)"),
    ("ig-baseline-strings", lambda m, t: gp.integrated_gradients(
        m.cnn, m.x, 0, baseline=np.array(["a"])), "baseline", "['a']"),
    ("ig-model-None", lambda m, t: gp.integrated_gradients(None, m.x, 0), "model", "None"),
    ("ig-batch_size-negative", lambda m, t: gp.integrated_gradients(
        m.cnn, m.x, 0, batch_size=-1), "batch_size", "-1"),
    ("ig-complex-input", lambda m, t: gp.integrated_gradients(
        m.cnn, m.x.astype("complex64"), 0), "inputs", "complex64", "integer"),
    # ------------------------------------------------------------------ grad_cam
    ("grad_cam-channel_axis-5", lambda m, t: gp.grad_cam(m.cnn, m.x, 0, "conv",
                                                         channel_axis=5),
     "channel_axis", "5"),
    ("grad_cam-channel_axis-0", lambda m, t: gp.grad_cam(m.cnn, m.x, 0, "conv",
                                                         channel_axis=0),
     "channel_axis", "0"),
    ("grad_cam-channel_axis-float", lambda m, t: gp.grad_cam(m.cnn, m.x, 0, "conv",
                                                             channel_axis=1.5),
     "channel_axis", "1.5"),
    ("grad_cam-channel_axis-string", lambda m, t: gp.grad_cam(m.cnn, m.x, 0, "conv",
                                                              channel_axis="-1"),
     "channel_axis", "'-1'"),
    ("grad_cam-model-None", lambda m, t: gp.grad_cam(None, m.x, 0, "conv"), "model", "None"),
    ("grad_cam-layer-None", lambda m, t: gp.grad_cam(m.cnn, m.x, 0, None), "layer", "None"),
    ("grad_cam-layer-list", lambda m, t: gp.grad_cam(m.cnn, m.x, 0, ["conv", "gap"]),
     "layer", "['conv', 'gap']"),
    ("report-max_images", lambda m, t: gp.write_report(str(t / "r.html"), m.cnn, m.x, 0,
                                                       max_images=0), "max_images", "0"),
    ("grad_cam-relu", lambda m, t: gp.grad_cam(m.cnn, m.x, 0, "conv", relu="no"),
     "relu", "'no'"),
    ("grad_cam-target-1e12", lambda m, t: gp.grad_cam(m.cnn, m.x, 10**12, "conv"),
     "target", "1000000000000"),
    ("grad_cam_pp-model-None", lambda m, t: gp.grad_cam_plus_plus(None, m.x, 0, "conv"),
     "model", "None"),
    ("grad_cam_pp-channel_axis--5", lambda m, t: gp.grad_cam_plus_plus(
        m.cnn, m.x, 0, "conv", channel_axis=-5), "channel_axis", "-5"),
    ("grad_cam_layer-model-None", lambda m, t: gp.grad_cam_layer(None, m.x), "model", "None"),
    ("grad_cam_layer-empty", lambda m, t: gp.grad_cam_layer(m.cnn, m.x[:0]),
     "inputs", "shape=(0, 6, 6, 2)"),
    # ----------------------------------------------------------------------- hvp
    ("hvp-vector-shape", lambda m, t: gp.hvp(m.mlp, m.xm, 0, "o.kernel", np.ones(7)),
     "vector", "[1.0, 1.0, 1.0"),
    ("hvp-vector-None", lambda m, t: gp.hvp(m.mlp, m.xm, 0, "o.kernel", None),
     "vector", "None"),
    ("hvp-vector-strings", lambda m, t: gp.hvp(m.mlp, m.xm, 0, "o.kernel",
                                               np.full((3, 2), "a")), "vector", "dtype=str"),
    ("hvp-vector-dict-missing", lambda m, t: gp.hvp(
        m.mlp, m.xm, 0, ["o.kernel", "o.bias"], {"o.kernel": np.ones((3, 2))}),
     "vector", "'o.kernel'"),
    ("hvp-vector-list-length", lambda m, t: gp.hvp(
        m.mlp, m.xm, 0, ["o.kernel", "o.bias"], [np.ones((3, 2))] * 3), "vector", "list of 3"),
    ("hvp-activation-vector-shape", lambda m, t: gp.hvp(m.mlp, m.xm, 0, "h", np.ones((2, 4))),
     "vector", "shape=(2, 4)"),
    ("hvp-model-None", lambda m, t: gp.hvp(None, m.xm, 0, "o.kernel", np.ones((3, 2))),
     "model", "None"),
    # ------------------------------------------------------------------ jacobian
    ("jacobian-swapped", lambda m, t: gp.jacobian(m.mlp, m.xm, of="h", wrt="o"), "of", "'h'"),
    ("jacobian-max_bytes-0", lambda m, t: gp.jacobian(m.mlp, m.xm, "o", "h", max_bytes=0),
     "max_bytes", "0"),
    ("jacobian-max_bytes-string", lambda m, t: gp.jacobian(m.mlp, m.xm, "o", "h",
                                                           max_bytes="1e9"),
     "max_bytes", "'1e9'"),
    ("jacobian-of-None", lambda m, t: gp.jacobian(m.mlp, m.xm, None, "h"), "of", "None"),
    ("jacobian-foreign-layer", lambda m, t: gp.jacobian(m.mlp, m.xm, m.other.get_layer("od"),
                                                        "h"), "of", "'od'"),
    ("jacobian-model-None", lambda m, t: gp.jacobian(None, m.xm, "o"), "model", "None"),
    ("jacobian-empty", lambda m, t: gp.jacobian(m.mlp, m.xm[:0], "o"),
     "inputs", "shape=(0, 5)"),
    # ---------------------------------------------------------- gradient_penalty
    ("penalty-norm-3", lambda m, t: gp.gradient_penalty(m.mlp, m.xm, 0, norm=3), "norm", "3"),
    ("penalty-norm-string", lambda m, t: gp.gradient_penalty(m.mlp, m.xm, 0, norm="l2"),
     "norm", "'l2'"),
    ("penalty-norm-bool", lambda m, t: gp.gradient_penalty(m.mlp, m.xm, 0, norm=True),
     "norm", "True"),
    ("penalty-model-None", lambda m, t: gp.gradient_penalty(None, m.xm, 0), "model", "None"),
    # --------------------------------------------------------- per_example_norms
    ("per_example-method", lambda m, t: gp.per_example_norms(m.mlp, m.xm, 0, method="fast"),
     "method", "'fast'"),
    ("per_example-model-None", lambda m, t: gp.per_example_norms(None, m.xm, 0),
     "model", "None"),
    ("per_example-target-1e12", lambda m, t: gp.per_example_norms(m.mlp, m.xm, 10**12),
     "target", "1000000000000"),
    ("per_example-labels", lambda m, t: gp.per_example_norms(
        m.mlp, m.xm, gp.loss(SPARSE_LOSS, [0, 2])), "y_true", "[0, 2]"),
    # ---------------------------------------------------------------------- Tape
    ("tape-model-None", lambda m, t: gp.Tape(None), "model", "None"),
    ("tape-persistent", lambda m, t: gp.Tape(m.mlp, persistent="yes"), "persistent", "'yes'"),
    ("tape-gradient-unconnected", lambda m, t: _tape_gradient(m, unconnected="ignore"),
     "unconnected", "'ignore'"),
    ("tape-gradient-target-None", lambda m, t: _tape_gradient(m, target=None),
     "target", "None"),
    ("tape-gradient-differentiable", lambda m, t: _tape_gradient(m, differentiable="no"),
     "differentiable", "'no'"),
    # -------------------------------------------------------------- write_report
    ("report-model-None", lambda m, t: _report(m, t, None, m.x), "model", "None"),
    ("report-inputs-None", lambda m, t: _report(m, t, m.cnn, None), "inputs", "None"),
    ("report-empty", lambda m, t: _report(m, t, m.cnn, m.x[:0]), "inputs",
     "shape=(0, 6, 6, 2)"),
]


def _params():
    out = []
    for case in CASES:
        name, call, arg, received, *absent = case
        out.append(pytest.param(call, arg, received, absent, id=name))
    return out


def test_table_is_large_and_covers_every_public_function():
    assert len(CASES) >= 60
    prefixes = {c[0].split("-")[0] for c in CASES}
    for fn in ("gradients", "result", "loss", "saliency", "gradient_x_input", "smoothgrad", "ig",
               "grad_cam", "grad_cam_pp", "grad_cam_layer", "hvp", "jacobian", "penalty",
               "per_example", "tape", "report"):
        assert fn in prefixes, fn


@pytest.mark.parametrize("call, arg, received, absent", _params())
def test_bad_argument(m, tmp_path, call, arg, received, absent):
    before = [(snapshot(model, _inputs_of(m, model)), _inputs_of(m, model)) for model in m.all]
    with pytest.raises(gp.GradprobeError) as info:
        call(m, tmp_path)
    message = str(info.value)
    assert arg in message, message
    assert received in message, message
    for text in absent:
        assert text not in message, message
    assert "Traceback" not in message
    assert_unchanged(m, before)
    assert not (tmp_path / "r.html").exists()


# --------------------------------------------------- the checks accept what is right
def test_numpy_integers_and_defaults_are_accepted(m):
    ig = gp.integrated_gradients(m.mlp, m.xm, np.int64(1), steps=np.int32(4),
                                 batch_size=np.int64(4))
    ref = gp.integrated_gradients(m.mlp, m.xm, 1, steps=4)
    assert_close(np.asarray(ig), np.asarray(ref), "float32")
    sg = gp.smoothgrad(m.mlp, m.xm, 0, samples=np.int64(2), noise=0, seed=np.int64(3))
    sal = gp.saliency(m.mlp, m.xm, 0)
    assert_close(np.asarray(sg), np.asarray(sal), "float32")  # no noise
    assert gp.gradients(m.mlp, m.xm, np.array([0, 1], "int32"), "h")["h"].shape == (2, 3)


def test_channel_axis_one_means_channels_first(m):
    """channel_axis=1 on an (N, H, W, C) activation treats H as channels, which is
    what channels_first asks for: the map is over (W, C), computed by hand here."""
    g = gp.gradients(m.cnn, m.x, 0, "conv")
    a, da = g.activations["conv"].numpy(), g["conv"].numpy()
    w = da.mean(axis=(2, 3), keepdims=True)
    expected = np.maximum((w * a).sum(axis=1), 0)
    cam = gp.grad_cam(m.cnn, m.x, 0, "conv", channel_axis=1, upsample=False, normalize=False)
    assert_close(np.asarray(cam), expected, "float32")
    neg = gp.grad_cam(m.cnn, m.x, 0, "conv", channel_axis=-3, upsample=False, normalize=False)
    assert_close(np.asarray(neg), expected, "float32")


def test_jacobian_in_the_right_order_is_the_derivative(m):
    j = gp.jacobian(m.mlp, m.xm, of="o", wrt="h").numpy()
    kernel = m.mlp.get_layer("o").kernel.numpy()
    assert_close(j, np.broadcast_to(kernel.T, (2, 2, 3)), "float32")


def test_hvp_vector_of_another_float_dtype_is_cast(m):
    v = np.ones((3, 2))  # float64, for a float32 kernel
    out = gp.hvp(m.mlp, m.xm, gp.loss("mse", np.zeros((2, 2))), "o.kernel", v)["o.kernel"]
    out32 = gp.hvp(m.mlp, m.xm, gp.loss("mse", np.zeros((2, 2))), "o.kernel",
                   v.astype("float32"))["o.kernel"]
    assert out.dtype == tf.float32
    assert_close(out.numpy(), out32.numpy(), "float32")
    assert np.any(out.numpy() != 0)


def test_sparse_loss_in_range_and_ignore_class(m):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1,
                                                      reduction=None)
    g = gp.gradients(m.mlp, m.xm, gp.loss(loss, [1, -1]), "o")
    # the ignored example contributes nothing
    assert not np.any(g["o"].numpy()[1]) and np.any(g["o"].numpy()[0])


def test_baseline_broadcast_is_accepted(m):
    per_example = gp.integrated_gradients(m.cnn, m.x, 0, baseline=np.full(m.x.shape, 0.5),
                                          steps=4)
    shared = gp.integrated_gradients(m.cnn, m.x, 0, baseline=np.full(m.x.shape[1:], 0.5),
                                     steps=4)
    assert_close(np.asarray(per_example), np.asarray(shared), "float32")
    assert math.isfinite(float(np.abs(shared.delta).max()))
