"""Mixed precision on every backend (TensorFlow, JAX, PyTorch): `gp.gradients` and
the attribution maps of `mixed_float16`, `mixed_bfloat16` and `float16` models.

Promises checked, the same on the three backends: every gradient (activations,
weights, inputs) and every activation value comes back in float32; float16
models are loss-scaled (a first backward pass at scale 1 measures the largest
gradient, a second runs at the power of two that brings it to about 2**14, at
most 2**15; a source whose scaled gradient is not finite keeps its unscaled
one), so gradients below float16's smallest subnormal (6e-8) are not flushed to
zero; bfloat16 (float32's exponent range) needs no scaling.

Oracles, independent of gradprobe:
- a hand-written loss-scaled gradient in the backend's own autograd
  (`tf.GradientTape` with `output_gradients`, a `jax.vjp` pullback,
  `torch.autograd.grad` with `grad_outputs`): the same float16 model's backward
  pass seeded with 2**15, each gradient cast to float32 and divided by 2**15;
  with the seed 1 instead, the same code shows the zeros that a plain float16
  backward pass gives on the planted tiny-gradient models;
- closed forms on linear models (the overflow cases);
- the float32 twin (the same weights in a float32 model), within a tolerance
  derived from the policy's precision (tests/tolerance.py).

Runs under every `KERAS_BACKEND` (`make test` runs tests/backends on all three).
Every test restores the global dtype policy (`policy`).
"""

from __future__ import annotations

from contextlib import contextmanager

import keras
import numpy as np
import pytest
from backend_helpers import arr, assert_sacred_state, sacred_state
from keras import layers

import gradprobe as gp
from tolerance import assert_close, tolerance

BACKEND = keras.backend.backend()
# Multiple of float16's eps (9.8e-4), relative to the largest expected value, for
# comparisons with the scaled oracle and the float32 twins (measured: at most 4.6 eps
# for gradients, 5.5 eps for attribution maps (Grad-CAM), on the three backends).
F16 = 16


@contextmanager
def policy(name):
    """Builds layers under the dtype policy `name`; the previous policy is restored."""
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)


def dtype_of(t):
    return keras.backend.standardize_dtype(t.dtype)


