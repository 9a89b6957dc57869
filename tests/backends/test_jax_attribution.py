"""Attribution methods and the result's statistics on the JAX backend of Keras 3.

Run with `KERAS_BACKEND=jax python -m pytest tests/backends/test_jax_attribution.py`.
Under any other backend the module is skipped before `jax` is imported.

Oracles: hand-written `jax.grad` of the model's output (through
`model.stateless_call`, or of the layers after an activation), in float64;
Integrated Gradients' completeness (`delta`); the Grad-CAM and Grad-CAM++
formulas evaluated by hand on hand-written activation gradients; SmoothGrad as a
hand average over the documented noise.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("JAX backend tests: run with KERAS_BACKEND=jax", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from backend_helpers import (  # noqa: E402
    assert_untouched,
    cam_formulas,
    check_grad_cam_layer,
    close,
    cnn,
    normalized,
    snapshot,
    trapezoid,
)
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402
from gradprobe.core import _functional, _patch  # noqa: E402
from gradprobe.errors import GradprobeError  # noqa: E402

TOL = 1e-10  # the default tolerance of `close` here: the float64 oracles agree to rounding on JAX


def values(model):
    return ([v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables])


def class_objective(model, cls):
    """x -> sum over examples of output[i, cls[i]], through stateless_call."""
    tv, ntv = values(model)
    cls = jnp.asarray(cls)

    def f(x):
        y = model.stateless_call(tv, ntv, x)[0]
        return jnp.sum(jnp.take_along_axis(y, cls[:, None], axis=1))

    return f


def assert_sacred(model, before):
    assert_untouched(model, before)
    assert _patch.active_wrappers() == 0


# ----------------------------------------------------- saliency, gradient x input
def test_saliency_and_gradient_x_input_against_jax_grad(x64):
    model = cnn()
    before = snapshot(model)
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 2))
    pred = np.argmax(np.asarray(model(x)), axis=-1)
    g = np.asarray(jax.grad(class_objective(model, pred))(jnp.asarray(x)))

    sal = gp.saliency(model, x, "predicted")
    assert np.asarray(sal).dtype == np.float64
    close(sal, np.abs(g).max(axis=-1), TOL, what="saliency (max over channels)")
    close(sal.target, np.asarray(model(x))[np.arange(3), pred], TOL, what="target values")
    close(gp.saliency(model, x, 2, absolute=False, reduce_channels=None, batch_size=2),
          jax.grad(class_objective(model, [2, 2, 2]))(jnp.asarray(x)), TOL, what="signed, chunked")
    close(gp.saliency(model, x, 1, reduce_channels="mean"),
          np.abs(np.asarray(jax.grad(class_objective(model, [1] * 3))(jnp.asarray(x))))
          .mean(axis=-1), TOL, what="mean over channels")
    close(gp.gradient_x_input(model, x, "predicted"), g * x, TOL, what="gradient x input")

    # layer= : gradient (x activation) at the conv output, from the layers after it
    conv = np.asarray(model.get_layer("conv")(x))
    rest = jax.grad(lambda a: jnp.sum(model.get_layer("out")(model.get_layer("gap")(a))[:, 1]))
    dconv = np.asarray(rest(jnp.asarray(conv)))
    lay = gp.saliency(model, x, 1, layer="conv", absolute=False, reduce_channels=None)
    assert lay.layer == "conv"
    close(lay, dconv, TOL, what="layer saliency")
    close(gp.gradient_x_input(model, x, 1, layer="conv"), dconv * conv, TOL, what="layer gxa")
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
    tv, ntv = values(model)
    ga = jax.grad(lambda v: jnp.sum(model.stateless_call(tv, ntv, {"a": v, "ids": xi})[0][:, 0]))
    close(res["a"], ga(jnp.asarray(xa)), tol=1e-6, what="float input map")
    with pytest.raises(GradprobeError, match="held fixed"):
        res["ids"]


# ------------------------------------------------------------ Integrated Gradients
def test_integrated_gradients_against_hand_written_riemann_and_completeness(x64):
    model = cnn()
    before = snapshot(model)
    rng = np.random.default_rng(3)
    x, base = rng.normal(size=(3, 6, 6, 2)), rng.normal(size=(6, 6, 2)) * 0.1
    steps = 7
    f = class_objective(model, [1, 1, 1])
    grad = jax.grad(f)
    alphas, w = trapezoid(steps)
    expect = sum(wk * np.asarray(grad(jnp.asarray(base + a * (x - base))))
                 for a, wk in zip(alphas, w)) * (x - base)
    ig = gp.integrated_gradients(model, x, 1, baseline=base, steps=steps, batch_size=6)
    close(ig, expect, TOL, what="trapezoid IG")  # (21 rows in chunks of 6, the last one padded)
    close(gp.integrated_gradients(model, x, 1, baseline=base, steps=steps), expect, TOL,
          what="one chunk")
    y_x, y_b = np.asarray(model(x))[:, 1], np.asarray(model(np.broadcast_to(base, x.shape)))[:, 1]
    close(ig.target, y_x, TOL, what="f(x)")
    close(ig.delta, expect.reshape(3, -1).sum(1) - (y_x - y_b), TOL, what="delta as documented")
    # completeness: Gauss-Legendre makes the path integral exact to rounding
    gl = gp.integrated_gradients(model, x, 1, baseline=base, steps=24, method="gausslegendre",
                                 batch_size=6)
    assert np.abs(np.asarray(gl.delta)).max() < 1e-10
    close(np.asarray(gl).reshape(3, -1).sum(1), y_x - y_b, TOL, what="completeness")
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
    a_x = np.asarray(model.get_layer("emb")(ids))
    a_b = np.asarray(model.get_layer("emb")(np.zeros_like(ids)))  # the default baseline: ids 0

    def rest(e):
        return jnp.sum(model.get_layer("out")(model.get_layer("gap")(model.get_layer("d")(e)))[:, 1])

    alphas, w = trapezoid(steps)
    expect = sum(wk * np.asarray(jax.grad(rest)(jnp.asarray(a_b + a * (a_x - a_b))))
                 for a, wk in zip(alphas, w)) * (a_x - a_b)
    ig = gp.integrated_gradients(model, ids, 1, layer="emb", steps=steps, batch_size=4)
    assert ig.layer == "emb" and np.asarray(ig).shape == (2, 5, 4)
    close(ig, expect, TOL, what="layer IG")
    gl = gp.integrated_gradients(model, ids, 1, layer="emb", steps=20, method="gausslegendre",
                                 batch_size=4)
    assert np.abs(np.asarray(gl.delta)).max() < 1e-10
    f_x = np.asarray(model(ids))[:, 1]
    f_b = np.asarray(model(np.zeros_like(ids)))[:, 1]
    close(np.asarray(gl).reshape(2, -1).sum(1), f_x - f_b, TOL, what="layer completeness")
    close(gl.reduce("sum"), np.asarray(gl).sum(-1), TOL, what="one score per token")
    assert_sacred(model, before)


def test_functional_gradients_at_replaces_the_activation(x64):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), layers.Dense(5, activation="sigmoid", name="h"),
                              layers.Dense(3, activation="sigmoid", name="out")])
    x = np.random.default_rng(5).normal(size=(2, 4))
    v = np.random.default_rng(6).normal(size=(2, 5))
    g = _functional.gradients_at(model, x, 2, "h", v)
    expect = jax.grad(lambda a: jnp.sum(model.get_layer("out")(a)[:, 2]))(jnp.asarray(v))
    close(g["h"], expect, TOL, what="gradient at the replacing values")
    close(g.activations["h"], v, TOL, what="the replaced activation")
    close(g.target, np.asarray(model.get_layer("out")(v))[:, 2], TOL, what="target on the replacement")
    with pytest.raises(GradprobeError, match="replacement"):
        _functional.gradients_at(model, x, 2, "h", np.zeros((2, 6)))
    # a shared layer: one call replaced ("d@1"); both calls at once is refused
    keras.utils.set_random_seed(6)
    d, out2 = layers.Dense(4, activation="sigmoid", name="d"), layers.Dense(2, name="out2")
    inp = keras.Input((4,))
    shared = keras.Model(inp, out2(d(d(inp))))
    v2 = np.random.default_rng(7).normal(size=(2, 4))
    expect2 = jax.grad(lambda a: jnp.sum(out2(a)[:, 1]))(jnp.asarray(v2))
    close(_functional.gradients_at(shared, x, 1, "d@1", v2)["d@1"], expect2, TOL, what="d@1")
    with pytest.raises(GradprobeError, match="replaced"):
        _functional.gradients_at(shared, x, 1, "d", v2)


# ------------------------------------------------------------------- SmoothGrad
def test_smoothgrad_is_the_hand_average_over_the_documented_noise(x64):
    model = cnn()
    x = np.random.default_rng(8).normal(size=(2, 6, 6, 2))
    n, samples, noise, seed = 2, 4, 0.2, 11
    span = x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True)
    grad = jax.grad(class_objective(model, [3, 3]))
    total = 0
    for s in range(samples):
        eps = np.stack([np.random.default_rng((seed, 0, s * n + i)).standard_normal(x.shape[1:])
                        for i in range(n)])
        total = total + np.asarray(grad(jnp.asarray(x + noise * span * eps)))
    avg = total / samples
    sg = gp.smoothgrad(model, x, 3, samples=samples, noise=noise, seed=seed)
    close(sg, np.abs(avg).max(axis=-1), TOL, what="smoothgrad")
    close(gp.smoothgrad(model, x, 3, samples=samples, noise=noise, seed=seed, batch_size=3,
                        absolute=False, reduce_channels=None), avg, TOL, what="chunked, signed")
    other = gp.smoothgrad(model, x, 3, samples=samples, noise=noise, seed=seed + 1)
    assert np.abs(np.asarray(other) - np.asarray(sg)).max() > 1e-6  # the seed matters
    close(gp.smoothgrad(model, x, 3, samples=3, noise=0.0, seed=0, absolute=False,
                        reduce_channels=None),
          grad(jnp.asarray(x)), TOL, what="noise=0 is the gradient")


# --------------------------------------------------------------------- Grad-CAM
def hand_cams(model, x, cls):
    A = np.asarray(model.get_layer("conv")(x))
    out = model.get_layer("out")
    gap = model.get_layer("gap")
    dA = np.asarray(jax.grad(lambda a: jnp.sum(out(gap(a))[:, cls]))(jnp.asarray(A)))
    return cam_formulas(A, dA)


def test_grad_cam_and_plus_plus_against_the_formulas(x64):
    model = cnn("relu")
    before = snapshot(model)
    x = np.random.default_rng(9).normal(size=(3, 6, 6, 2))
    c = next(c for c in range(4) if hand_cams(model, x, c)[0].max() > 0)  # some positive map
    cam, pp = hand_cams(model, x, c)
    assert pp.max() > 0
    close(gp.grad_cam(model, x, c, "conv", upsample=False, normalize=False), cam, TOL, what="cam")
    close(gp.grad_cam(model, x, c, "conv", upsample=False), normalized(cam), TOL, what="normalized")
    close(gp.grad_cam_plus_plus(model, x, c, "conv", upsample=False, normalize=False), pp, TOL,
          what="grad-cam++")
    up = gp.grad_cam(model, x, c, "conv", normalize=False)
    close(up, jax.image.resize(jnp.asarray(cam), (3, 6, 6), "linear"), TOL, what="bilinear upsample")
    with pytest.raises(GradprobeError, match="spatial feature maps"):
        gp.grad_cam(model, x, c, "out")
    assert_sacred(model, before)


# ------------------------------------------------- stats, summary and diagnose
def test_stats_summary_and_diagnose_values(x64):
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((3,)), layers.Dense(4, activation="relu", name="h"),
                              layers.Dense(2, name="out")])
    h = model.get_layer("h")
    kernel, bias = np.array(h.kernel.value), np.array(h.bias.value)
    kernel[:, 0], bias[0] = 0.0, -1.0  # unit 0 of h never fires: a dead unit
    h.kernel.assign(kernel)
    h.bias.assign(bias)
    x = np.random.default_rng(7).normal(size=(5, 3))
    g = gp.gradients(model, x, 1, ["h", "h.kernel"])
    tv, ntv = values(model)
    hk = jax.grad(lambda k: jnp.sum(model.stateless_call([k, *tv[1:]], ntv, x)[0][:, 1]))(tv[0])
    a = np.asarray(h(x))
    dh = np.asarray(jax.grad(lambda v: jnp.sum(model.get_layer("out")(v)[:, 1]))(jnp.asarray(a)))
    stats = g.stats()
    for key, ref in (("h", dh), ("h.kernel", np.asarray(hk))):
        s = stats[key]
        assert s["shape"] == ref.shape
        close(s["norm"], np.linalg.norm(ref), TOL, what=f"{key} norm")
        close(s["mean_abs"], np.abs(ref).mean(), TOL, what=f"{key} mean_abs")
        close(s["max_abs"], np.abs(ref).max(), TOL, what=f"{key} max_abs")
        close(s["std"], ref.std(), TOL, what=f"{key} std")
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
