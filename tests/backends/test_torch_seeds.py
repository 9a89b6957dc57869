"""The five seed scenarios (../shared/seeds/; TensorFlow versions in
tests/test_seeds.py) on the PyTorch backend: each written with gradprobe and
checked against hand-written `torch.autograd` code (of the rest of the model
with respect to an intermediate value, or of `stateless_call` with respect to
a weight). Seed 003's chained gradients go through nested `gp.Tape`s.
Models are smaller than the seeds' (fewer filters, smaller images).

Run with `KERAS_BACKEND=torch python -m pytest tests/backends`.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":
    pytest.skip("PyTorch backend tests: run with KERAS_BACKEND=torch", allow_module_level=True)

import torch  # noqa: E402
from backend_helpers import (  # noqa: E402
    ComplexModel,
    SimpleConvModel,
    SimpleModel,
    arr,
    close,
    lstm_attention_model,
    seed000_model,
    two_layer,
)
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402


def normal(seed, shape):
    return torch.as_tensor(np.random.default_rng(seed).normal(size=shape).astype("float32"))


def weight_grads(model, variables, x, objective):
    """torch.autograd.grad of objective(model(x)) for some variables."""
    return torch.autograd.grad(objective(model(x)), [v.value for v in variables])


def grad_at(fn, value):
    """torch.autograd.grad of fn(v) at `value` (an intermediate activation)."""
    v = value.detach().clone().requires_grad_(True)
    return torch.autograd.grad(fn(v), v)[0]


# --------------------------------------------------------------------- seed 000
def test_seed000_activation_weights_and_pitfalls():
    model = seed000_model()
    x = normal(1, (3, 6))
    hidden, out = model.get_layer("hidden"), model.get_layer("out")
    h = hidden(x)
    g = gp.gradients(model, x, target=2, wrt="hidden")
    close(g["hidden"], grad_at(lambda a: torch.sum(out(a)[:, 2]), h), 1e-6)
    # weights, with a reduction target
    g = gp.gradients(model, x, target=lambda y: torch.sum(y), wrt="hidden.weights")
    ref = weight_grads(model, [hidden.kernel, hidden.bias], x, torch.sum)
    close(g["hidden.kernel"], ref[0], 1e-6)
    close(g["hidden.bias"], ref[1], 1e-6)
    # A non-scalar target is an error, not an implicit sum; kinds and shapes differ.
    with pytest.raises(gp.GradprobeError, match="scalar or one value per example"):
        gp.gradients(model, x, target=lambda y: y, wrt="hidden")
    g = gp.gradients(model, x, target=0, wrt=["hidden", "hidden.kernel"])
    assert g.kinds["hidden"] == "activation" and g.kinds["hidden.kernel"] == "weight"
    assert g["hidden"].shape == (3, 8) and g["hidden.kernel"].shape == (6, 8)


# --------------------------------------------------------------------- seed 001
def test_seed001_subclassed_cnn_and_rnn_transformer_states():
    keras.utils.set_random_seed(1)
    model = SimpleModel()
    x = normal(7, (2, 12, 12, 1))
    model(x)
    c1 = model.conv1(x)

    def rest(c):
        return model.dense1(model.flatten(model.pool2(model.conv2(model.pool1(c)))))

    expected = grad_at(lambda c: torch.sum(rest(c)[:, 3]), c1)
    both = gp.gradients(model, x, target=3, wrt=[model.conv1, model.conv2])
    assert tuple(both[model.conv1.name].shape) == (2, 12, 12, 8)
    close(both[model.conv1.name], expected, 1e-5)
    assert tuple(both[model.conv2.name].shape) == (2, 6, 6, 16)

    model = lstm_attention_model()
    x = normal(1, (2, 6, 4))
    lstm_out = model.get_layer("lstm")(x)
    mha, ln, gap, out = (model.get_layer(n) for n in ("mha", "ln", "gap", "out"))

    def head(l_, a_):
        return torch.sum(out(gap(ln(l_ + a_)))[:, 1])

    a = mha(lstm_out, lstm_out)
    exp_l = grad_at(lambda l_: head(l_, mha(l_, l_)), lstm_out)
    exp_a = grad_at(lambda a_: head(lstm_out.detach(), a_), a)
    g = gp.gradients(model, x, target=1, wrt=["lstm", "mha"])
    close(g["lstm"], exp_l, 1e-5)
    close(g["mha"], exp_a, 1e-5)


# --------------------------------------------------------------------- seed 002
def test_seed002_loss_wrt_output_kernel_bias_and_intermediate():
    keras.utils.set_random_seed(3)
    model = SimpleConvModel()
    x = normal(2, (1, 14, 14, 1))
    y = normal(3, (1, 12, 12, 8))
    loss_fn = keras.losses.MeanSquaredError()
    model(x)
    out = model(x)
    g = gp.gradients(model, x, gp.loss(loss_fn, y),
                     wrt=[model.conv, model.conv.kernel, model.conv.bias])
    name = model.conv.name
    close(g[name], grad_at(lambda o: loss_fn(y, o), out), 1e-5)
    ref = weight_grads(model, [model.conv.kernel, model.conv.bias], x, lambda o: loss_fn(y, o))
    close(g[f"{name}.kernel"], ref[0], 1e-5)
    close(g[f"{name}.bias"], ref[1], 1e-5)
    assert np.isclose(float(arr(g.target)), float(arr(loss_fn(y, out))))

    keras.utils.set_random_seed(4)
    model = ComplexModel()
    x = normal(4, (1, 18, 18, 1))
    labels = torch.tensor([7])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model(x)
    inter = model.pool2(model.conv2(model.pool1(model.conv1(x))))
    exp_inter = grad_at(lambda i: loss_fn(labels, model.dense2(model.dense1(
        model.flatten(i)))), inter)
    exp_kernel = weight_grads(model, [model.conv2.kernel], x, lambda o: loss_fn(labels, o))[0]
    g = gp.gradients(model, x, gp.loss(loss_fn, labels), wrt=[model.pool2, model.conv2.kernel])
    close(g[model.pool2.name], exp_inter, 1e-5)
    close(g[f"{model.conv2.name}.kernel"], exp_kernel, 1e-5)
    stats = g.stats()
    assert np.isclose(stats[model.pool2.name]["norm"], np.linalg.norm(arr(exp_inter)),
                      rtol=1e-5)


# --------------------------------------------------------------------- seed 003
def test_seed003_example1_layer1_output_and_layer2_weights():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w1, w2 = normal(12, (2, 3)), normal(34, (3, 2))
    model = two_layer(w1, w2)
    l1 = (x @ w1).requires_grad_(True)
    w2r = w2.clone().requires_grad_(True)
    exp_l1, exp_w2 = torch.autograd.grad(torch.sum(l1 @ w2r), [l1, w2r])
    g = gp.gradients(model, x, lambda y: torch.sum(y), ["layer1", "layer2.kernel"])
    close(g["layer1"], exp_l1, 1e-6)
    close(g["layer2.kernel"], exp_w2, 1e-6)
    # the same with gp.Tape, as the seed writes it with tf.GradientTape
    with gp.Tape(model, watch="layer1") as tape:
        loss = torch.sum(model(x))
    g_l1, g_w2 = tape.gradient(loss, ["layer1", "layer2.kernel"])
    close(g_l1, exp_l1, 1e-6)
    close(g_w2, exp_w2, 1e-6)


def test_seed003_gradient_used_in_a_second_loss_through_nested_tapes():
    """Examples 2 and 3 (made shape-consistent, as in tests/test_seeds.py): the
    gradient at layer 1 of loss1 = sum(layer1_output^2) enters loss 2, which is
    differentiated with respect to both weights, with that gradient (a) a
    constant, (b) differentiated through."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w1, w2 = normal(56, (2, 3)), normal(78, (3, 2))
    model = two_layer(w1, w2)
    k1, k2 = model.get_layer("layer1").kernel, model.get_layer("layer2").kernel

    def hand_written(through):
        w1_, w2_ = w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)
        l1 = x @ w1_
        grad1 = torch.autograd.grad(torch.sum(l1 ** 2), l1, create_graph=through)[0]
        out = l1 @ w2_
        loss2 = torch.sum(out) + torch.sum(grad1 * out[:, :1])
        return torch.autograd.grad(loss2, [w1_, w2_])

    results = {}
    for through in (False, True):
        with gp.Tape(model, watch="layer1") as outer:
            with gp.Tape(model, watch="layer1") as inner:
                model(x)
                loss1 = torch.sum(inner.activation("layer1") ** 2)
            grad1 = inner.gradient(loss1, "layer1", differentiable=through)
            out = model(x)
            loss2 = torch.sum(out) + torch.sum(grad1 * out[:, :1])
        got = outer.gradient(loss2, [k1, k2])
        exp = hand_written(through)
        close(got[0], exp[0], 1e-5, f"w1 through={through}")
        close(got[1], exp[1], 1e-5, f"w2 through={through}")
        results[through] = arr(got[0])
    assert not np.allclose(results[False], results[True])  # the scenario tells them apart

    # Example 3's intent: loss3 = sum(transpose(grad1) @ layer2_output), d loss3 / d w2.
    w2r = w2.clone().requires_grad_(True)
    l1 = x @ w1
    ref = torch.autograd.grad(torch.sum((2 * l1).T @ (l1 @ w2r)), w2r)[0]
    with gp.Tape(model, watch="layer1") as outer:
        with gp.Tape(model, watch="layer1") as inner:
            model(x)
            loss1 = torch.sum(inner.activation("layer1") ** 2)
        grad3 = inner.gradient(loss1, "layer1")
        loss3 = torch.sum(grad3.T @ model(x))
    close(outer.gradient(loss3, k2), ref, 1e-5)


