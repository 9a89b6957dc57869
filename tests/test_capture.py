"""The capture engine: a cache that never keeps models alive, errors that keep
their cause, shared-layer and control-flow captures, aliases, one trace per
request, and mixed precision."""

from __future__ import annotations

import gc
import warnings
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp
from catalog import Looped
from gradprobe.core import cache, engine
from gradprobe.errors import GradprobeError
from tolerance import assert_close


# ------------------------------------------------------------------ the cache
class HoldingLoss(keras.losses.Loss):
    """A loss object that keeps a reference to its model."""

    def __init__(self, model):
        super().__init__(reduction="sum_over_batch_size")
        self.model = model

    def call(self, y_true, y_pred):
        return keras.losses.mean_squared_error(y_true, y_pred)


class _Net(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.a = layers.Dense(4, activation="tanh", name="a")
        self.b = layers.Dense(3, name="b")

    def call(self, x):
        return self.b(self.a(x))

    def score(self, y):
        return tf.reduce_sum(y[:, 0]) + 0.0 * tf.reduce_sum(self.b.kernel)


def _targets(model, y):
    yield "lambda", lambda o: tf.reduce_sum(o[:, 0]) + 0.0 * len(model.layers)
    yield "bound method", model.score
    yield "loss object", gp.loss(HoldingLoss(model), y)


def _use_models(count):
    """Runs requests on `count` fresh models; returns weak references to them.

    (A function of its own: a library that reads its caller's frame locals leaves
    a snapshot of them on that frame until it returns.)"""
    x = np.ones((2, 5), "float32")
    y = np.zeros((2, 3), "float32")
    refs = {}
    for i in range(count):
        model = _Net(name=f"net{i}")
        model(x)
        kind, target = list(_targets(model, y))[i % 3]
        for compile in ("auto", False):
            g = gp.gradients(model, x, target, ["a", "b.kernel"], compile=compile)
            assert g["b.kernel"].shape == (4, 3)
        if i % 3 == 0:
            gp.saliency(model, x, target)
        refs.setdefault(kind, []).append(weakref.ref(model))
    return refs


def test_cache_never_keeps_models_alive_whatever_the_target_references():
    refs = _use_models(24)
    gc.collect()
    alive = {kind: sum(r() is not None for r in rs) for kind, rs in refs.items()}
    assert alive == {"lambda": 0, "bound method": 0, "loss object": 0}


def test_cache_hits_for_the_same_function_and_never_for_a_dead_one():
    keras.utils.set_random_seed(0)
    model = _Net()
    x = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    model(x)
    engine.clear_cache()

    def first(o):
        return tf.reduce_sum(o[:, 0])

    with warnings.catch_warnings():
        # The model is named "__net" (Keras' name for `_Net`): it must still compile.
        warnings.simplefilter("error", RuntimeWarning)
        g1 = gp.gradients(model, x, first, "a")
        assert gp.gradients(model, x, first, "a") is not None
    (entry,) = cache.entries_by_model[model].values()
    assert entry.fn.experimental_get_tracing_count() == 1  # the second call hit the cache
    del first, entry
    gc.collect()
    # A new function (possibly at the same address) is a new request.
    g2 = gp.gradients(model, x, lambda o: tf.reduce_sum(o[:, 1]), "a")
    with tf.GradientTape() as tape:
        h = model.a(x)
        tape.watch(h)
        out = model.b(h)
        obj = tf.reduce_sum(out[:, 1])
    assert_close(g2["a"], tape.gradient(obj, h), "float32")
    assert not np.allclose(g1["a"], g2["a"])


# ------------------------------------------------------- errors keep their cause
class Faulty(layers.Layer):
    """Raises once armed (so that a functional model can be built with it)."""

    def __init__(self, armed=True, **kw):
        super().__init__(**kw)
        self.armed = armed

    def call(self, x):
        if self.armed:
            raise ValueError("custom layer refuses five features")
        return x


def test_an_error_raised_by_the_models_own_call_names_the_layer_and_keeps_the_cause():
    inp = keras.Input((5,))
    h = layers.Dense(5, name="d")(inp)
    faulty = Faulty(armed=False, name="picky")
    model = keras.Model(inp, layers.Dense(3, name="e")(faulty(h)))
    faulty.armed = True
    x = np.ones((2, 5), "float32")
    for compile in ("auto", False):
        with pytest.raises(GradprobeError) as info:
            gp.gradients(model, x, 0, "d", compile=compile)
        text = str(info.value)
        assert "'picky' (Faulty) raised ValueError: custom layer refuses five features" in text
        assert "expects" not in text  # the shapes agree: no misleading shape advice
        assert isinstance(info.value.__cause__, ValueError)
        assert "five features" in str(info.value.__cause__)


def test_an_unbuilt_model_whose_call_raises_keeps_the_cause():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.inner = Faulty(name="inner_picky")

        def call(self, x):
            return self.inner(x)

    with pytest.raises(GradprobeError, match=r"'inner_picky' \(Faulty\) raised ValueError: "
                                             r"custom layer refuses") as info:
        gp.gradients(Net(), np.ones((2, 5), "float32"), 0, "inner_picky")
    assert "expects" not in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


def test_a_real_shape_disagreement_names_the_expected_shape():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3, name="d")])
    with pytest.raises(GradprobeError, match=r"Input has shape \(2, 6\); the model expects "
                                             r"input shape \(None, 4\)") as info:
        gp.gradients(model, np.ones((2, 6), "float32"), 0, "d", compile=False)
    assert info.value.__cause__ is not None


