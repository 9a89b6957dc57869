"""gp.gradients(..., per_example=True) on the PyTorch backend of Keras 3: a
Python loop of single-example passes (method "loop"), the Jacobian of the
batched pass when examples interact or when asked.

Oracle: hand-written `torch.autograd.grad` of each example run alone through
the model (float64), and of each example's score in the batched training-mode
pass for BatchNormalization with `training=True`.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":
    pytest.skip("PyTorch backend tests: run with KERAS_BACKEND=torch", allow_module_level=True)

import torch  # noqa: E402
from backend_helpers import arr  # noqa: E402
from backend_helpers import rel_close as close  # noqa: E402
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402


def loop(model, x, value_of):
    """{variable path: (batch, *shape)}: autograd of `value_of(model(x[i:i+1]), i)`."""
    weights = [v.value for v in model.trainable_variables]
    rows = []
    for i in range(len(x)):
        with torch.enable_grad():
            v = value_of(model(torch.as_tensor(x[i:i + 1])), i).sum()
            rows.append([arr(g) for g in torch.autograd.grad(v, weights)])
    return {w.path: np.stack(col) for w, col in zip(model.trainable_variables, zip(*rows))}


def image_model():
    keras.utils.set_random_seed(11)
    inp = keras.Input((6, 6, 2))
    h = layers.Conv2D(3, 3, activation="relu", name="conv")(inp)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.Flatten()(h)
    shared = layers.Dense(5, activation="tanh", name="shared")
    h = shared(shared(layers.Dense(5, name="pre")(h)))
    model = keras.Model(inp, layers.Dense(3, name="head")(h))
    bn = model.get_layer("bn")
    rng = np.random.default_rng(3)
    bn.moving_mean.assign(rng.normal(size=3))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=3))
    return model


@pytest.mark.parametrize("per_example,method", [(True, "loop"), ("loop", "loop"),
                                                ("vectorized_map", "loop"),
                                                ("jacobian", "jacobian")])
def test_matches_a_loop_of_single_example_autograd(float64, per_example, method):
    model = image_model()
    x = np.random.default_rng(4).normal(size=(4, 6, 6, 2))
    labels = np.array([0, 2, 1, 0])
    g = gp.gradients(model, x, labels, "*.weights", per_example=per_example)
    ref = loop(model, x, lambda out, i: out[:, labels[i]])
    for key, var in g.variables.items():  # (batched matmuls: 4e-8 off in float64)
        close(g[key], ref[var.path], 1e-6 if method == "loop" else 1e-5, key)
    assert set(g.per_example_method.values()) == {method}
    assert set(g.per_example_method) == set(g.variables)
    assert g["conv.kernel"].shape == (4, 3, 3, 2, 3) and g.target.shape == (4,)
    close(g.outputs, model(x), 1e-6, "outputs")


def test_embedding_activations_inputs_and_refusals(float64):
    keras.utils.set_random_seed(13)
    inp = keras.Input((5,), dtype="int32")
    h = layers.Flatten()(layers.Embedding(7, 4, name="emb")(inp))
    model = keras.Model(inp, layers.Dense(3, name="out")(h))
    ids = np.array([[1, 2, 1, 3, 1], [0, 0, 0, 0, 0], [6, 5, 4, 3, 2]], "int32")
    g = gp.gradients(model, ids, "predicted", ["emb", "emb.embeddings", "out.kernel"],
                     per_example=True)
    predicted = arr(model(ids)).argmax(-1)
    ref = loop(model, ids, lambda out, i: out[:, predicted[i]])
    close(g["emb.embeddings"], ref[model.get_layer("emb").embeddings.path], 1e-6)
    close(g["out.kernel"], ref[model.get_layer("out").kernel.path], 1e-6)
    close(g["emb"], gp.gradients(model, ids, "predicted", "emb")["emb"], 1e-12)
    assert dict(g.per_example_method) == {"emb.embeddings": "loop", "out.kernel": "loop"}
    with pytest.raises(gp.GradprobeError, match="needs a per-example target"):
        gp.gradients(model, ids, lambda y: y.sum(), "out.kernel", per_example=True)
    with pytest.raises(gp.GradprobeError, match="Received: per_example='vmap'"):
        gp.gradients(model, ids, 0, "out.kernel", per_example="vmap")


def test_batch_norm_in_training_mode_uses_the_jacobian(float64):
    model = image_model()
    x = np.random.default_rng(6).normal(size=(4, 6, 6, 2))
    labels = [0, 1, 2, 0]
    before = [arr(v.value).copy() for v in model.variables]
    g = gp.gradients(model, x, labels, ["conv.kernel", "bn.beta"], per_example=True,
                     training=True)
    assert set(g.per_example_method.values()) == {"jacobian"}
    assert "BatchNormalization layer 'bn'" in g.per_example_fallbacks["bn.beta"]
    weights = [model.get_layer("conv").kernel.value, model.get_layer("bn").beta.value]
    ntv = [v.value.detach() for v in model.non_trainable_variables]
    tv = [v.value for v in model.trainable_variables]
    with torch.enable_grad():
        out = model.stateless_call(tv, ntv, torch.as_tensor(x), training=True)[0]
        rows = [[arr(t) for t in torch.autograd.grad(out[i, labels[i]], weights,
                                                     retain_graph=True)] for i in range(4)]
    close(g["conv.kernel"], np.stack([r[0] for r in rows]), 1e-6, "conv.kernel")
    close(g["bn.beta"], np.stack([r[1] for r in rows]), 1e-6, "bn.beta")
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, arr(v.value))
