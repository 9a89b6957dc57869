"""gp.gradients(..., per_example=True) on the JAX and PyTorch backends of Keras 3,
written once for both. What "auto" picks differs: `jax.vmap` on JAX ("vmap"),
single-example passes one after the other on PyTorch ("loop"); both fall back to
the Jacobian of the batched pass when examples interact. What only one backend
has stays in test_jax_per_example.py and test_torch_per_example.py.

Run with `KERAS_BACKEND=jax` (or `torch`) `python -m pytest tests/backends`.
Under any other backend the module is skipped.

Oracle: a Python loop over single examples with hand-written gradient code of the
active backend (`jax.grad`, jitted for a jitted run, or `torch.autograd.grad`,
through `backend_helpers.oracle()`) of `model.stateless_call` on that example
alone (float64; the models use ReLU: under `jax.jit` XLA's CPU `tanh`/`logistic`
are about 1e-8 off in float64). In training mode with BatchNormalization the
oracle is the gradient of each example's score in the batched training-mode pass
(examples interact there, so the loop is another quantity).
"""

import keras
import numpy as np
import pytest
from backend_helpers import (
    arr,
    embedding_model,
    oracle,
    per_example_image_model,
    relu_sequential,
    skip_unless_jax_or_torch,
)
from backend_helpers import rel_close as close

import gradprobe as gp

skip_unless_jax_or_torch()
B = oracle()  # jax.grad on JAX, torch.autograd.grad on PyTorch
AUTO = {"jax": "vmap", "torch": "loop"}[B.name]  # the method per_example=True picks


def check(g, ref, rtol=1e-6):
    for key, var in g.variables.items():
        close(g[key], ref[var.path], rtol, key)


@pytest.mark.parametrize("per_example,method", [(True, AUTO), (AUTO, AUTO),
                                                ("vectorized_map", AUTO),
                                                ("jacobian", "jacobian")])
@pytest.mark.parametrize("compile", ["auto", False])
def test_functional_model_matches_a_loop_of_single_example_grads(x64, per_example, method,
                                                                 compile):
    model = per_example_image_model()
    x = np.random.default_rng(4).normal(size=(5, 6, 6, 2))
    labels = np.array([0, 2, 1, 1, 0])
    g = gp.gradients(model, x, labels, "*.weights", per_example=per_example, compile=compile)
    # (jitted oracle for a jitted run: XLA's float64 CPU kernels differ from eager by ~1e-7;
    # on PyTorch the Jacobian's batched matmuls are 4e-8 off in float64)
    rtol = 1e-5 if (B.name, method) == ("torch", "jacobian") else 1e-6
    check(g, B.example_grads(model, x, lambda out, i: out[:, labels[i]], jit=compile == "auto"), rtol)
    assert set(g.per_example_method) == set(g.variables)
    assert set(g.per_example_method.values()) == {method}
    assert tuple(g["conv.kernel"].shape) == (5, 3, 3, 2, 3) and tuple(g.target.shape) == (5,)
    close(g.outputs, model(x), 1e-6, "outputs")
    close(g.target, arr(model(x))[np.arange(5), labels], 1e-6, "target")
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
    ref = B.example_grads(model, x, lambda out, i: sw[i] * ce(B.tensor(labels[i:i + 1]), out))
    check(g, ref, rtol)
    assert not np.any(arr(g["conv.kernel"])[3])  # sample weight 0


@pytest.mark.parametrize("target", ["int", "ints", "predicted", "loss", "callable"])
def test_sequential_every_per_example_target_form(x64, target):
    model = relu_sequential()
    x = np.random.default_rng(5).normal(size=(4, 5))
    labels = np.array([3, 0, 1, 3])
    out = arr(model(x))
    predicted = out.argmax(-1)
    t, value_of = {
        "int": (2, lambda o, i: o[:, 2]),
        "ints": (list(labels), lambda o, i: o[:, labels[i]]),
        "predicted": ("predicted", lambda o, i: o[:, predicted[i]]),
        "loss": (gp.loss(keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None), labels),
            lambda o, i: keras.losses.sparse_categorical_crossentropy(
                B.tensor(labels[i:i + 1]), o, from_logits=True)),
        "callable": (lambda o: o[:, 1] * o[:, 2], lambda o, i: o[:, 1] * o[:, 2]),
    }[target]
    g = gp.gradients(model, x, t, "*.weights", per_example=True)
    check(g, B.example_grads(model, x, value_of))
    assert dict(g.per_example_method) == dict.fromkeys(["h.kernel", "h.bias", "out.kernel",
                                                        "out.bias"], AUTO)


@pytest.mark.parametrize("per_example", [True, "jacobian"])
def test_embedding_integer_input(x64, per_example):
    model = embedding_model()
    ids = np.array([[1, 2, 1, 3, 1], [0, 0, 0, 0, 0], [6, 5, 4, 3, 2]], "int32")
    g = gp.gradients(model, ids, "predicted", ["emb", "emb.embeddings", "out.weights"],
                     per_example=per_example)
    predicted = arr(model(ids)).argmax(-1)
    check(g, B.example_grads(model, ids, lambda out, i: out[:, predicted[i]]))
    assert tuple(g["emb.embeddings"].shape) == (3, 7, 4)
    assert set(g.per_example_method.values()) == {AUTO if per_example is True else "jacobian"}
    assert "emb" not in g.per_example_method  # an activation: as without per_example
    close(g["emb"], gp.gradients(model, ids, "predicted", "emb")["emb"], 1e-12)


def test_batch_norm_in_training_mode_uses_the_jacobian_of_the_batched_pass(x64):
    model = per_example_image_model()
    x = np.random.default_rng(6).normal(size=(4, 6, 6, 2))
    labels = np.array([0, 1, 2, 0])
    before = [arr(v.value).copy() for v in model.variables]
    keys = ["conv.kernel", "bn.beta", "head.bias"]
    g = gp.gradients(model, x, labels, keys, per_example=True, training=True)
    assert set(g.per_example_method.values()) == {"jacobian"}
    assert "BatchNormalization layer 'bn'" in g.per_example_fallbacks["conv.kernel"]
    # Reference: the gradient of each example's score in the batched training-mode pass.
    tv, ntv = B.values(model)
    xt = B.tensor(x)
    rows = [B.grad(lambda ws, i=i: model.stateless_call(ws, ntv, xt, training=True)[0][
        i, labels[i]])(tv) for i in range(4)]
    for key in keys:
        pos = [id(v) for v in model.trainable_variables].index(id(g.variables[key]))
        close(g[key], np.stack([r[pos] for r in rows]), 1e-6, key)
    # The single-example loop is a different quantity there: the test can fail.
    ref = B.example_grads(model, x, lambda out, i: out[:, labels[i]], training=True)
    assert np.max(np.abs(arr(g["conv.kernel"]) - ref[g.variables["conv.kernel"].path])) > 1e-3
    for b, v in zip(before, model.variables):  # moving statistics untouched
        np.testing.assert_array_equal(b, arr(v.value))
    if B.name == "jax":  # (PyTorch has no vmap: per_example="vmap" is refused there)
        # Asked for explicitly, vmap runs (each example normalised alone), as on TensorFlow.
        g = gp.gradients(model, x, labels, keys, per_example="vmap", training=True)
        assert set(g.per_example_method.values()) == {"vmap"}