def backward(fn, args, seed):
    """The hand-written gradients of the scalar `fn(*args)` with respect to `args`,
    its backward pass seeded with `seed` (in the objective's dtype), each gradient
    cast to float32 and divided by `seed`: the backend's own autograd only."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        vs = [tf.convert_to_tensor(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(vs)
            out = fn(*vs)
        grads = tape.gradient(out, vs, output_gradients=tf.cast(tf.fill(tf.shape(out), seed),
                                                                  out.dtype))
    elif BACKEND == "jax":
        import jax.numpy as jnp
        from jax import vjp

        out, pullback = vjp(fn, *[jnp.asarray(a) for a in args])
        grads = pullback(jnp.full_like(out, seed))
    else:
        import torch

        vs = [(a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(a))
              .clone().requires_grad_(True) for a in args]
        out = fn(*vs)
        grads = [g.float() for g in  # (NumPy has no bfloat16 for PyTorch to convert to)
                 torch.autograd.grad(out, vs, grad_outputs=torch.full_like(out, seed))]
    return [arr(g).astype(np.float32) / np.float32(seed) for g in grads]


def hand_gradients(model, x, cls, seed):
    """{key: gradient} of sum(output[:, cls]) for a Sequential `model` whose layers
    are "h0", "h1", "out": the activations of "h0" and "h1" (the rest of the model
    differentiated at the activation), "h0.kernel" (`stateless_call`) and the input,
    each by `backward` with `seed`."""
    def objective(y):
        return keras.ops.sum(y[:, cls])

    out = {}
    h = x
    for k, layer in enumerate(model.layers[:-1]):
        h = layer(h)
        rest = model.layers[k + 1:]

        def after(a, rest=rest):
            for later in rest:
                a = later(a)
            return objective(a)

        out[layer.name] = backward(after, [h], seed)[0]
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    pos = [id(v) for v in model.trainable_variables].index(id(model.get_layer("h0").kernel))

    def with_kernel(w):
        values = list(tv)
        values[pos] = w
        return objective(model.stateless_call(values, ntv, x)[0])

    out["h0.kernel"] = backward(with_kernel, [tv[pos]], seed)[0]
    out["inputs"] = backward(lambda v: objective(model(v)), [x], seed)[0]
    return out


def planted(kind, tiny):
    """"h0" (Dense or Conv2D, tanh) -> "h1" -> "out" (Dense, float32 as Keras
    recommends for the last layer), built under the current policy, with the output
    kernel scaled by `tiny`: every gradient is about `tiny` / 3 (1e-8: all of them
    below half of float16's smallest subnormal; 1e-6: a part of them)."""
    keras.utils.set_random_seed(12)
    if kind == "dense":
        front = [keras.Input((8,)), layers.Dense(16, activation="tanh", name="h0"),
                 layers.Dense(16, activation="tanh", name="h1")]
    else:
        front = [keras.Input((6, 6, 2)), layers.Conv2D(4, 3, activation="tanh", name="h0"),
                 layers.Flatten(name="h1")]
    model = keras.Sequential([*front, layers.Dense(3, name="out", dtype="float32")])
    out = model.get_layer("out")
    out.kernel.assign(out.kernel * tiny)
    return model


def planted_inputs(kind):
    shape = (4, 8) if kind == "dense" else (3, 6, 6, 2)
    return np.random.default_rng(13).normal(size=shape).astype("float32")


WRT = ["h0", "h1", "h0.kernel", "inputs"]


def assert_float32_result(g):
    for key in g:
        assert dtype_of(g[key]) == "float32", (key, g[key].dtype)
        assert arr(g[key]).dtype == np.float32, key
    for key, value in g.activations.items():
        assert dtype_of(value) == "float32", (key, value.dtype)


# ---------------------------------------------------------- loss-scaled oracle
@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("tiny", [1e-6, 1e-8])
def test_float16_gradients_equal_a_hand_written_loss_scaled_gradient(kind, tiny):
    with policy("mixed_float16"):
        model = planted(kind, tiny)
    assert model.get_layer("h0").compute_dtype == "float16"
    x = planted_inputs(kind)
    want = hand_gradients(model, x, 1, 2.0 ** 15)
    plain = hand_gradients(model, x, 1, 1.0)
    before, out_before = sacred_state(model), arr(model(x))
    g = gp.gradients(model, x, 1, WRT)  # (compiled and eager: the float32-twin test)
    assert_sacred_state(model, before, x, out_before)
    assert list(g) == ["inputs", "h0", "h0.kernel", "h1"]
    assert_float32_result(g)
    for key in WRT:
        got, w = arr(g[key]), want[key]
        assert np.abs(w).max() > 0, key
        assert_close(got, w, "float16", F16, what=key)
        tol = tolerance("float16", F16) * np.abs(w).max()
        assert not np.any((got == 0) & (np.abs(w) > tol)), f"{key}: spurious zeros"
        if tiny == 1e-8:
            # What a float16 backward pass without loss scaling gives here.
            assert np.all(plain[key] == 0), key


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_bfloat16_gradients_need_no_loss_scaling(kind):
    """bfloat16 has float32's exponent range: the plain backward pass (seed 1)
    keeps gradients of 3e-9, and gradprobe equals it, in float32."""
    with policy("mixed_bfloat16"):
        model = planted(kind, 1e-8)
    assert model.get_layer("h0").compute_dtype == "bfloat16"
    x = planted_inputs(kind)
    want = hand_gradients(model, x, 1, 1.0)
    g = gp.gradients(model, x, 1, WRT)
    assert_float32_result(g)
    for key in WRT:
        assert np.all(want[key] != 0) or key == "h0.kernel", key
        assert_close(arr(g[key]), want[key], "bfloat16", 8, what=key)


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16", "float16"])
def test_result_dtypes_per_key(name):
    """The same dtypes on every backend: gradients (activations, weights, inputs, an
    unconnected source's zeros) and values in float32; the target and the outputs in
    the model's own dtype."""
    low = name.split("_")[-1]
    with policy(name):
        inp = keras.Input((4,))
        a = layers.Dense(3, name="a")(inp)
        side = layers.Dense(2, name="side")(inp)
        model = keras.Model(inp, [layers.Dense(2, name="b")(a), side])
    x = np.ones((2, 4), "float32")
    g = gp.gradients(model, x, 0, ["a", "b.kernel", "inputs", "side"], output=0,
                     unconnected="zero")
    assert list(g.unconnected) == ["side"]
    assert_float32_result(g)
    assert np.all(arr(g["side"]) == 0)
    assert sorted(g.activations) == ["a", "inputs", "side"]
    assert dtype_of(g.target) == low
    assert [dtype_of(t) for t in g.outputs] == [low, low]


# ------------------------------------------------------------------ overflow
def linear(kernels, x_dim=4, side=None):
    """Dense layers "a", "b", "c" without bias or activation, kernels filled with the
    given constants, built under the current policy; with `side` (units, value)
    pairs, a second chain "p", "q" from the input is added to the output."""
    def chain(h, names, spec):
        for name, (units, value) in zip(names, spec):
            h = layers.Dense(units, use_bias=False, name=name,
                             kernel_initializer=keras.initializers.Constant(value))(h)
        return h

    inp = keras.Input((x_dim,))
    out = chain(inp, "abc", kernels)
    if side is not None:
        out = layers.Add(name="add")([out, chain(inp, "pq", side)])
    return keras.Model(inp, out)


def test_a_float16_gradient_that_overflows_at_scale_1_is_redone_at_a_smaller_scale():
    """d(output 0)/d(a's output) = 4 * 300 * 100 = 1.2e5 for every entry, above
    float16's largest number (65504): the pass at scale 1 overflows, so the scale
    is 2**-2 (the largest gradient taken as 2**16), where it is 3e4, and the
    gradient at p's output (1e-3, through a side chain) is 2.5e-4, still a normal
    float16 number (at the smallest scale, 2**-14, it would be one subnormal step)."""
    with policy("mixed_float16"):
        model = linear([(4, 0.01), (4, 300.0), (1, 100.0)], side=[(4, 0.01), (1, 1e-3)])
    x = np.full((2, 4), 0.5, "float32")
    plain = hand_gradients_linear(model, x, 1.0)
    assert np.all(np.isinf(plain["a"]))  # the float16 backward pass overflows
    g = gp.gradients(model, x, 0, ["a", "b", "p", "a.kernel"])
    assert_float32_result(g)
    assert_close(arr(g["a"]), np.full((2, 4), 1.2e5), "float16", 4, what="a")
    assert_close(arr(g["b"]), np.full((2, 4), 100.0), "float16", 4, what="b")
    assert_close(arr(g["p"]), np.full((2, 4), 1e-3), "float16", 4, what="p")
    assert_close(arr(g["a.kernel"]), np.full((4, 4), 2 * 0.5 * 1.2e5), "float16", 4,
                 what="a.kernel")


def test_a_source_whose_scaled_gradient_overflows_keeps_the_unscaled_one():
    """d(sum of c's outputs)/d(a's output) = 4 * 1e-4 * 4 * 300 = 0.48: the scale is
    2**15, but the gradient at c's input (4 * 300 = 1200) overflows at that scale
    (3.9e7): the scaled gradient of `a` is not finite, and the pass at scale 1 is kept."""
    with policy("mixed_float16"):
        model = linear([(4, 0.01), (4, 1e-4), (4, 300.0)])
    x = np.full((2, 4), 0.5, "float32")
    scaled = hand_gradients_linear(model, x, 2.0 ** 15)
    assert not np.all(np.isfinite(scaled["a"]))  # what the scaled pass alone would give
    g = gp.gradients(model, x, lambda y: keras.ops.sum(y, axis=-1), "a")
    assert_float32_result(g)
    assert np.all(np.isfinite(arr(g["a"])))
    assert_close(arr(g["a"]), np.full((2, 4), 0.48), "float16", 4, what="a")


def hand_gradients_linear(model, x, seed):
    """{"a": gradient of the sum of every output with respect to a's output (the
    output of `linear`'s first layer)}, by `backward` with `seed`."""
    a = model.get_layer("a")(x)

    def after(h):
        return keras.ops.sum(model.get_layer("c")(model.get_layer("b")(h)))

    return {"a": backward(after, [a], seed)[0]}


# ------------------------------------------------------------ float32 twins
def deep(weights=None):
    """Three Dense (16, tanh) layers "h0".."h2" and a float32 Dense "out" whose
    small weights put activation gradients around 1e-7, below float16's smallest
    normal number (6e-5) and partly below its smallest subnormal (6e-8)."""
    keras.utils.set_random_seed(12)
    inp = keras.Input((8,))
    h = inp
    for i in range(3):
        h = layers.Dense(16, activation="tanh", name=f"h{i}")(h)
    model = keras.Model(inp, layers.Dense(3, name="out", dtype="float32")(h))
    if weights is None:
        out = model.get_layer("out")
        out.kernel.assign(out.kernel * 1e-6)
    else:
        model.set_weights(weights)
    return model


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_low_precision_gradients_match_the_float32_twin(name):
    x = np.random.default_rng(13).normal(size=(4, 8)).astype("float32")
    ref = deep()
    wrt = ["h0", "h1", "h2", "h0.kernel", "inputs"]
    want = gp.gradients(ref, x, 1, wrt)
    with policy(name):
        model = deep(ref.get_weights())
    assert model.get_layer("h1").compute_dtype == name.split("_")[1]
    for compile in ("auto", False):
        got = gp.gradients(model, x, 1, wrt, compile=compile)
        assert_float32_result(got)
        for key in wrt:
            g, w = arr(got[key]), arr(want[key])
            assert np.abs(w).min() > 0
            assert not np.any(g == 0), f"{key}: {np.mean(g == 0):.0%} spurious zeros"
            assert_close(g, w, name, 8, what=f"{key} (compile={compile})")
        assert_close(arr(got.activations["h1"]), arr(want.activations["h1"]), name, 8)


def test_mixed_bfloat16_stats_are_those_of_the_float32_values():
    with policy("mixed_bfloat16"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)),
                                  layers.Dense(5, activation="relu", name="h"),
                                  layers.Dense(3, name="out")])
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    g = gp.gradients(model, x, 1, ["h", "h.kernel"])
    stats = g.stats()
    for key in g:
        values = arr(g[key]).astype(np.float64)
        ref = {"norm": np.sqrt(np.sum(values ** 2)), "mean_abs": np.mean(np.abs(values)),
               "max_abs": np.max(np.abs(values)), "std": np.std(values),
               "zero_fraction": np.mean(values == 0)}
        for field, value in ref.items():
            assert stats[key][field] == pytest.approx(value, rel=1e-6), (key, field)
    lines = []
    g.summary(print_fn=lines.append)
    assert "h.kernel" in lines[0]