# ------------------------------------------------------------ keys and traces
def _nested():
    keras.utils.set_random_seed(1)
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(5, activation="tanh", name="d1")],
                             name="inner")
    inp = keras.Input((4,))
    return keras.Model(inp, layers.Dense(2, name="out")(inner(inp)))


def test_two_selectors_of_one_source_are_both_keys():
    model = _nested()
    x = np.random.default_rng(5).normal(size=(3, 4)).astype("float32")
    for compile in ("auto", False):
        g = gp.gradients(model, x, 1, ["inner/d1", "d1", "inner/d1.kernel", "d1.kernel",
                                        "inputs", "inputs:0"], compile=compile)
        assert list(g) == ["inputs", "inner/d1", "inner/d1.kernel"]
        np.testing.assert_array_equal(g["d1"], g["inner/d1"])
        np.testing.assert_array_equal(g["d1.kernel"], g["inner/d1.kernel"])
        np.testing.assert_array_equal(g["inputs:0"], g["inputs"])
    with tf.GradientTape() as tape:
        h = model.get_layer("inner").get_layer("d1")(x)
        tape.watch(h)
        obj = tf.reduce_sum(model.get_layer("out")(h)[:, 1])
    assert_close(g["d1"], tape.gradient(obj, h), "float32")


def test_distinct_requests_traced_once_each_do_not_log_retracing(caplog):
    model = _nested()
    x = np.random.default_rng(6).normal(size=(3, 4)).astype("float32")
    requests = [(0, "d1"), (1, "d1"), (0, "out"), (1, "inputs"), (0, "d1.kernel"),
                (1, "*"), (0, "out.kernel"), (1, "out.bias")]
    with caplog.at_level("WARNING", logger="tensorflow"):
        for target, wrt in requests:
            gp.gradients(model, x, target, wrt)
            gp.gradients(model, x, target, wrt)  # cached: no new trace
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
    counts = [e.fn.experimental_get_tracing_count() for e in cache.entries_by_model[model].values()]
    assert counts == [1] * 7  # the class is an argument: (0, "d1") and (1, "d1") share one


# ------------------------------------------- shared layers and control flow
def _shared_model():
    keras.utils.set_random_seed(7)
    inp = keras.Input((4,))
    shared = layers.Dense(4, activation="tanh", name="shared")
    h = shared(shared(layers.Dense(4, name="pre")(inp)))
    return keras.Model(inp, layers.Dense(3, name="out")(h))


@pytest.mark.parametrize("call", [0, 1])
def test_gradients_at_replaces_only_the_chosen_call_of_a_shared_layer(call):
    model = _shared_model()
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 4)).astype("float32")
    v = rng.normal(size=(2, 4)).astype("float32")
    g = engine.gradients_at(model, x, 2, f"shared@{call}", v)
    shared, out = model.get_layer("shared"), model.get_layer("out")
    with tf.GradientTape() as tape:
        a = tf.constant(v)
        tape.watch(a)
        h = shared(a) if call == 0 else a  # call 0 replaced: call 1 still runs on it
        obj = tf.reduce_sum(out(h)[:, 2])
    assert_close(g[f"shared@{call}"], tape.gradient(obj, a), "float32")


def test_layer_integrated_gradients_on_one_call_of_a_shared_layer():
    model = _shared_model()
    x = np.random.default_rng(9).normal(size=(3, 4)).astype("float32")
    ig = gp.integrated_gradients(model, x, 1, layer="shared@0", steps=64)
    shared, out = model.get_layer("shared"), model.get_layer("out")
    a_x = shared(model.get_layer("pre")(x))
    a_b = shared(model.get_layer("pre")(tf.zeros_like(x)))
    np.testing.assert_allclose(np.asarray(ig), _riemann_ig(lambda a: out(shared(a))[:, 1],
                                                           a_x, a_b, 64), rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(ig.delta)).max() < 1e-3
    with pytest.raises(GradprobeError, match="shared@0"):
        gp.integrated_gradients(model, x, 1, layer="shared", steps=4)


def _riemann_ig(f, a_x, a_b, steps):
    """Layer IG by hand: trapezoid rule over `steps` points, as gradprobe's default."""
    from gradprobe.attribution.integrated_gradients import integration_points

    alphas, weights = integration_points(steps, "riemann_trapezoid")
    total = tf.zeros_like(a_x)
    for alpha, w in zip(alphas, weights):
        with tf.GradientTape() as tape:
            a = a_b + float(alpha) * (a_x - a_b)
            tape.watch(a)
            obj = tf.reduce_sum(f(a))
        total += float(w) * tape.gradient(obj, a)
    return ((a_x - a_b) * total).numpy()



