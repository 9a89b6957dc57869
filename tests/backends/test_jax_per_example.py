"""gp.gradients(..., per_example=True) on the JAX backend of Keras 3: what only
JAX has (its trace cache, the fallback when jax.vmap cannot map a pass, Dropout's
own mask per example, the refusals). The per-example tests that are the same on
JAX and PyTorch are in test_common_per_example.py.

Oracle: a Python loop over single examples with hand-written `jax.grad` of
`model.stateless_call` on that example alone (`B.example_grads`, float64; the
models use ReLU: under `jax.jit` XLA's CPU `tanh`/`logistic` are about 1e-8 off
in float64, and Keras' LayerNormalization computes in float32 on JAX).
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("JAX backend tests: run with KERAS_BACKEND=jax", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from backend_helpers import (  # noqa: E402
    embedding_model,
    oracle,
    per_example_image_model,
    relu_sequential,
)
from backend_helpers import rel_close as close  # noqa: E402
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402
from gradprobe.core.capture import functional as _functional  # noqa: E402

B = oracle()  # hand-written jax.grad (B.example_grads: the per-example loop)


def check(g, ref, rtol=1e-6):
    for key, var in g.variables.items():
        close(g[key], ref[var.path], rtol, key)


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
    model = per_example_image_model()
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
    ref = B.example_grads(model, x, lambda out, i: out[:, labels[i]])
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
    model = relu_sequential()
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
    model = per_example_image_model()
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
    check(g, B.example_grads(model, x, lambda out, i: out[:, [0, 1, 2][i]], jit=True))
    with pytest.raises(gp.GradprobeError, match="per_example='vmap'.*vmap_method"):
        gp.gradients(model, x, [0, 1, 2], "*.weights", per_example="vmap")
