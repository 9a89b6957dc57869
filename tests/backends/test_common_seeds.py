"""Four of the five seed scenarios (../shared/seeds/; TensorFlow versions in
tests/test_seeds.py) on the JAX and PyTorch backends, written once for both:
each written with gradprobe and checked against hand-written gradient code of
the active backend (`jax.grad`, jitted where faster, or `torch.autograd.grad`,
through `backend_helpers.oracle()`) of the rest of the model with respect to an
intermediate value, or of `stateless_call` with respect to a weight. Seed 003's
chained gradients differ by backend (`gp.functional` on JAX, nested `gp.Tape`s
on PyTorch): they are in test_jax_seeds.py and test_torch_seeds.py. Models are
smaller than the seeds' (fewer filters, smaller images).

Run with `KERAS_BACKEND=jax` (or `torch`) `python -m pytest tests/backends`.
"""

import keras
import numpy as np
import pytest
from backend_helpers import (
    ComplexModel,
    SimpleConvModel,
    SimpleModel,
    arr,
    close,
    lstm_attention_model,
    oracle,
    seed000_model,
    skip_unless_jax_or_torch,
)
from keras import layers

import gradprobe as gp

skip_unless_jax_or_torch()
B = oracle()  # jax.grad on JAX, torch.autograd.grad on PyTorch


# --------------------------------------------------------------------- seed 000
def test_seed000_activation_weights_and_pitfalls():
    model = seed000_model()
    x = B.normal(1, (3, 6))
    hidden, out = model.get_layer("hidden"), model.get_layer("out")
    h = hidden(x)
    g = gp.gradients(model, x, target=2, wrt="hidden")
    close(g["hidden"], B.grad(lambda a: out(a)[:, 2].sum())(h), 1e-6)
    # weights, with a reduction target (the backend's own sum)
    g = gp.gradients(model, x, target=lambda y: y.sum(), wrt="hidden.weights")
    ref = B.weight_grads(model, [hidden.kernel, hidden.bias], x, lambda y: y.sum(), jit=True)
    close(g["hidden.kernel"], ref[0], 1e-6)
    close(g["hidden.bias"], ref[1], 1e-6)
    # A non-scalar target is an error, not an implicit sum; kinds and shapes differ.
    with pytest.raises(gp.GradprobeError, match="scalar or one value per example"):
        gp.gradients(model, x, target=lambda y: y, wrt="hidden")
    g = gp.gradients(model, x, target=0, wrt=["hidden", "hidden.kernel"])
    assert g.kinds["hidden"] == "activation" and g.kinds["hidden.kernel"] == "weight"
    assert tuple(g["hidden"].shape) == (3, 8) and tuple(g["hidden.kernel"].shape) == (6, 8)


# --------------------------------------------------------------------- seed 001
def test_seed001_subclassed_cnn_and_rnn_transformer_states():
    keras.utils.set_random_seed(1)
    model = SimpleModel()
    x = B.normal(7, (2, 12, 12, 1))
    model(x)
    c1 = model.conv1(x)

    def rest(c):
        return model.dense1(model.flatten(model.pool2(model.conv2(model.pool1(c)))))

    expected = B.grad(lambda c: rest(c)[:, 3].sum(), jit=True)(c1)
    both = gp.gradients(model, x, target=3, wrt=[model.conv1, model.conv2])
    assert tuple(both[model.conv1.name].shape) == (2, 12, 12, 8)
    close(both[model.conv1.name], expected, 1e-5)
    assert tuple(both[model.conv2.name].shape) == (2, 6, 6, 16)

    model = lstm_attention_model()
    x = B.normal(1, (2, 6, 4))
    lstm_out = B.tensor(model.get_layer("lstm")(x))
    mha, ln, gap, out = (model.get_layer(n) for n in ("mha", "ln", "gap", "out"))

    def head(l_, a_):
        return out(gap(ln(l_ + a_)))[:, 1].sum()

    a = mha(lstm_out, lstm_out)
    exp_l = B.grad(lambda l_: head(l_, mha(l_, l_)), jit=True)(lstm_out)
    exp_a = B.grad(lambda a_: head(lstm_out, a_), jit=True)(a)
    g = gp.gradients(model, x, target=1, wrt=["lstm", "mha"])
    close(g["lstm"], exp_l, 1e-5)
    close(g["mha"], exp_a, 1e-5)


