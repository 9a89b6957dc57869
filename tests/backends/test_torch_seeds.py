"""Seed scenario 003 (../shared/seeds/; TensorFlow version in tests/test_seeds.py)
on the PyTorch backend: the chained gradients go through nested `gp.Tape`s,
checked against hand-written `torch.autograd` code. The other seeds, the same on
JAX and PyTorch, are in test_common_seeds.py.

Run with `KERAS_BACKEND=torch python -m pytest tests/backends`.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":
    pytest.skip("PyTorch backend tests: run with KERAS_BACKEND=torch", allow_module_level=True)

import torch  # noqa: E402
from backend_helpers import arr, close, oracle, two_layer  # noqa: E402

import gradprobe as gp  # noqa: E402

B = oracle()  # (its `normal`: the seeds' float32 test data)


# --------------------------------------------------------------------- seed 003
def test_seed003_example1_layer1_output_and_layer2_weights():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w1, w2 = B.normal(12, (2, 3)), B.normal(34, (3, 2))
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
    w1, w2 = B.normal(56, (2, 3)), B.normal(78, (3, 2))
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