# --------------------------------------------------------------------- seed 004
def test_seed004_input_intermediate_and_custom_activation():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((5,)), layers.Dense(units=10, activation="relu")])
    x = normal(5, (1, 5))
    g = gp.gradients(model, x, lambda y: torch.sum(y), "inputs")
    close(g["inputs"], grad_at(lambda xx: torch.sum(model(xx)), x), 1e-6)
    close(g.outputs, model(x), 1e-6)

    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((10,)), layers.Dense(units=32, activation="relu"),
                              layers.Dense(units=16, activation="relu"), layers.Dense(units=5)])
    x = normal(6, (1, 10))
    first, second = model.layers[0], model.layers[1]
    l1 = first(x)
    g = gp.gradients(model, x, lambda a: torch.sum(a), [second, first], output=second.name)
    close(g[second.name], torch.ones((1, 16)), 1e-6)  # d sum(a) / d a
    close(g[first.name], grad_at(lambda a: torch.sum(second(a)), l1), 1e-6)

    class CustomActivation(layers.Layer):
        def call(self, inputs):
            return keras.ops.square(inputs)

    model = keras.Sequential([keras.Input((5,)), layers.Dense(units=16), CustomActivation(),
                              layers.Dense(units=5)])
    x = normal(7, (1, 5))
    custom = model.layers[1].name
    g = gp.gradients(model, x, lambda a: torch.sum(a), [custom, model.layers[0]], output=custom)
    close(g[custom], torch.ones((1, 16)), 1e-6)
    close(g[model.layers[0].name], 2 * model.layers[0](x), 1e-5)  # d(sum x^2)/dx = 2x
