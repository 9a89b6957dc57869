"""gp.gradients on the JAX backend of Keras 3: what only JAX has (the jit cache,
lax loops, differentiating through gp.gradients under the caller's jax.grad,
tracing errors, float64 finite differences through stateless_call). The tests
that are the same on JAX and PyTorch are in test_common_gradients.py.

Run with `KERAS_BACKEND=jax python -m pytest tests/backends`. Under any other
backend the module is skipped before `jax` is imported.

Oracles: hand-written JAX code (`jax.grad` of the rest of the model with
respect to an intermediate value, or of `stateless_call` with respect to a
weight or the input) and float64 central finite differences.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("JAX backend tests: run with KERAS_BACKEND=jax", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from backend_helpers import close, oracle, tanh_mlp  # noqa: E402
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402
from gradprobe.core import _patch  # noqa: E402
from gradprobe.core.capture import functional as _functional  # noqa: E402

B = oracle()  # the hand-written jax.grad helpers shared with test_common_*.py


# ------------------------------------------------------- finite differences
def test_finite_differences_float64(x64):
    # (Not tanh: keras.ops.tanh computes in float32 on JAX, 3.5e-8 off in float64,
    # which central differences at eps=1e-6 would magnify to 1e-2.)
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), layers.Dense(5, activation="sigmoid", name="a"),
                              layers.Dense(3, activation="sigmoid", name="b")])
    x = np.random.default_rng(1).normal(size=(2, 4))
    g = gp.gradients(model, x, 1, ["inputs", "a.kernel", "a"])
    assert np.asarray(g["inputs"]).dtype == np.float64
    eps = 1e-6
    tv, ntv = B.values(model)

    def f(x_, kernel):
        vals = [kernel, *tv[1:]]
        return float(np.sum(np.asarray(model.stateless_call(vals, ntv, x_)[0])[:, 1]))

    fd = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        fd[i] = (f(x + d, tv[0]) - f(x - d, tv[0])) / (2 * eps)
    close(g["inputs"], fd, 1e-7, "inputs")
    k = np.asarray(tv[0])
    fdk = np.zeros_like(k)
    for i in np.ndindex(k.shape):
        d = np.zeros_like(k)
        d[i] = eps
        fdk[i] = (f(x, k + d) - f(x, k - d)) / (2 * eps)
    close(g["a.kernel"], fdk, 1e-7, "a.kernel")
    a = np.asarray(model.get_layer("a")(x))

    def rest(act):
        return float(np.sum(np.asarray(model.get_layer("b")(act))[:, 1]))

    fda = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        d = np.zeros_like(a)
        d[i] = eps
        fda[i] = (rest(a + d) - rest(a - d)) / (2 * eps)
    close(g["a"], fda, 1e-7, "a")


# --------------------------------------------------------------------- targets
def test_target_errors_are_gradprobe_errors():
    model = tanh_mlp()
    x = np.ones((2, 5), "float32")
    with pytest.raises(gp.GradprobeError, match="target"):
        gp.gradients(model, x, 7, "h")  # out of range: 4 classes
    with pytest.raises(gp.GradprobeError, match="callable"):
        gp.gradients(model, x, lambda o: o, "h")  # not scalar / per example
    with pytest.raises(gp.GradprobeError, match="gp.at"):
        gp.gradients(model, x, gp.at(0, 1), "h")


# ----------------------------------------------------------------- unconnected
class TwoCarries(keras.layers.Layer):
    """A loop whose weight `w` reaches the output only through another carry, one
    step later: a dependency that no single loop step shows."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones", name="w")

    def call(self, x):
        def body(i, carry):
            a, b = carry
            return b * 1.5, x * self.w
        a, _ = keras.ops.fori_loop(0, 3, body, (keras.ops.zeros_like(x), keras.ops.zeros_like(x)))
        return a


def test_a_weight_reaching_the_output_through_a_loop_carry_is_connected():
    inp = keras.Input((3,))
    model = keras.Model(inp, layers.Dense(2, name="out")(TwoCarries(name="loop")(inp)))
    x = np.random.default_rng(14).normal(size=(2, 3)).astype("float32")
    g = gp.gradients(model, x, 0, "loop.w")
    assert g.unconnected == ()
    w = model.get_layer("loop").w
    close(g["loop.w"], B.weight_grad(model, w, x, lambda y: jnp.sum(y[:, 0])))
    assert np.any(np.asarray(g["loop.w"]))


# -------------------------------------------------------------- options, cache
def test_compile_true_false_auto_agree_and_jit_cache_hits():
    model = tanh_mlp("cached")
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 5)).astype("float32")
    wrt = ["h", "out.kernel", "inputs"]
    eager = gp.gradients(model, x, [0, 1, 2], wrt, compile=False)
    start = _functional.trace_count()
    jitted = gp.gradients(model, x, [0, 1, 2], wrt, compile=True)
    assert _functional.trace_count() == start + 1
    for k in wrt:
        close(jitted[k], eager[k], 1e-6, k)
    auto = gp.gradients(model, x + 1.0, [2, 1, 0], wrt)  # new values: same trace
    assert _functional.trace_count() == start + 1
    ref = gp.gradients(model, x + 1.0, [2, 1, 0], wrt, compile=False)
    for k in wrt:
        close(auto[k], ref[k], 1e-6, k)
    gp.gradients(model, rng.normal(size=(5, 5)).astype("float32"), 0, wrt)
    assert _functional.trace_count() == start + 2  # a new batch size: one more trace
    gp.gradients(model, rng.normal(size=(5, 5)).astype("float32"), 1, wrt)
    assert _functional.trace_count() == start + 2
    model.get_layer("out").kernel.assign(np.zeros((6, 4), "float32"))  # weights are arguments
    z = gp.gradients(model, x, 0, ["h"])
    assert not np.any(np.asarray(z["h"]))


