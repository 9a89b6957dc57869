"""Attribution methods and the result's statistics on the JAX and PyTorch
backends of Keras 3, written once for both.

Run with `KERAS_BACKEND=jax` (or `torch`) `python -m pytest tests/backends`.
Under any other backend the module is skipped.

Oracles: hand-written gradient code of the active backend (`jax.grad` or
`torch.autograd.grad`, through `backend_helpers.oracle()`) of the model's output
(through `model.stateless_call`, or of the layers after an activation), in
float64: to rounding on JAX, to ~1e-7 on PyTorch (Keras' float64 matmul there is
about 4e-8 off; `B.tol`); Integrated Gradients' completeness (`delta`); the
Grad-CAM and Grad-CAM++ formulas evaluated by hand on hand-written activation
gradients; SmoothGrad as a hand average over the documented noise.
"""

import keras
import numpy as np
import pytest
from backend_helpers import (
    arr,
    assert_untouched,
    cam_formulas,
    check_grad_cam_layer,
    close,
    cnn,
    normalized,
    oracle,
    skip_unless_jax_or_torch,
    snapshot,
    trapezoid,
)
from keras import layers

import gradprobe as gp
from gradprobe.core import _patch
from gradprobe.core.capture import functional as _functional
from gradprobe.core.engine import gradients_at
from gradprobe.errors import GradprobeError

skip_unless_jax_or_torch()
B = oracle()  # jax.grad on JAX, torch.autograd.grad on PyTorch


def assert_sacred(model, before):
    assert_untouched(model, before)
    assert _patch.active_wrappers() == 0


# ----------------------------------------------------- saliency, gradient x input
def test_saliency_and_gradient_x_input_against_backend_autograd(x64):
    model = cnn()
    before = snapshot(model)
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 2))
    pred = np.argmax(arr(model(x)), axis=-1)
    g = B.grad(B.class_objective(model, pred))(x)

    sal = gp.saliency(model, x, "predicted")
    assert np.asarray(sal).dtype == np.float64
    close(sal, np.abs(g).max(axis=-1), B.tol, what="saliency (max over channels)")
    close(sal.target, arr(model(x))[np.arange(3), pred], B.tol, what="target values")
    close(gp.saliency(model, x, 2, absolute=False, reduce_channels=None, batch_size=2),
          B.grad(B.class_objective(model, [2, 2, 2]))(x), B.tol, what="signed, chunked")
    close(gp.saliency(model, x, 1, reduce_channels="mean"),
          np.abs(B.grad(B.class_objective(model, [1] * 3))(x)).mean(axis=-1), B.tol,
          what="mean over channels")
    close(gp.gradient_x_input(model, x, "predicted"), g * x, B.tol, what="gradient x input")

    # layer= : gradient (x activation) at the conv output, from the layers after it
    conv = arr(model.get_layer("conv")(x))
    dconv = B.grad(lambda a: model.get_layer("out")(model.get_layer("gap")(a))[:, 1].sum())(conv)
    lay = gp.saliency(model, x, 1, layer="conv", absolute=False, reduce_channels=None)
    assert lay.layer == "conv"
    close(lay, dconv, B.tol, what="layer saliency")
    close(gp.gradient_x_input(model, x, 1, layer="conv"), dconv * conv, B.tol, what="layer gxa")
    assert_sacred(model, before)


def test_saliency_multi_input_holds_integer_inputs_fixed():
    keras.utils.set_random_seed(2)
    a = keras.Input((4,), name="a")
    ids = keras.Input((3,), dtype="int32", name="ids")
    e = layers.Flatten()(layers.Embedding(5, 2, name="emb")(ids))
    y = layers.Dense(2, name="out")(layers.Concatenate()([layers.Dense(3, name="h")(a), e]))
    model = keras.Model({"a": a, "ids": ids}, y)
    xa = np.random.default_rng(1).normal(size=(2, 4)).astype("float32")
    xi = np.array([[1, 2, 3], [0, 4, 4]], "int32")
    res = gp.saliency(model, {"a": xa, "ids": xi}, 0, absolute=False)
    assert res.fixed == ("inputs:ids",)
    assert res.values["ids"] is None
    tv, ntv = B.values(model)
    ga = B.grad(lambda v: model.stateless_call(tv, ntv, {"a": v, "ids": B.tensor(xi)})[0]
                [:, 0].sum())
    close(res["a"], ga(xa), tol=1e-6, what="float input map")
    with pytest.raises(GradprobeError, match="held fixed"):
        res["ids"]


