"""gp.hvp, gp.jacobian and gp.per_example_norms on the JAX and PyTorch backends
of Keras 3, written once for both. What differs by backend (gp.Tape on PyTorch,
the functional form under jax.grad, the gradient penalty inside each backend's
own training step) stays in test_jax_higher.py and test_torch_higher.py.

Run with `KERAS_BACKEND=jax` (or `torch`) `python -m pytest tests/backends`.
Under any other backend the module is skipped.

Oracles: hand-written second-order code of the active backend (through
`backend_helpers.oracle()`: `jax.hessian` / `jax.jvp` of `jax.grad` /
`jax.jacrev` on JAX, `torch.autograd.functional.hessian` / double backward /
`torch.autograd.functional.jacobian` on PyTorch) of the same model (through
`model.stateless_call`, or the layers after an intermediate value), and loops
of first-order gradients over single examples. Models use sigmoid, not tanh
(keras.ops.tanh computes in float32 on JAX, see test_jax.py).
"""

import keras
import numpy as np
import pytest
from backend_helpers import arr, close, conv_mlp, mlp, oracle, skip_unless_jax_or_torch
from keras import layers

import gradprobe as gp
from gradprobe.core import _patch

skip_unless_jax_or_torch()
B = oracle()  # jax.hessian / jax.jvp / jax.jacrev on JAX, torch.autograd on PyTorch


# ------------------------------------------------------------------------ hvp
def test_hvp_weights_activations_inputs_against_backend_hessians(x64):
    model = mlp(2)
    x = B.tensor(np.random.default_rng(2).normal(size=(5, 3)))
    rng = np.random.default_rng(3)
    tv, ntv = B.values(model)
    l1, l2 = model.get_layer("l1"), model.get_layer("l2")
    before = [arr(w).copy() for w in tv]

    def score(ws):  # the sum of output 0, through stateless_call
        return model.stateless_call(ws, ntv, x)[0][:, 0].sum()

    names = [f"{v.path.split('/')[0]}.{v.name}" for v in model.trainable_variables]
    assert names == ["l1.kernel", "l1.bias", "l2.kernel", "l2.bias"]

    v = rng.normal(size=tuple(tv[0].shape))
    h = gp.hvp(model, x, 0, "l1.kernel", v)["l1.kernel"]
    H = B.hessian(lambda w: score([w, *tv[1:]]), jit=True)(tv[0])
    close(h, np.einsum("ijkl,kl->ij", H, v), B.tol, "l1.kernel")

    vs = {k: rng.normal(size=tuple(w.shape)) for k, w in zip(names, tv)}
    hs = gp.hvp(model, x, 0, "*.weights", vs)
    assert list(hs) == names
    ref = B.hvp(score)(tv, [vs[k] for k in names])
    for k, r in zip(names, ref):
        close(hs[k], r, B.tol, k)
    # the list form, in the order of the sources
    hl = gp.hvp(model, x, 0, "*.weights", [vs[k] for k in names])
    close(hl["l2.bias"], ref[3], B.tol)

    a = arr(l1(x))
    va = rng.normal(size=a.shape)
    ha = gp.hvp(model, x, 0, "l1", va)["l1"]
    Ha = B.hessian(lambda a_: l2(a_)[:, 0].sum())(a)
    close(ha, np.einsum("ijkl,kl->ij", Ha, va), B.tol, "activation")

    vx = rng.normal(size=tuple(x.shape))
    hx = gp.hvp(model, x, 0, "inputs", vx)["inputs"]
    Hx = B.hessian(lambda xx: model(xx)[:, 0].sum(), jit=True)(x)
    close(hx, np.einsum("ijkl,kl->ij", Hx, vx), B.tol, "inputs")

    # Weights and an activation together: the product with the joint Hessian.
    mixed = gp.hvp(model, x, 0, ["l1", "l2.kernel"], {"l1": va, "l2.kernel": vs["l2.kernel"]})
    bias = tv[3]

    def joint(ak):
        a_, k2 = ak
        return B.sigmoid(a_ @ k2 + bias)[:, 0].sum()

    r_a, r_k = B.hvp(joint)([a, tv[2]], [va, vs["l2.kernel"]])
    close(mixed["l1"], r_a, B.tol, "mixed activation")
    close(mixed["l2.kernel"], r_k, B.tol, "mixed kernel")
    with pytest.raises(gp.GradprobeError, match="same shape as the gradient of 'l1'"):
        gp.hvp(model, x, 0, "l1", np.ones((4, 4)))
    # the model is untouched: weights, no instance-level `call`, no hook left
    for w, b in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(arr(w.value), b)
    assert "call" not in vars(l1) and _patch.active_wrappers() == 0


