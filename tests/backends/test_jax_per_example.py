"""gp.gradients(..., per_example=True) on the JAX backend of Keras 3.

Oracle: a Python loop over single examples with hand-written `jax.grad` of
`model.stateless_call` on that example alone (float64; the models use ReLU:
under `jax.jit` XLA's CPU `tanh`/`logistic` are about 1e-8 off in float64, and
Keras' LayerNormalization computes in float32 on JAX). In training mode with
BatchNormalization the oracle is the hand-written `jax.jacrev` of the batched
per-example scores (examples interact there, so the loop is another quantity).
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("JAX backend tests: run with KERAS_BACKEND=jax", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from backend_helpers import rel_close as close  # noqa: E402
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402
from gradprobe.core import _functional  # noqa: E402


def loop(model, x, value_of, training=False, jit=False):
    """{variable path: (batch, *shape)}: jax.grad of `value_of(output, i)` for
    each example `i` run alone (a batch of one) through `stateless_call`."""
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    kw = {"training": True} if training else {}
    rows = []
    for i in range(len(x)):
        xi = jax.tree.map(lambda t, i=i: t[i:i + 1], x)

        def f(tv, xi=xi, i=i):
            return jnp.sum(value_of(model.stateless_call(tv, ntv, xi, **kw)[0], i))

        grad = jax.jit(jax.grad(f)) if jit else jax.grad(f)
        rows.append(grad(tv))
    return {v.path: np.stack([np.asarray(r[j]) for r in rows])
            for j, v in enumerate(model.trainable_variables)}


def check(g, ref, rtol=1e-6):
    for key, var in g.variables.items():
        close(g[key], ref[var.path], rtol, key)


def image_model():
    """Conv2D, BatchNormalization (inference, non-trivial statistics), a Dense
    layer called twice, a Dense head (functional). (No LayerNormalization:
    Keras computes its statistics in float32 on JAX, 1e-6 off in float64.)"""
    keras.utils.set_random_seed(11)
    inp = keras.Input((6, 6, 2))
    h = layers.Conv2D(3, 3, activation="relu", name="conv")(inp)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.Flatten()(h)
    h = layers.Dense(5, activation="relu", name="pre")(h)
    shared = layers.Dense(5, activation="relu", name="shared")
    h = shared(shared(h))
    model = keras.Model(inp, layers.Dense(3, name="head")(h))
    bn = model.get_layer("bn")
    rng = np.random.default_rng(3)
    bn.moving_mean.assign(rng.normal(size=3))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=3))
    return model


def sequential():
    keras.utils.set_random_seed(12)
    return keras.Sequential([keras.Input((5,)), layers.Dense(6, activation="relu", name="h"),
                             layers.Dense(4, name="out")])


def embedding_model():
    keras.utils.set_random_seed(13)
    inp = keras.Input((5,), dtype="int32")
    h = layers.Embedding(7, 4, name="emb")(inp)
    h = layers.Flatten()(h)
    return keras.Model(inp, layers.Dense(3, name="out")(h))


@pytest.mark.parametrize("per_example,method", [(True, "vmap"), ("vmap", "vmap"),
                                                ("vectorized_map", "vmap"),
                                                ("jacobian", "jacobian")])
@pytest.mark.parametrize("compile", ["auto", False])
def test_functional_model_matches_a_loop_of_single_example_grads(x64, per_example, method,
                                                                 compile):
    model = image_model()
    x = np.random.default_rng(4).normal(size=(5, 6, 6, 2))
    labels = np.array([0, 2, 1, 1, 0])
    g = gp.gradients(model, x, labels, "*.weights", per_example=per_example, compile=compile)
    # (jitted oracle for a jitted run: XLA's float64 CPU kernels differ from eager by ~1e-7)
    check(g, loop(model, x, lambda out, i: out[:, labels[i]], jit=compile == "auto"))
    assert set(g.per_example_method) == set(g.variables)
    assert set(g.per_example_method.values()) == {method}
    assert g["conv.kernel"].shape == (5, 3, 3, 2, 3)
    close(g.outputs, model(x), 1e-6, "outputs")
    close(g.target, np.asarray(model(x))[np.arange(5), labels], 1e-6, "target")
    if method == "jacobian":
        assert set(g.per_example_fallbacks.values()) == {"per_example='jacobian' was requested"}
    else:
        assert dict(g.per_example_fallbacks) == {}
    # A loss target with sample weights (mapped over the examples with the labels).
    sw = np.array([1.0, 0.5, 2.0, 0.0, 1.5])

    def ce(y, o):
        return keras.losses.sparse_categorical_crossentropy(y, o, from_logits=True)

    g = gp.gradients(model, x, gp.loss(ce, labels, sw), ["conv.kernel", "shared.kernel", "bn.gamma"],
                     per_example=per_example, compile=compile)
    ref = loop(model, x, lambda out, i: sw[i] * ce(labels[i:i + 1], out))
    check(g, ref)
    assert not np.any(np.asarray(g["conv.kernel"][3]))  # sample weight 0


@pytest.mark.parametrize("target", ["int", "ints", "predicted", "loss", "callable"])
def test_sequential_every_per_example_target_form(x64, target):
    model = sequential()
    x = np.random.default_rng(5).normal(size=(4, 5))
    labels = np.array([3, 0, 1, 3])
    out = np.asarray(model(x))
    predicted = out.argmax(-1)
    t, value_of = {
        "int": (2, lambda o, i: o[:, 2]),
        "ints": (list(labels), lambda o, i: o[:, labels[i]]),
        "predicted": ("predicted", lambda o, i: o[:, predicted[i]]),
        "loss": (gp.loss(keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None), labels),
            lambda o, i: keras.losses.sparse_categorical_crossentropy(
                labels[i:i + 1], o, from_logits=True)),
        "callable": (lambda o: o[:, 1] * o[:, 2], lambda o, i: o[:, 1] * o[:, 2]),
    }[target]
    g = gp.gradients(model, x, t, "*.weights", per_example=True)
    check(g, loop(model, x, value_of))
    assert dict(g.per_example_method) == dict.fromkeys(["h.kernel", "h.bias", "out.kernel",
                                                        "out.bias"], "vmap")


@pytest.mark.parametrize("per_example", [True, "jacobian"])
def test_embedding_integer_input(x64, per_example):
    model = embedding_model()
    ids = np.array([[1, 2, 1, 3, 1], [0, 0, 0, 0, 0], [6, 5, 4, 3, 2]], "int32")
    g = gp.gradients(model, ids, "predicted", ["emb.embeddings", "out.weights"],
                     per_example=per_example)
    predicted = np.asarray(model(ids)).argmax(-1)
    check(g, loop(model, ids, lambda out, i: out[:, predicted[i]]))
    assert g["emb.embeddings"].shape == (3, 7, 4)
    assert set(g.per_example_method.values()) == {"vmap" if per_example is True else "jacobian"}


def test_batch_norm_in_training_mode_uses_the_jacobian_of_the_batched_pass(x64):
    model = image_model()
    x = np.random.default_rng(6).normal(size=(4, 6, 6, 2))
    labels = np.array([0, 1, 2, 0])
    before = [np.asarray(v.value) for v in model.variables]
    keys = ["conv.kernel", "bn.beta", "head.bias"]
    g = gp.gradients(model, x, labels, keys, per_example=True, training=True)
    assert set(g.per_example_method.values()) == {"jacobian"}
    assert "BatchNormalization layer 'bn'" in g.per_example_fallbacks["conv.kernel"]
    # Reference: hand-written jax.jacrev of the batched scores in training mode.
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    jac = jax.jacrev(lambda tv: model.stateless_call(tv, ntv, x, training=True)[0][
        jnp.arange(4), labels])(tv)
    for key in keys:
        pos = [id(v) for v in model.trainable_variables].index(id(g.variables[key]))
        close(g[key], jac[pos], 1e-6, key)
    # The single-example loop is a different quantity there: the test can fail.
    ref = loop(model, x, lambda out, i: out[:, labels[i]], training=True)
    assert np.max(np.abs(np.asarray(g["conv.kernel"]) - ref[g.variables["conv.kernel"].path])) > 1e-3
    for b, v in zip(before, model.variables):  # moving statistics untouched
        assert np.array_equal(b, np.asarray(v.value))
    # Asked for explicitly, vmap runs (each example normalised alone), as on TensorFlow.
    g = gp.gradients(model, x, labels, keys, per_example="vmap", training=True)
    assert set(g.per_example_method.values()) == {"vmap"}


def test_dropout_in_training_mode_keeps_one_mask_per_example(x64):
    keras.utils.set_random_seed(16)
    model = keras.Sequential([keras.Input((8,)), layers.Dense(8, name="d"),
                              layers.Dropout(0.5, name="drop"), layers.Dense(2, name="o")])
    x = np.ones((6, 8))
    g = gp.gradients(model, x, 0, "o.kernel", per_example=True, training=True)
    assert dict(g.per_example_method) == {"o.kernel": "jacobian"}
    assert "Dropout layer 'drop'" in g.per_example_fallbacks["o.kernel"]
    kept = np.asarray(g["o.kernel"])[:, :, 0] != 0
    assert len({row.tobytes() for row in kept}) > 1  # identical inputs, own masks
    head = model.get_layer("o")
    close(np.asarray(g.outputs)[:, 0], np.asarray(g["o.kernel"])[:, :, 0]
          @ np.asarray(head.kernel.value)[:, 0] + np.asarray(head.bias.value)[0], 1e-12)
    g = gp.gradients(model, x, 0, "o.kernel", per_example=True)  # inference: no noise
    assert dict(g.per_example_method) == {"o.kernel": "vmap"}


def test_activation_and_input_sources_stay_as_without_per_example(x64):
    model = image_model()
    x = np.random.default_rng(7).normal(size=(3, 6, 6, 2))
    labels = [2, 0, 1]
    plain = gp.gradients(model, x, labels, ["inputs", "conv", "shared"])
    g = gp.gradients(model, x, labels, ["inputs", "conv", "shared", "head.kernel"],
                     per_example=True)
    assert list(g) == ["inputs", "conv", "shared@0", "shared@1", "head.kernel"]
    for key in plain:
        close(g[key], plain[key], 1e-12, key)
        close(g.activations[key], plain.activations[key], 1e-12, key)
    assert dict(g.per_example_method) == {"head.kernel": "vmap"}
    ref = loop(model, x, lambda out, i: out[:, labels[i]])
    close(g["head.kernel"], ref[model.get_layer("head").kernel.path], 1e-6)
    only = gp.gradients(model, x, labels, ["inputs", "conv"], per_example=True)
    assert dict(only.per_example_method) == {}
    close(only["conv"], plain["conv"], 1e-12)


def test_unconnected_weights_get_per_example_zeros(x64):
    keras.utils.set_random_seed(14)
    inp = keras.Input((4,))
    model = keras.Model(inp, [layers.Dense(3, name="a")(inp), layers.Dense(2, name="b")(inp)])
    x = np.random.default_rng(8).normal(size=(3, 4))
    g = gp.gradients(model, x, [0, 1, 2], ["a.kernel", "b.kernel"], output=0,
                     unconnected="zero", per_example=True)
    assert g.unconnected == ("b.kernel",)
    assert g["b.kernel"].shape == (3, 4, 2) and not np.any(np.asarray(g["b.kernel"]))
    close(g["a.kernel"][1][:, 1], x[1], 1e-12)  # d out[1, 1] / d kernel[:, 1] = x[1]
    with pytest.raises(gp.GradprobeError, match="does not depend on 1 requested"):
        gp.gradients(model, x, [0, 1, 2], ["a.kernel", "b.kernel"], output=0, per_example=True)


@pytest.mark.parametrize("per_example", [True, "vmap", "jacobian"])
def test_targets_without_one_value_per_example_and_bad_values_are_refused(per_example):
    model = sequential()
    x = np.ones((2, 5), "float32")
    with pytest.raises(gp.GradprobeError, match="needs a per-example target.*a scalar"):
        gp.gradients(model, x, lambda y: jnp.sum(y), "h.kernel", per_example=per_example)
    with pytest.raises(gp.GradprobeError, match="needs a per-example target.*a scalar"):
        gp.gradients(model, x, gp.loss(keras.losses.SparseCategoricalCrossentropy(), [0, 1]),
                     "h.kernel", per_example=per_example)  # a Loss that reduces
    with pytest.raises(gp.GradprobeError, match=r"shape \(2, 4\)"):
        gp.gradients(model, x, lambda y: y, "h.kernel", per_example=per_example)
    with pytest.raises(gp.GradprobeError, match=r"Expected `per_example` to be one of 'vmap'"
                                                r".*Received: per_example='fast'"):
        gp.gradients(model, x, 0, "h.kernel", per_example="fast")
    g = gp.gradients(model, x, 0, "h.kernel", per_example=np.bool_(False))
    assert g["h.kernel"].shape == (5, 6) and dict(g.per_example_method) == {}


@pytest.mark.parametrize("per_example", [True, "jacobian"])
def test_repeated_calls_reuse_one_trace(per_example):
    model = embedding_model()
    ids = np.array([[1, 2, 1, 3, 1], [0, 0, 0, 0, 0]], "int32")
    start = _functional.trace_count()
    gp.gradients(model, ids, [0, 1], "*.weights", per_example=per_example)
    assert _functional.trace_count() == start + 1
    for labels in ([1, 0], [2, 2], [0, 1]):
        g = gp.gradients(model, ids + 1, labels, "*.weights", per_example=per_example)
    assert _functional.trace_count() == start + 1  # new values, same signature
    assert g["out.kernel"].shape == (2, 20, 3)
    gp.gradients(model, np.concatenate([ids, ids]), [0, 1, 2, 0], "*.weights",
                 per_example=per_example)
    assert _functional.trace_count() == start + 2  # a new batch size: one more trace


def test_model_is_untouched_and_plain_requests_unchanged():
    model = image_model()
    x = np.random.default_rng(9).normal(size=(3, 6, 6, 2)).astype("float32")
    before = [np.asarray(v.value) for v in model.variables]
    g = gp.gradients(model, x, 1, ["conv.kernel", "head.bias"], per_example=True)
    summed = gp.gradients(model, x, 1, ["conv.kernel", "head.bias"])
    for key in ("conv.kernel", "head.bias"):  # per-example gradients sum to the batch one
        close(np.asarray(g[key]).sum(0), summed[key], 1e-5, key)
    assert dict(summed.per_example_method) == {}
    for b, v in zip(before, model.variables):
        assert np.array_equal(b, np.asarray(v.value))
    assert "call" not in vars(model)


class HostSide(layers.Layer):
    """Adds a host computation (`jax.pure_callback` without a `vmap_method`,
    which `jax.vmap` refuses) of the stopped input: no gradient through it."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones", name="w")

    def call(self, x):
        side = jax.pure_callback(np.cos, jax.ShapeDtypeStruct(x.shape, x.dtype),
                                 jax.lax.stop_gradient(x))
        return x * self.w + side


def test_a_pass_vmap_cannot_map_falls_back_to_the_jacobian_and_says_so(x64):
    keras.utils.set_random_seed(17)
    model = keras.Sequential([keras.Input((4,)), layers.Dense(4, name="d"),
                              HostSide(name="host"), layers.Dense(3, name="o")])
    x = np.random.default_rng(10).normal(size=(3, 4))
    g = gp.gradients(model, x, [0, 1, 2], "*.weights", per_example=True)
    assert set(g.per_example_method.values()) == {"jacobian"}
    why = g.per_example_fallbacks["host.w"]
    assert "jax.vmap could not map" in why and "vmap_method" in why
    check(g, loop(model, x, lambda out, i: out[:, [0, 1, 2][i]], jit=True))
    with pytest.raises(gp.GradprobeError, match="per_example='vmap'.*vmap_method"):
        gp.gradients(model, x, [0, 1, 2], "*.weights", per_example="vmap")