# ------------------------------------------------------------ Integrated Gradients
def test_integrated_gradients_against_hand_written_riemann_and_completeness(x64):
    model = cnn()
    before = snapshot(model)
    rng = np.random.default_rng(3)
    x, base = rng.normal(size=(3, 6, 6, 2)), rng.normal(size=(6, 6, 2)) * 0.1
    steps = 7
    grad = B.grad(B.class_objective(model, [1, 1, 1]))
    alphas, w = trapezoid(steps)
    expect = sum(wk * grad(base + a * (x - base)) for a, wk in zip(alphas, w)) * (x - base)
    ig = gp.integrated_gradients(model, x, 1, baseline=base, steps=steps, batch_size=6)
    close(ig, expect, B.tol, what="trapezoid IG")  # (21 rows in chunks of 6, the last one padded)
    close(gp.integrated_gradients(model, x, 1, baseline=base, steps=steps), expect, B.tol,
          what="one chunk")
    y_x = arr(model(x))[:, 1]
    y_b = arr(model(np.broadcast_to(base, x.shape).copy()))[:, 1]
    close(ig.target, y_x, B.tol, what="f(x)")
    close(ig.delta, expect.reshape(3, -1).sum(1) - (y_x - y_b), B.tol, what="delta as documented")
    # completeness: Gauss-Legendre makes the path integral exact to rounding
    gl = gp.integrated_gradients(model, x, 1, baseline=base, steps=24, method="gausslegendre",
                                 batch_size=6)
    assert np.abs(arr(gl.delta)).max() < B.tol
    close(np.asarray(gl).reshape(3, -1).sum(1), y_x - y_b, B.tol, what="completeness")
    if B.name == "jax":  # (nothing is compiled on PyTorch: its trace count stays 0)
        # a repeated call with new values of the same shapes reuses the compiled step
        count = _functional.trace_count()
        gp.integrated_gradients(model, x * 0.5, 1, baseline=base, steps=steps, batch_size=6)
        assert _functional.trace_count() == count
    assert_sacred(model, before)


def test_layer_integrated_gradients_on_token_ids(x64):
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((5,), dtype="int32"), layers.Embedding(9, 4, name="emb"),
                              layers.Dense(3, activation="sigmoid", name="d"),
                              layers.Flatten(name="gap"), layers.Dense(2, name="out")])
    before = snapshot(model)
    ids = np.array([[1, 5, 2, 8, 3], [4, 4, 0, 7, 6]], "int32")
    steps = 6  # (Flatten, not average pooling: keras.ops.mean computes in float32 on JAX)
    a_x = arr(model.get_layer("emb")(ids))
    a_b = arr(model.get_layer("emb")(np.zeros_like(ids)))  # the default baseline: ids 0

    def rest(e):
        return model.get_layer("out")(model.get_layer("gap")(model.get_layer("d")(e)))[:, 1].sum()

    alphas, w = trapezoid(steps)
    expect = sum(wk * B.grad(rest)(a_b + a * (a_x - a_b))
                 for a, wk in zip(alphas, w)) * (a_x - a_b)
    ig = gp.integrated_gradients(model, ids, 1, layer="emb", steps=steps, batch_size=4)
    assert ig.layer == "emb" and np.asarray(ig).shape == (2, 5, 4)
    close(ig, expect, B.tol, what="layer IG")
    gl = gp.integrated_gradients(model, ids, 1, layer="emb", steps=20, method="gausslegendre",
                                 batch_size=4)
    assert np.abs(arr(gl.delta)).max() < B.tol
    f_x = arr(model(ids))[:, 1]
    f_b = arr(model(np.zeros_like(ids)))[:, 1]
    close(np.asarray(gl).reshape(2, -1).sum(1), f_x - f_b, B.tol, what="layer completeness")
    close(gl.reduce("sum"), np.asarray(gl).sum(-1), B.tol, what="one score per token")
    assert_sacred(model, before)


def test_functional_gradients_at_replaces_the_activation(x64):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), layers.Dense(5, activation="sigmoid", name="h"),
                              layers.Dense(3, activation="sigmoid", name="out")])
    x = np.random.default_rng(5).normal(size=(2, 4))
    v = np.random.default_rng(6).normal(size=(2, 5))
    g = gradients_at(model, x, 2, "h", v)
    expect = B.grad(lambda a: model.get_layer("out")(a)[:, 2].sum())(v)
    close(g["h"], expect, B.tol, what="gradient at the replacing values")
    close(g.activations["h"], v, B.tol, what="the replaced activation")
    close(g.target, arr(model.get_layer("out")(v))[:, 2], B.tol, what="target on the replacement")
    with pytest.raises(GradprobeError, match="replacement"):
        gradients_at(model, x, 2, "h", np.zeros((2, 6)))
    # a shared layer: one call replaced ("d@1"); both calls at once is refused
    keras.utils.set_random_seed(6)
    d, out2 = layers.Dense(4, activation="sigmoid", name="d"), layers.Dense(2, name="out2")
    inp = keras.Input((4,))
    shared = keras.Model(inp, out2(d(d(inp))))
    v2 = np.random.default_rng(7).normal(size=(2, 4))
    expect2 = B.grad(lambda a: out2(a)[:, 1].sum())(v2)
    close(gradients_at(shared, x, 1, "d@1", v2)["d@1"], expect2, B.tol, what="d@1")
    with pytest.raises(GradprobeError, match="replaced"):
        gradients_at(shared, x, 1, "d", v2)