def test_differentiable_false():
    model = tanh_mlp()
    x = np.ones((2, 5), "float32")
    g = gp.gradients(model, x, 0, "h", differentiable=False)
    close(g["h"], gp.gradients(model, x, 0, "h")["h"], 0.0)


def test_differentiable_under_the_callers_jax_grad():
    """Second order: the caller's jax.grad through gp.gradients (an input-gradient
    penalty), against jax.grad of hand-written jax.grad."""
    model = keras.Sequential([keras.Input((5,)), layers.Dense(4, activation="sigmoid", name="d1"),
                              layers.Dense(3, name="d2")])
    x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 5)).astype("float32"))
    tv, ntv = B.values(model)

    def penalty(xx):
        return jnp.sum(gp.gradients(model, xx, 1, "inputs")["inputs"] ** 2)

    def hand(xx):
        gi = jax.grad(lambda z: jnp.sum(model.stateless_call(tv, ntv, z)[0][:, 1]))(xx)
        return jnp.sum(gi ** 2)

    close(jax.grad(penalty)(x), jax.grad(hand)(x), 1e-5)
    frozen = jax.grad(lambda xx: jnp.sum(gp.gradients(model, xx, 1, "inputs",
                                                      differentiable=False)["inputs"] ** 2))(x)
    assert not np.any(np.asarray(frozen))


def test_other_functions_refuse_jax_with_a_clear_error():
    model = tanh_mlp()
    for call, name, points_to in [(lambda: gp.Tape(model), "gp.Tape", "gp.functional")]:
        with pytest.raises(gp.GradprobeError) as info:
            call()
        text = str(info.value)
        assert name in text and "'jax'" in text and points_to in text, text
    assert _patch.active_wrappers() == 0


def test_stats_summary_and_diagnose_work():
    model = tanh_mlp()
    g = gp.gradients(model, np.ones((2, 5), "float32"), 0, "*")
    stats = g.stats()
    assert set(stats) == set(g)
    close(stats["h"]["norm"], np.linalg.norm(np.asarray(g["h"])), 1e-5)
    assert isinstance(g.diagnose(), list)


def test_input_errors_are_gradprobe_errors():
    model = tanh_mlp()
    with pytest.raises(gp.GradprobeError):
        gp.gradients(model, np.ones((2, 7), "float32"), 0, "h")
    with pytest.raises(gp.GradprobeError, match="nope"):
        gp.gradients(model, np.ones((2, 5), "float32"), 0, "nope")
    assert _patch.active_wrappers() == 0


def test_cache_does_not_keep_models_alive():
    import gc
    import weakref

    model = tanh_mlp("short_lived")
    gp.gradients(model, np.ones((2, 5), "float32"), 0, ["h", "h.kernel", "inputs"])
    gp.gradients(model, np.ones((2, 5), "float32"), 0, "h", compile=False)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_output_layer_aliases_and_objects():
    model = tanh_mlp()
    x = np.random.default_rng(12).normal(size=(3, 5)).astype("float32")
    g = gp.gradients(model, x, lambda a: keras.ops.sum(a[:, 0]), "inputs", output="h")
    close(g["inputs"], jax.grad(lambda v: jnp.sum(model.get_layer("h")(v)[:, 0]))(
        jnp.asarray(x)))
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(4, name="d1")], name="inner")
    inp = keras.Input((4,))
    outer = keras.Model(inp, layers.Dense(2, name="o")(inner(inp)))
    g = gp.gradients(outer, np.ones((2, 4), "float32"), 0, ["inner/d1", "d1"])
    assert list(g) == ["inner/d1"]
    np.testing.assert_array_equal(g["d1"], g["inner/d1"])  # the second selector: an alias
    o = outer.get_layer("o")
    g = gp.gradients(outer, np.ones((2, 4), "float32"), 0, [o, o.kernel])
    assert list(g) == ["o", "o.kernel"]


def test_threads_get_their_own_results():
    import threading

    model = tanh_mlp("threads")
    rng = np.random.default_rng(13)
    xs = [rng.normal(size=(3, 5)).astype("float32") for _ in range(4)]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                results[i] = np.asarray(gp.gradients(model, xs[i], i, ["h", "out.kernel"])["h"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        h = model.get_layer("h")(xs[i])
        close(results[i], jax.grad(lambda v, i=i: jnp.sum(model.get_layer("out")(v)[:, i]))(h))
    assert _patch.active_wrappers() == 0
    assert not any("call" in vars(layer) for layer in model.layers)


class Branchy(keras.Model):
    """A Python branch on a tensor's value: runs eagerly, cannot be traced."""

    def __init__(self):
        super().__init__()
        self.d = layers.Dense(2, name="d")

    def call(self, x):
        if float(keras.ops.convert_to_numpy(keras.ops.sum(x))) > 0:
            return self.d(x)
        return self.d(-x)


@pytest.mark.parametrize("compile", ["auto", False])
def test_untraceable_model_gets_a_clear_error(compile):
    model = Branchy()
    x = np.ones((2, 3), "float32")
    model(x)
    with pytest.raises(gp.GradprobeError, match=r"cannot be traced by jax.*keras.ops.cond"):
        gp.gradients(model, x, 0, "d", compile=compile)
    assert _patch.active_wrappers() == 0