def test_hvp_errors_name_the_argument():
    model = mlp()
    x = np.ones((2, 3), "float32")
    with pytest.raises(gp.GradprobeError, match=r"same shape as the gradient of 'l1.kernel'"):
        gp.hvp(model, x, 0, "l1.kernel", np.ones((4, 3)))
    with pytest.raises(gp.GradprobeError, match="dict or a list"):
        gp.hvp(model, x, 0, "l1.weights", np.ones((3, 4)))
    with pytest.raises(gp.GradprobeError, match="has none for .l1.bias."):
        gp.hvp(model, x, 0, "l1.weights", {"l1.kernel": np.ones((3, 4))})
    with pytest.raises(gp.GradprobeError, match="Expected `vector`"):
        gp.hvp(model, x, 0, "l1.kernel", "abc")


# ------------------------------------------------------------------- jacobian
def test_jacobian_matches_per_example_backend_jacobians(x64):
    model = conv_mlp()
    x = B.tensor(np.random.default_rng(4).normal(size=(3, 4, 3)))
    conv, flat, mid = (model.get_layer(n) for n in ("conv", "flat", "mid"))
    c = arr(conv(x))
    J = gp.jacobian(model, x, of="mid", wrt="conv")
    assert tuple(J.shape) == (3, 6, 3, 5)
    for i in range(3):  # one example at a time
        ref = B.jacobian(lambda ci: mid(flat(ci[None]))[0])(c[i])
        close(arr(J)[i], ref, B.tight, f"conv {i}")
    J = gp.jacobian(model, x, of=mid)
    assert tuple(J.shape) == (3, 6, 4, 3)
    for i in range(3):
        ref = B.jacobian(lambda xi: mid(flat(conv(xi[None])))[0])(arr(x)[i])
        close(arr(J)[i], ref, B.tight, f"inputs {i}")
    with pytest.raises(gp.GradprobeError, match=r"needs 1,728 bytes.*max_bytes=100"):
        gp.jacobian(model, x, of="mid", max_bytes=100)
    with pytest.raises(gp.GradprobeError, match="look swapped"):
        gp.jacobian(model, x, of="conv", wrt="mid")


# ------------------------------------------------------------ per-example norms
def test_per_example_norms_match_a_loop_of_backend_gradients(x64):
    keras.utils.set_random_seed(5)
    inp = keras.Input((6, 2))
    h = layers.Conv1D(3, 2, activation="sigmoid", name="conv")(inp)
    h = layers.LayerNormalization(name="ln")(h)
    h = layers.Flatten()(h)
    model = keras.Model(inp, layers.Dense(3, name="logits")(h))
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 6, 2))
    labels = np.array([0, 2, 1, 2])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    tv, ntv = B.values(model)
    rows = []
    for i in range(4):  # one example at a time
        xi, yi = B.tensor(x[i:i + 1]), B.tensor(labels[i:i + 1])
        g = B.grad(lambda ws, xi=xi, yi=yi: loss_fn(yi, model.stateless_call(
            ws, ntv, xi)[0]).sum())(tv)
        rows.append([float(np.linalg.norm(gi)) for gi in g])
    ref = np.array(rows)
    # the method "auto" picks: vectorized by jax.vmap on JAX; on PyTorch the
    # single-example passes run one after the other (backends/torch.py)
    auto = {"jax": "vmap", "torch": "loop"}[B.name]
    for method in ("auto", "vectorized"):
        n = gp.per_example_norms(model, x, gp.loss(loss_fn, labels), method=method)
        assert list(n) == ["conv.kernel", "conv.bias", "ln.gamma", "ln.beta",
                           "logits.kernel", "logits.bias"]
        # (1e-6: LayerNormalization's moments compute in float32 on JAX; the loop and
        # the mapped pass round differently)
        for j, k in enumerate(n):
            close(n[k], ref[:, j], 1e-6, f"{method} {k}")
        close(n.total, np.sqrt((ref ** 2).sum(1)), 1e-6)
        assert set(n.method.values()) == {auto if method == "auto" else "jacobian"}
        close(n.target, loss_fn(labels, model(x)), 1e-6)
    with pytest.raises(gp.GradprobeError, match="needs a per-example target"):
        gp.per_example_norms(model, x, lambda y: y.sum())
    with pytest.raises(gp.GradprobeError, match="weight selectors"):
        gp.per_example_norms(model, x, 0, "conv")
    with pytest.raises(gp.GradprobeError, match="method='ghost'"):
        gp.per_example_norms(model, x, 0, method="ghost")