# ------------------------------------------------------------------- SmoothGrad
def test_smoothgrad_is_the_hand_average_over_the_documented_noise(x64):
    model = cnn()
    x = np.random.default_rng(8).normal(size=(2, 6, 6, 2))
    n, samples, noise, seed = 2, 4, 0.2, 11
    span = x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True)
    grad = B.grad(B.class_objective(model, [3, 3]))
    total = 0
    for s in range(samples):
        eps = np.stack([np.random.default_rng((seed, 0, s * n + i)).standard_normal(x.shape[1:])
                        for i in range(n)])
        total = total + grad(x + noise * span * eps)
    avg = total / samples
    sg = gp.smoothgrad(model, x, 3, samples=samples, noise=noise, seed=seed)
    close(sg, np.abs(avg).max(axis=-1), B.tol, what="smoothgrad")
    close(gp.smoothgrad(model, x, 3, samples=samples, noise=noise, seed=seed, batch_size=3,
                        absolute=False, reduce_channels=None), avg, B.tol, what="chunked, signed")
    other = gp.smoothgrad(model, x, 3, samples=samples, noise=noise, seed=seed + 1)
    assert np.abs(np.asarray(other) - np.asarray(sg)).max() > 1e-6  # the seed matters
    close(gp.smoothgrad(model, x, 3, samples=3, noise=0.0, seed=0, absolute=False,
                        reduce_channels=None),
          grad(x), B.tol, what="noise=0 is the gradient")


# --------------------------------------------------------------------- Grad-CAM
def hand_cams(model, x, cls):
    A = arr(model.get_layer("conv")(x))
    out = model.get_layer("out")
    gap = model.get_layer("gap")
    dA = B.grad(lambda a: out(gap(a))[:, cls].sum())(A)
    return cam_formulas(A, dA)


def test_grad_cam_and_plus_plus_against_the_formulas(x64):
    model = cnn("relu")
    before = snapshot(model)
    x = np.random.default_rng(9).normal(size=(3, 6, 6, 2))
    c = next(c for c in range(4) if hand_cams(model, x, c)[0].max() > 0)  # some positive map
    cam, pp = hand_cams(model, x, c)
    assert pp.max() > 0
    close(gp.grad_cam(model, x, c, "conv", upsample=False, normalize=False), cam, B.tol,
          what="cam")
    close(gp.grad_cam(model, x, c, "conv", upsample=False), normalized(cam), B.tol,
          what="normalized")
    close(gp.grad_cam_plus_plus(model, x, c, "conv", upsample=False, normalize=False), pp, B.tol,
          what="grad-cam++")
    up = gp.grad_cam(model, x, c, "conv", normalize=False)
    close(up, B.resize_bilinear(cam, (6, 6)), B.tol, what="bilinear upsample")
    with pytest.raises(GradprobeError, match="spatial feature maps"):
        gp.grad_cam(model, x, c, "out")
    assert_sacred(model, before)


# ------------------------------------------------- stats, summary and diagnose
def test_stats_summary_and_diagnose_values(x64):
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((3,)), layers.Dense(4, activation="relu", name="h"),
                              layers.Dense(2, name="out")])
    h = model.get_layer("h")
    kernel, bias = arr(h.kernel.value).copy(), arr(h.bias.value).copy()
    kernel[:, 0], bias[0] = 0.0, -1.0  # unit 0 of h never fires: a dead unit
    h.kernel.assign(kernel)
    h.bias.assign(bias)
    x = np.random.default_rng(7).normal(size=(5, 3))
    g = gp.gradients(model, x, 1, ["h", "h.kernel"])
    hk = B.weight_grad(model, h.kernel, x, lambda y: y[:, 1].sum())
    dh = B.grad(lambda v: model.get_layer("out")(v)[:, 1].sum())(arr(h(x)))
    stats = g.stats()
    for key, ref in (("h", dh), ("h.kernel", hk)):
        s = stats[key]
        assert s["shape"] == ref.shape
        close(s["norm"], np.linalg.norm(ref), B.tol, what=f"{key} norm")
        close(s["mean_abs"], np.abs(ref).mean(), B.tol, what=f"{key} mean_abs")
        close(s["max_abs"], np.abs(ref).max(), B.tol, what=f"{key} max_abs")
        close(s["std"], ref.std(), B.tol, what=f"{key} std")
        assert s["zero_fraction"] == np.count_nonzero(ref == 0) / ref.size
        assert s["nonfinite"] == 0
    findings = g.diagnose()
    dead = [f for f in findings if f.kind == "dead"]
    # (the activation's gradient is not zero: the ReLU is before the probe)
    assert [(f.key, f.value) for f in dead] == [("h.kernel", 0.25)]
    lines = []
    g.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert "h.kernel" in text and f"{stats['h']['norm']:.4g}" in text and "dead units" in text


def test_grad_cam_layer_last_connected_spatial_layer():
    check_grad_cam_layer(assert_sacred)
