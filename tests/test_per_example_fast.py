"""gp.gradients(..., per_example=True): every method against a Python loop of
hand-written single-example tapes (float64), the method reported per key, the
Jacobian fallback when tf.vectorized_map cannot convert an op, and the
Jacobian when examples interact (BatchNormalization with training=True)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp
from oracle import assert_close

LOSS = keras.losses.sparse_categorical_crossentropy


def _image_model():
    """Conv2D, BatchNormalization (inference), LayerNormalization, a Dense layer
    called twice, and a Dense head."""
    keras.utils.set_random_seed(11)
    inp = keras.Input((6, 6, 2))
    h = layers.Conv2D(3, 3, activation="tanh", name="conv")(inp)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.Flatten()(h)
    h = layers.Dense(5, activation="tanh", name="pre")(h)
    h = layers.LayerNormalization(name="ln")(h)
    shared = layers.Dense(5, activation="tanh", name="shared")
    h = shared(shared(h))
    model = keras.Model(inp, layers.Dense(3, name="head")(h))
    bn = model.get_layer("bn")  # non-trivial inference statistics
    rng = np.random.default_rng(3)
    bn.moving_mean.assign(rng.normal(size=3))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=3))
    return model


def _embedding_model():
    keras.utils.set_random_seed(12)
    inp = keras.Input((5,), dtype="int32")
    h = layers.Embedding(7, 4, name="emb")(inp)
    h = layers.Flatten()(h)
    return keras.Model(inp, layers.Dense(3, name="out")(h))


class SegmentPool(layers.Layer):
    """Sums feature pairs with tf.math.segment_sum, an op tf.vectorized_map has no
    converter for (its gradient, a gather, is convertible)."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones", name="w")

    def call(self, x):
        ids = tf.range(x.shape[-1]) // 2
        return tf.transpose(tf.math.segment_sum(tf.transpose(x * self.w), ids))

    def compute_output_shape(self, shape):
        return (*shape[:-1], (shape[-1] + 1) // 2)


def _unconvertible_model():
    keras.utils.set_random_seed(13)
    inp = keras.Input((6,))
    h = layers.Dense(4, activation="tanh", name="d")(inp)
    h = SegmentPool(name="pool")(h)
    return keras.Model(inp, layers.Dense(3, name="out")(h))


def _loop(model, x, value_of, training=False):
    """Hand-written reference: one tape per example, on that example alone.
    Returns {variable path: (batch, *shape)}."""
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as t:
            v = tf.reduce_sum(value_of(model(x[i:i + 1], training=training), i))
        grads = t.gradient(v, [w.value for w in model.trainable_weights])
        rows.append([np.asarray(tf.convert_to_tensor(g)) for g in grads])
    return {w.path: np.stack(col) for w, col in zip(model.trainable_weights, zip(*rows))}


def _check(g, ref, rtol=1e-6):
    assert {v.path for v in g.variables.values()} == set(ref)
    for key, var in g.variables.items():
        assert_close(g[key], ref[var.path], rtol, key)


@pytest.mark.parametrize("per_example,method", [(True, "vectorized_map"),
                                                ("vectorized_map", "vectorized_map"),
                                                ("jacobian", "jacobian")])
@pytest.mark.parametrize("compile", ["auto", False])
def test_every_method_matches_a_loop_of_single_example_tapes(float64, per_example, method,
                                                             compile):
    model = _image_model()
    x = np.random.default_rng(4).normal(size=(5, 6, 6, 2))
    labels = np.array([0, 2, 1, 1, 0])

    g = gp.gradients(model, x, labels, "*.weights", per_example=per_example, compile=compile)
    _check(g, _loop(model, x, lambda out, i: out[:, labels[i]]))
    assert set(g.per_example_method) == set(g.variables)
    assert set(g.per_example_method.values()) == {method}
    assert g["conv.kernel"].shape == (5, 3, 3, 2, 3)
    assert g.target.shape == (5,)
    expected_out = model(x)
    assert_close(g.outputs, expected_out, 1e-12, "outputs")
    if method == "jacobian":
        assert set(g.per_example_fallbacks.values()) == {"per_example='jacobian' was requested"}
    else:
        assert dict(g.per_example_fallbacks) == {}

    # A loss target with sample weights (mapped over the examples with the labels).
    sw = np.array([1.0, 0.5, 2.0, 0.0, 1.5])
    g = gp.gradients(model, x, gp.loss(lambda y, o: LOSS(y, o, from_logits=True), labels, sw),
                     ["conv.kernel", "shared.kernel", "bn.gamma"], per_example=per_example,
                     compile=compile)
    ref = _loop(model, x, lambda out, i: sw[i] * LOSS(labels[i:i + 1], out, from_logits=True))
    for key in ("conv.kernel", "shared.kernel", "bn.gamma"):
        assert_close(g[key], ref[g.variables[key].path], 1e-6, key)
    assert np.all(np.asarray(g["conv.kernel"][3]) == 0.0)  # sample weight 0


@pytest.mark.parametrize("per_example", [True, "jacobian"])
def test_embedding_per_example_gradients_match_loop(float64, per_example):
    model = _embedding_model()
    ids = np.array([[1, 2, 1, 3, 1], [0, 0, 0, 0, 0], [6, 5, 4, 3, 2]], "int32")
    g = gp.gradients(model, ids, "predicted", ["emb.embeddings", "out.weights"],
                     per_example=per_example)
    predicted = np.argmax(model(ids), axis=-1)
    _check(g, _loop(model, ids, lambda out, i: out[:, predicted[i]]))
    assert g["emb.embeddings"].shape == (3, 7, 4)
    assert set(g.per_example_method.values()) == {
        "vectorized_map" if per_example is True else "jacobian"}


def test_unconvertible_op_falls_back_to_the_jacobian_and_says_so(float64):
    model = _unconvertible_model()
    x = np.random.default_rng(5).normal(size=(4, 6))
    g = gp.gradients(model, x, [0, 1, 2, 0], "*.weights", per_example=True)
    assert set(g.per_example_method.values()) == {"jacobian"}
    assert set(g.per_example_method) == {"d.kernel", "d.bias", "pool.w", "out.kernel",
                                         "out.bias"}
    why = g.per_example_fallbacks["pool.w"]
    assert "tf.vectorized_map could not vectorise" in why and "SegmentSum" in why
    _check(g, _loop(model, x, lambda out, i: out[:, [0, 1, 2, 0][i]]))

    with pytest.raises(gp.GradprobeError, match="per_example='vectorized_map'.*SegmentSum"):
        gp.gradients(model, x, [0, 1, 2, 0], "*.weights", per_example="vectorized_map")


def test_batch_norm_in_training_mode_uses_the_jacobian_of_the_batched_pass(float64):
    model = _image_model()
    x = np.random.default_rng(6).normal(size=(4, 6, 6, 2))
    labels = [0, 1, 2, 0]
    g = gp.gradients(model, x, labels, ["conv.kernel", "bn.beta", "head.bias"],
                     per_example=True, training=True)
    assert set(g.per_example_method.values()) == {"jacobian"}
    assert "BatchNormalization layer 'bn'" in g.per_example_fallbacks["conv.kernel"]
    # Reference: hand-written tape over the whole batch in training mode (batch
    # statistics couple the examples), the gradient of example i's score.
    variables = [model.get_layer("conv").kernel, model.get_layer("bn").beta,
                 model.get_layer("head").bias]
    with keras.StatelessScope(), tf.GradientTape(persistent=True) as t:
        scores = tf.gather(model(x, training=True), labels, axis=1, batch_dims=1)
        per_example = [scores[i] for i in range(len(x))]
    for key, var in zip(["conv.kernel", "bn.beta", "head.bias"], variables):
        ref = np.stack([t.gradient(s, var.value) for s in per_example])
        assert_close(g[key], ref, 1e-6, key)
    # In training mode the single-example loop is a different quantity: the test can fail.
    loop = _loop(model, x, lambda out, i: out[:, labels[i]], training=True)
    assert np.max(np.abs(np.asarray(g["conv.kernel"]) - loop[variables[0].path])) > 1e-3


@pytest.mark.parametrize("per_example", [True, "jacobian"])
def test_activation_and_input_sources_stay_as_without_per_example(float64, per_example):
    model = _image_model()
    x = np.random.default_rng(7).normal(size=(3, 6, 6, 2))
    labels = [2, 0, 1]
    plain = gp.gradients(model, x, labels, ["inputs", "conv", "shared"])
    g = gp.gradients(model, x, labels, ["inputs", "conv", "shared", "head.kernel"],
                     per_example=per_example)
    assert list(g) == ["inputs", "conv", "shared@0", "shared@1", "head.kernel"]
    for key in plain:
        assert_close(g[key], plain[key], 1e-12, key)
        assert_close(g.activations[key], plain.activations[key], 1e-12, key)
    assert list(g.per_example_method) == ["head.kernel"]
    ref = _loop(model, x, lambda out, i: out[:, labels[i]])
    assert_close(g["head.kernel"], ref[model.get_layer("head").kernel.path], 1e-6)

    only = gp.gradients(model, x, labels, ["inputs", "conv"], per_example=per_example)
    assert dict(only.per_example_method) == {}
    assert_close(only["conv"], plain["conv"], 1e-12)


@pytest.mark.parametrize("per_example", [True, "jacobian"])
def test_unconnected_weights_get_per_example_zeros(float64, per_example):
    keras.utils.set_random_seed(14)
    inp = keras.Input((4,))
    a = layers.Dense(3, name="a")(inp)
    b = layers.Dense(2, name="b")(inp)
    model = keras.Model(inp, [a, b])
    x = np.random.default_rng(8).normal(size=(3, 4))
    g = gp.gradients(model, x, [0, 1, 2], ["a.kernel", "b.kernel"], output=0,
                     unconnected="zero", per_example=per_example)
    assert g.unconnected == ("b.kernel",)
    assert g["b.kernel"].shape == (3, 4, 2)
    assert np.all(np.asarray(g["b.kernel"]) == 0.0)
    assert_close(g["a.kernel"][1][:, 1], x[1], 1e-12)  # d out[1] / d kernel[:, 1] = x
    with pytest.raises(gp.GradprobeError, match="does not depend on 1 requested"):
        gp.gradients(model, x, [0, 1, 2], ["a.kernel", "b.kernel"], output=0,
                     per_example=per_example)


@pytest.mark.parametrize("per_example", [True, "vectorized_map", "jacobian"])
def test_scalar_targets_and_bad_values_are_refused(per_example):
    keras.utils.set_random_seed(15)
    model = keras.Sequential([keras.Input((3,)), layers.Dense(2, name="d")])
    x = np.ones((2, 3), "float32")
    with pytest.raises(gp.GradprobeError, match="needs a per-example target"):
        gp.gradients(model, x, lambda y: tf.reduce_sum(y), "d.kernel", per_example=per_example)
    with pytest.raises(gp.GradprobeError,
                       match=r"Expected `per_example` to be one of 'vectorized_map'.*Received: per_example='fast'"):
        gp.gradients(model, x, 0, "d.kernel", per_example="fast")
    g = gp.gradients(model, x, 0, "d.kernel", per_example=np.bool_(False))
    assert g["d.kernel"].shape == (3, 2) and dict(g.per_example_method) == {}


def test_repeated_calls_reuse_one_trace(float64):
    model = _embedding_model()
    ids = np.array([[1, 2, 1, 3, 1], [0, 0, 0, 0, 0]], "int32")
    traces = []
    original = model.call

    def counting(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    gp.gradients(model, ids, [0, 1], "*.weights", per_example=True)
    model.call = counting
    try:
        for labels in ([1, 0], [2, 2], [0, 1]):
            gp.gradients(model, ids + 1, labels, "*.weights", per_example=True)
    finally:
        del model.call
    assert traces == []  # no new trace: the vectorised function was compiled once


def test_dropout_in_training_mode_keeps_one_mask_per_example(float64):
    keras.utils.set_random_seed(16)
    model = keras.Sequential([keras.Input((8,)), layers.Dense(8, name="d"),
                              layers.Dropout(0.5, name="drop"), layers.Dense(2, name="o")])
    x = np.ones((6, 8))
    g = gp.gradients(model, x, 0, "o.kernel", per_example=True, training=True)
    assert dict(g.per_example_method) == {"o.kernel": "jacobian"}
    assert "Dropout layer 'drop'" in g.per_example_fallbacks["o.kernel"]
    # d out[i, 0] / d o.kernel[:, 0] is example i's dropped-out hidden vector: identical
    # inputs, so the examples differ only by their own masks (and agree with the outputs).
    kept = np.asarray(g["o.kernel"])[:, :, 0] != 0
    assert len({row.tobytes() for row in kept}) > 1
    head = model.get_layer("o")
    assert_close(np.asarray(g.outputs)[:, 0],
                 np.asarray(g["o.kernel"])[:, :, 0] @ head.kernel.numpy()[:, 0]
                 + head.bias.numpy()[0], 1e-12)
    g = gp.gradients(model, x, 0, "o.kernel", per_example=True)  # inference: no noise
    assert dict(g.per_example_method) == {"o.kernel": "vectorized_map"}


def test_forced_fallback_forces_the_jacobian_only_for_jacobian_or_coupled_auto():
    """per_example.forced_fallback: the one decision (TensorFlow, JAX, PyTorch) of
    whether the single-example method is skipped, and why. It reads only the
    plan's `training`."""
    from types import SimpleNamespace

    from gradprobe.core.capture.per_example import forced_fallback

    keras.utils.set_random_seed(17)
    model = keras.Sequential([keras.Input((4,)), layers.Dense(4, name="d"),
                              layers.BatchNormalization(name="bn"), layers.Dense(2, name="o")])
    train, infer = SimpleNamespace(training=True), SimpleNamespace(training=False)
    assert forced_fallback(model, infer, "jacobian") == "per_example='jacobian' was requested"
    assert forced_fallback(model, train, "jacobian") == "per_example='jacobian' was requested"
    assert "BatchNormalization layer 'bn'" in forced_fallback(model, train, "auto")
    assert forced_fallback(model, infer, "auto") == ""
    # A single-example method named explicitly is tried even when examples interact.
    assert forced_fallback(model, train, "vectorized_map") == ""
    x = np.random.default_rng(17).normal(size=(5, 4)).astype("float32")
    g = gp.gradients(model, x, 0, "o.kernel", per_example="vectorized_map", training=True)
    assert dict(g.per_example_method) == {"o.kernel": "vectorized_map"}
    assert dict(g.per_example_fallbacks) == {}
    dropout = keras.Sequential([keras.Input((4,)), layers.Dropout(0.5, name="drop"),
                                layers.Dense(2, name="o")])
    assert "tf.vectorized_map would draw once" in forced_fallback(dropout, train, "auto")