def test_layers_called_inside_backend_control_flow_fail_and_skip_alike():
    keras.utils.set_random_seed(10)
    model = Looped()
    x = np.random.default_rng(11).normal(size=(2, 4)).astype("float32")
    model(x)
    messages, skipped = set(), []
    for compile in ("auto", False):
        with pytest.raises(GradprobeError, match=r"'step'.*inside backend control flow "
                                                 r"\(while_loop\)") as info:
            gp.gradients(model, x, 0, "step", compile=compile)
        messages.add(str(info.value))
        g = gp.gradients(model, x, 0, "*", compile=compile)
        assert list(g) == ["pre", "out"]
        skipped.append(g.skipped)
        with tf.GradientTape() as tape:
            h = model.pre(x)
            tape.watch(h)
            obj = tf.reduce_sum(model(x)[:, 0] * 0.0) + tf.reduce_sum(
                model.out(keras.ops.fori_loop(0, 3, lambda i, h: model.step(h), h))[:, 0])
        assert_close(g["pre"], tape.gradient(obj, h), "float32")
        gw = gp.gradients(model, x, 0, "step.kernel", compile=compile)  # weights still work
        with tf.GradientTape() as tape:
            obj = tf.reduce_sum(model(x)[:, 0])
        assert_close(gw["step.kernel"], tape.gradient(obj, model.step.kernel), "float32")
    assert len(messages) == 1  # the same error compiled and eager
    assert skipped[0] == skipped[1] and any(s.startswith("step: ") for s in skipped[0])


def test_requests_differing_only_in_batch_size_share_a_trace():
    model = _nested()
    rng = np.random.default_rng(14)
    engine.clear_cache()

    def first(y):
        return y[:, 0]

    for n in (2, 3, 5, 8, 13):
        x = rng.normal(size=(n, 4)).astype("float32")
        for target in (1, [i % 2 for i in range(n)], first):
            g = gp.gradients(model, x, target, ["d1", "out.kernel"])
            want = gp.gradients(model, x, target, ["d1", "out.kernel"], compile=False)
            for key in g:
                assert_close(g[key], want[key], "float32")
    counts = sorted(e.fn.experimental_get_tracing_count() for e in cache.entries_by_model[model].values())
    assert counts == [2, 2]  # class targets share an entry; the lambda has its own


def _traces(model):
    return sorted(e.fn.experimental_get_tracing_count() for e in cache.entries_by_model[model].values())


def test_loss_labels_of_every_batch_size_share_a_trace():
    model = _nested()
    rng = np.random.default_rng(15)
    engine.clear_cache()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    out = model.get_layer("out")
    for n in (2, 3, 5, 8, 13, 4):
        x = rng.normal(size=(n, 4)).astype("float32")
        y = rng.integers(0, 2, n)
        g = gp.gradients(model, x, gp.loss(loss_fn, y), ["inputs", "out.kernel"])
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            obj = loss_fn(y, model(xt))
        want = tape.gradient(obj, [xt, out.kernel])
        assert_close(g["inputs"], want[0], "float32")
        assert_close(g["out.kernel"], want[1], "float32")
    assert _traces(model) == [2]  # the first shape, then one with the batch axis relaxed


def test_per_example_class_targets_of_every_batch_size_share_a_trace():
    model = _nested()
    rng = np.random.default_rng(16)
    engine.clear_cache()
    d1 = model.get_layer("inner").get_layer("d1")
    for n in (2, 3, 5, 8, 13, 4):
        x = rng.normal(size=(n, 4)).astype("float32")
        classes = rng.integers(0, 2, n)
        g = gp.gradients(model, x, classes, "d1.kernel", per_example=True)
        assert g["d1.kernel"].shape == (n, 4, 5)
        for i in (0, n - 1):  # hand-written single-example tapes
            with tf.GradientTape() as tape:
                obj = model(x[i:i + 1])[0, classes[i]]
            want = tape.gradient(obj, d1.kernel)
            assert_close(g["d1.kernel"][i], want, "float32")
    assert _traces(model) == [2]


def test_meta_is_decoded_once_per_trace_not_per_call(monkeypatch):
    """Keys, order and aliases are known when the trace runs: repeated calls
    reuse them without fetching and decoding the shipped JSON."""
    from gradprobe.backends import tensorflow as backend

    model = _nested()
    engine.clear_cache()
    x = np.random.default_rng(17).normal(size=(3, 4)).astype("float32")
    first = gp.gradients(model, x, 1, ["d1", "inner/d1", "out.kernel"])
    decoded = []
    original = backend.decode_string
    monkeypatch.setattr(backend, "decode_string", lambda t: decoded.append(1) or original(t))
    for n in (3, 5, 7):
        g = gp.gradients(model, np.resize(x, (n, 4)), 1, ["d1", "inner/d1", "out.kernel"])
        assert list(g) == list(first) == ["inner/d1", "out.kernel"]
        np.testing.assert_array_equal(g["d1"], g["inner/d1"])
    assert decoded == []
