"""gp.Tape (chained and second-order gradients), gp.gradient_penalty under
PyTorch's backward and gp.functional on the PyTorch backend of Keras 3. gp.hvp,
gp.jacobian and gp.per_example_norms, the same on JAX and PyTorch, are in
test_common_higher.py.

Run with `KERAS_BACKEND=torch python -m pytest tests/backends`. Under any other
backend the module is skipped before `torch` is imported.

Oracles: hand-written `torch.autograd` code of the same model (double backward)
and float64 central finite differences of the model's function written in
NumPy. Keras' matmul and tanh on PyTorch are about 4e-8 off in float64
(measured; see test_torch.py), so oracles that run the model through Keras
again compare at 1e-6, and the finite differences are of NumPy code.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":
    pytest.skip("PyTorch backend tests: run with KERAS_BACKEND=torch", allow_module_level=True)

import torch  # noqa: E402
from backend_helpers import Critic, arr, close, mlp  # noqa: E402
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402
from gradprobe.core import _patch  # noqa: E402


def _t(x):
    return torch.as_tensor(np.asarray(x))


# ------------------------------------------------------------------------ Tape
def test_tape_activation_is_differentiable_and_structures(x64):
    model = mlp()
    x = _t(np.random.default_rng(0).normal(size=(5, 3)))
    before = [np.array(w) for w in model.get_weights()]
    with gp.Tape(model, watch=["l1", "inputs"], persistent=True) as tape:
        y = model(x)
        a1 = tape.activation("l1")
        loss = torch.sum(y) + torch.sum(a1 ** 2)
    l1, l2 = model.get_layer("l1"), model.get_layer("l2")
    xr = x.clone().requires_grad_(True)
    h = l1(xr)
    ref_loss = torch.sum(l2(h)) + torch.sum(h ** 2)
    close(loss, ref_loss, 1e-12)
    ref = torch.autograd.grad(ref_loss, [h, l2.kernel.value, xr, l1.kernel.value])
    g = tape.gradient(loss, ["l1", "l2.kernel", "inputs", l1.kernel])
    assert isinstance(g, list) and len(g) == 4
    for got, want, what in zip(g, ref, ("l1", "l2.kernel", "inputs", "l1.kernel")):
        close(got, want, 1e-10, what)
    d = tape.gradient(loss, {"w": "l2.weights", "a": l1})
    assert set(d) == {"w", "a"} and set(d["w"]) == {"l2.kernel", "l2.bias"}
    close(tape.gradient(loss, a1), g[0], 1e-12)  # a plain tensor works too
    assert tape.keys() == ["l1", "inputs"]
    assert "call" not in vars(l1) and "call" not in vars(model)
    assert _patch.active_wrappers() == 0
    for b, w in zip(before, model.get_weights()):
        np.testing.assert_array_equal(b, w)


def test_tape_shared_calls_and_errors():
    model = mlp()
    x = torch.ones((2, 3))
    with gp.Tape(model, watch="l1") as tape:
        y1 = model(x)
        y2 = model(2 * x)
        loss = torch.sum(y1 * y2)
    assert tape.keys() == ["l1@0", "l1@1"]
    with pytest.raises(gp.GradprobeError, match="2 captured values"):
        tape.activation("l1")
    g = tape.gradient(loss, "l1")
    assert set(g) == {"l1@0", "l1@1"}
    l2 = model.get_layer("l2")
    a0, a1 = (model.get_layer("l1")(x), model.get_layer("l1")(2 * x))
    a0, a1 = a0.detach().requires_grad_(True), a1.detach().requires_grad_(True)
    ref = torch.autograd.grad(torch.sum(l2(a0) * l2(a1)), [a0, a1])
    close(g["l1@0"], ref[0], 1e-6)
    close(g["l1@1"], ref[1], 1e-6)
    with pytest.raises(gp.GradprobeError, match="not persistent"):
        tape.gradient(loss, "l1@0")

    with gp.Tape(model, watch="l1", persistent=True) as tape:
        model(x)
    after = torch.sum(model(x))  # a model call after the block is not captured
    with pytest.raises(gp.GradprobeError, match="not on the path"):
        tape.gradient(after, "l1")
    with pytest.raises(gp.GradprobeError, match="not watched by this tape"):
        tape.gradient(after, "l2")
    with pytest.raises(gp.GradprobeError, match="before the tape has recorded"):
        gp.Tape(model).gradient(after, "l1")
    with pytest.raises(gp.GradprobeError, match="Expected `target`"):
        tape.gradient("loss", "l1")
    assert tape.gradient(after, "l1", unconnected="zero").abs().sum() == 0


def test_nested_tapes_second_order_matches_fd_of_first_order(x64):
    """d/dW2 of ||d loss / d a1||^2 through nested gp.Tapes, against finite
    differences in W2 and hand-written double backward."""
    model = mlp(1)
    x = _t(np.random.default_rng(1).normal(size=(4, 3)))
    k2 = model.get_layer("l2").kernel

    def inner_norm():
        with gp.Tape(model, watch="l1") as inner:
            loss = torch.sum(model(x) ** 2)
        return torch.sum(inner.gradient(loss, "l1") ** 2)

    with gp.Tape(model, watch=[]) as outer:
        penalty = inner_norm()
    second = arr(outer.gradient(penalty, k2))

    l1, l2 = model.get_layer("l1"), model.get_layer("l2")
    a = l1(x).detach().requires_grad_(True)
    ga = torch.autograd.grad(torch.sum(l2(a) ** 2), a, create_graph=True)[0]
    close(second, torch.autograd.grad(torch.sum(ga ** 2), k2.value)[0], 1e-6, "double backward")

    w1, b1, w2, b2 = (arr(v.value) for v in model.trainable_variables)
    a_np = 1 / (1 + np.exp(-(arr(x) @ w1 + b1)))

    def penalty_np(k):  # ||d sum(sigmoid(a k + b2)^2) / da||^2 in float64 NumPy
        s_ = 1 / (1 + np.exp(-(a_np @ k + b2)))
        return float(np.sum(((2 * s_ * s_ * (1 - s_)) @ k.T) ** 2))

    close(float(penalty.detach()), penalty_np(w2), 1e-6, "penalty value")
    eps = 1e-6
    fd = np.zeros_like(second)
    for idx in np.ndindex(*second.shape):
        for sign in (1, -1):
            w = w2.copy()
            w[idx] += sign * eps
            fd[idx] += sign * penalty_np(w) / (2 * eps)
    close(second, fd, 1e-6, "finite differences")

    # differentiable=False: the inner gradient is a constant for the outer tape.
    with gp.Tape(model, watch=[]) as outer:
        with gp.Tape(model, watch="l1") as inner:
            loss = torch.sum(model(x) ** 2)
        const = torch.sum(inner.gradient(loss, "l1", differentiable=False) ** 2)
    assert not const.requires_grad
    with pytest.raises(gp.GradprobeError, match="does not depend on anything"):
        outer.gradient(const, k2)


# ------------------------------------------------------------ gradient penalty
def test_wgan_gp_backward_matches_double_backward(x64):
    keras.utils.set_random_seed(7)
    critic = Critic()
    rng = np.random.default_rng(7)
    real, fake = _t(rng.normal(size=(6, 4))), _t(rng.normal(size=(6, 4)))
    critic(real)
    eps = _t(rng.random(size=(6, 1)))
    x_hat = eps * real + (1 - eps) * fake
    params = [v.value for v in critic.trainable_variables]

    norms = gp.gradient_penalty(critic, x_hat, lambda y: y[:, 0])
    assert norms.requires_grad
    loss = torch.mean(critic(fake)) - torch.mean(critic(real)) + 10 * torch.mean((norms - 1) ** 2)
    grads = torch.autograd.grad(loss, params)

    xr = x_hat.clone().requires_grad_(True)
    g = torch.autograd.grad(torch.sum(critic(xr)[:, 0]), xr, create_graph=True)[0]
    ref_norms = torch.sqrt(torch.sum(g ** 2, dim=1))
    ref_loss = (torch.mean(critic(fake)) - torch.mean(critic(real))
                + 10 * torch.mean((ref_norms - 1) ** 2))
    close(norms, ref_norms, 1e-12)
    for a, b in zip(grads, torch.autograd.grad(ref_loss, params)):
        close(a, b, 1e-10)
    close(gp.gradient_penalty(critic, x_hat, lambda y: y[:, 0], norm=1), g.abs().sum(1), 1e-12)
    with pytest.raises(gp.GradprobeError, match="is a weight"):
        gp.gradient_penalty(critic, x_hat, lambda y: y[:, 0], wrt="*.kernel")


# -------------------------------------------------------------- functional form
def test_functional_form_with_autograd(x64):
    model = mlp(3)
    x = np.random.default_rng(3).normal(size=(4, 3))
    form = gp.functional(model, x, 1, ["l1", "l2.kernel"])
    probes, variables, inputs = form.args
    p = {k: v.clone().requires_grad_(True) for k, v in probes.items()}
    w = {k: v.detach().clone().requires_grad_(True) for k, v in variables.items()}
    objective, aux = form(p, w, inputs)
    dp, dw = torch.autograd.grad(objective, [p["l1"], w["l2.kernel"]])
    g = gp.gradients(model, x, 1, ["l1", "l2.kernel"])
    close(dp, g["l1"], 1e-12)
    close(dw, g["l2.kernel"], 1e-12)
    close(aux["activations"]["l1"], model.get_layer("l1")(_t(x)), 1e-12)


def test_tape_numpy_inputs_parameter_free_layer_and_no_grad_context():
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,))
    r = layers.Rescaling(2.0, name="r")(inp)
    model = keras.Model(inp, layers.Dense(2, name="d")(r))
    x = np.random.default_rng(9).normal(size=(2, 3)).astype("float32")
    dense = model.get_layer("d")
    xr = _t(x).clone().requires_grad_(True)
    a = (2.0 * xr).detach().requires_grad_(True)
    ref_a = torch.autograd.grad(torch.sum(dense(a) ** 2), a)[0]
    ref_x = torch.autograd.grad(torch.sum(dense(2.0 * xr) ** 2), xr)[0]
    with torch.no_grad():  # the tape records all the same
        with gp.Tape(model, watch=["r", "inputs"]) as tape:
            loss = torch.sum(model(x) ** 2)  # NumPy input, as Keras accepts it
        g_r, g_x = tape.gradient(loss, ["r", "inputs"])
    close(g_r, ref_a, 1e-6, "parameter-free layer")
    close(g_x, ref_x, 1e-6, "numpy inputs")
    # tape.watch on a plain tensor, like tf.GradientTape.watch
    scale = torch.tensor(3.0, dtype=torch.float32)
    with gp.Tape(model, watch=[]) as tape:
        tape.watch(scale)
        loss = torch.sum(model(_t(x)) * scale)
        with pytest.raises(gp.GradprobeError, match="Expected `tensor`"):
            tape.watch(np.ones(3))
    close(tape.gradient(loss, scale), torch.sum(model(_t(x))), 1e-6, "watched tensor")