# --------------------------------------------------------------------- seed 002
def test_seed002_loss_wrt_output_kernel_bias_and_intermediate():
    keras.utils.set_random_seed(3)
    model = SimpleConvModel()
    x = B.normal(2, (1, 14, 14, 1))
    y = B.normal(3, (1, 12, 12, 8))
    loss_fn = keras.losses.MeanSquaredError()
    model(x)
    out = model(x)
    g = gp.gradients(model, x, gp.loss(loss_fn, y),
                     wrt=[model.conv, model.conv.kernel, model.conv.bias])
    name = model.conv.name
    close(g[name], B.grad(lambda o: loss_fn(y, o))(out), 1e-5)
    ref = B.weight_grads(model, [model.conv.kernel, model.conv.bias], x, lambda o: loss_fn(y, o),
                         jit=True)
    close(g[f"{name}.kernel"], ref[0], 1e-5)
    close(g[f"{name}.bias"], ref[1], 1e-5)
    assert np.isclose(float(arr(g.target)), float(arr(loss_fn(y, out))))

    keras.utils.set_random_seed(4)
    model = ComplexModel()
    x = B.normal(4, (1, 18, 18, 1))
    labels = B.tensor(np.array([7]))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model(x)
    inter = model.pool2(model.conv2(model.pool1(model.conv1(x))))
    exp_inter = B.grad(lambda i: loss_fn(labels, model.dense2(model.dense1(model.flatten(i)))),
                       jit=True)(inter)
    exp_kernel = B.weight_grads(model, [model.conv2.kernel], x, lambda o: loss_fn(labels, o),
                                jit=True)[0]
    g = gp.gradients(model, x, gp.loss(loss_fn, labels), wrt=[model.pool2, model.conv2.kernel])
    close(g[model.pool2.name], exp_inter, 1e-5)
    close(g[f"{model.conv2.name}.kernel"], exp_kernel, 1e-5)
    stats = g.stats()
    assert np.isclose(stats[model.pool2.name]["norm"], np.linalg.norm(exp_inter), rtol=1e-5)


# --------------------------------------------------------------------- seed 004
def test_seed004_input_intermediate_and_custom_activation():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((5,)), layers.Dense(units=10, activation="relu")])
    x = B.normal(5, (1, 5))
    g = gp.gradients(model, x, lambda y: y.sum(), "inputs")
    close(g["inputs"], B.grad(lambda xx: model(xx).sum())(x), 1e-6)
    close(g.outputs, model(x), 1e-6)

    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((10,)), layers.Dense(units=32, activation="relu"),
                              layers.Dense(units=16, activation="relu"), layers.Dense(units=5)])
    x = B.normal(6, (1, 10))
    first, second = model.layers[0], model.layers[1]
    l1 = first(x)
    g = gp.gradients(model, x, lambda a: a.sum(), [second, first], output=second.name)
    close(g[second.name], np.ones((1, 16)), 1e-6)  # d sum(a) / d a
    close(g[first.name], B.grad(lambda a: second(a).sum())(l1), 1e-6)

    class CustomActivation(layers.Layer):
        def call(self, inputs):
            return keras.ops.square(inputs)

    model = keras.Sequential([keras.Input((5,)), layers.Dense(units=16), CustomActivation(),
                              layers.Dense(units=5)])
    x = B.normal(7, (1, 5))
    custom = model.layers[1].name
    g = gp.gradients(model, x, lambda a: a.sum(), [custom, model.layers[0]], output=custom)
    close(g[custom], np.ones((1, 16)), 1e-6)
    close(g[model.layers[0].name], 2 * arr(model.layers[0](x)), 1e-5)  # d(sum x^2)/dx = 2x