# ------------------------------------------------------------- attributions
def cnn(weights=None):
    """Conv2D "conv" (4, tanh) -> Conv2D "conv2" (3, sigmoid) -> Flatten -> Dense
    "out" (float32 output), on (8, 8, 2) inputs."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential([
        keras.Input((8, 8, 2)), layers.Conv2D(4, 3, activation="tanh", name="conv"),
        layers.Conv2D(3, 3, activation="sigmoid", name="conv2"), layers.Flatten(name="flat"),
        layers.Dense(4, name="out", dtype="float32")])
    if weights is None:
        # (|kernel|: the output increases with every conv2 map, so that Grad-CAM's
        # maps are not all zero on any backend's random weights)
        out = model.get_layer("out")
        out.kernel.assign(keras.ops.abs(out.kernel))
    else:
        model.set_weights(weights)
    return model


def test_attributions_of_a_mixed_float16_cnn_match_the_float32_twin():
    ref = cnn()
    with policy("mixed_float16"):
        half = cnn(ref.get_weights())
    assert half.get_layer("conv").compute_dtype == "float16"
    x = np.random.default_rng(8).random((3, 8, 8, 2)).astype("float32")
    cases = {
        "saliency": lambda m: gp.saliency(m, x, 1),
        "gradient_x_input": lambda m: gp.gradient_x_input(m, x, 1),
        "integrated_gradients": lambda m: gp.integrated_gradients(m, x, 1, steps=16,
                                                                  batch_size=16),
        "layer integrated_gradients": lambda m: gp.integrated_gradients(m, x, 1, steps=8,
                                                                        layer="conv2"),
        "smoothgrad": lambda m: gp.smoothgrad(m, x, 1, samples=4, seed=0),
        "grad_cam": lambda m: gp.grad_cam(m, x, 1, layer="conv2"),
        "grad_cam_plus_plus": lambda m: gp.grad_cam_plus_plus(m, x, 1, layer="conv2"),
    }
    for what, run in cases.items():
        want, got = run(ref), run(half)
        assert dtype_of(got.values) == "float32", (what, got.values.dtype)
        assert np.abs(np.asarray(want)).max() > 0, what
        assert_close(np.asarray(got), np.asarray(want), "float16", F16, what=what)
        if got.delta is not None:
            assert dtype_of(got.delta) == "float32", what
    assert gp.grad_cam_layer(half, x) == gp.grad_cam_layer(ref, x) == "conv2"


def test_integrated_gradients_of_a_float16_model_sum_in_float32():
    """A model entirely in float16 (weights too, float16 inputs): gradients are summed,
    and the completeness gap `delta` computed, in float32."""
    ref = cnn()
    with policy("float16"):
        half = cnn([w.astype("float16") for w in ref.get_weights()])
    x = np.random.default_rng(5).random((2, 8, 8, 2)).astype("float32")
    want = gp.integrated_gradients(ref, x, 1, steps=32)
    got = gp.integrated_gradients(half, x.astype("float16"), 1, steps=32, batch_size=8,
                                  progress=False)
    assert dtype_of(got.values) == "float32" and dtype_of(got.delta) == "float32"
    assert_close(np.asarray(got), np.asarray(want), "float16", F16)


# ----------------------------------------------------- JAX and PyTorch only
functional_only = pytest.mark.skipif(
    BACKEND not in ("jax", "torch"), reason="the functional capture of JAX and PyTorch")


@functional_only
def test_per_example_weight_gradients_of_a_float16_model_are_loss_scaled():
    """Each single-example pass (jax.vmap / the loop) is loss-scaled on its own."""
    with policy("mixed_float16"):
        model = planted("dense", 1e-8)
    x = planted_inputs("dense")
    g = gp.gradients(model, x, 1, ["h0.kernel", "h1"], per_example=True)
    assert_float32_result(g)
    assert arr(g["h0.kernel"]).shape == (4, 8, 16)
    for i in range(len(x)):
        want = hand_gradients(model, x[i:i + 1], 1, 2.0 ** 15)
        assert_close(arr(g["h0.kernel"])[i], want["h0.kernel"], "float16", F16,
                     what=f"example {i}")
    assert_close(arr(g["h1"]), hand_gradients(model, x, 1, 2.0 ** 15)["h1"], "float16", F16)


@functional_only
def test_pure_function_forms_refuse_float16_models():
    """gp.functional (and gp.hvp, gp.jacobian, gp.gradient_penalty built on it) has no
    loss scaling: refused, also after gp.gradients made the same request."""
    with policy("mixed_float16"):
        model = keras.Sequential([keras.Input((3,)), layers.Dense(2, name="d")])
    x = np.ones((2, 3), "float32")
    assert dtype_of(gp.gradients(model, x, 0, "d")["d"]) == "float32"
    with pytest.raises(gp.GradprobeError, match=f"gp.functional does not support float16.*"
                                                f"{BACKEND} backend"):
        gp.functional(model, x, 0, "d")
    with pytest.raises(gp.GradprobeError, match="gp.hvp does not support float16"):
        gp.hvp(model, x, 0, "d.kernel", np.ones((3, 2), "float32"))
