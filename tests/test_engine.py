"""Targets, output selection, compilation, the result object and diagnosis."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import layers

import gradprobe as gp
from gradprobe.core import cache, engine
from oracle import assert_close
from tolerance import F32


def _mlp(seed=0, width=6, classes=4, name=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), layers.Dense(width, activation="tanh", name="h"),
                             layers.Dense(classes, name="logits")], name=name)


def _tape(model, x, target_fn, sources):
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as t:
        t.watch(xt)
        y = model(xt)
        obj = tf.reduce_sum(target_fn(y))
    return [t.gradient(obj, xt if isinstance(s, str) else s.value) for s in sources]


@pytest.fixture
def mlp_x():
    return _mlp(), np.random.default_rng(3).normal(size=(6, 5)).astype("float32")


# ----------------------------------------------------------------------- targets
def test_target_forms_match_tape(mlp_x):
    model, x = mlp_x
    y = model(x).numpy()
    labels = np.array([0, 1, 2, 3, 0, 1])
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    cases = {
        2: lambda o: o[:, 2],
        tuple(labels): lambda o: tf.gather(o, labels, axis=1, batch_dims=1),
        "predicted": lambda o: tf.gather(o, y.argmax(-1), axis=1, batch_dims=1),
    }
    for target, fn in cases.items():
        t = list(target) if isinstance(target, tuple) else target
        g = gp.gradients(model, x, t, ["inputs", "h.kernel"])
        exp = _tape(model, x, fn, ["inputs", model.get_layer("h").kernel])
        assert_close(g["inputs"], exp[0], F32, str(target))
        assert_close(g["h.kernel"], exp[1], F32, str(target))
        assert g.target.shape == (6,)
        assert_close(g.target, fn(tf.constant(y)), F32)

    g = gp.gradients(model, x, gp.loss(ce, labels), "h.kernel")
    exp = _tape(model, x, lambda o: ce(labels, o), [model.get_layer("h").kernel])
    assert g.target.shape == () and np.isclose(g.target, ce(labels, y))
    assert_close(g["h.kernel"], exp[0], F32, "loss object")

    w = np.linspace(0.5, 1.5, 6).astype("float32")
    g = gp.gradients(model, x, gp.loss(keras.losses.sparse_categorical_crossentropy, labels, w),
                     "h.kernel")
    per = keras.losses.sparse_categorical_crossentropy(labels, y) * w
    assert_close(g.target, per, F32, "per-example loss")
    exp = _tape(model, x, lambda o: keras.losses.sparse_categorical_crossentropy(labels, o) * w,
                [model.get_layer("h").kernel])
    assert_close(g["h.kernel"], exp[0], F32, "loss function")

    g = gp.gradients(model, x, gp.loss("mse", np.zeros((6, 4), "float32")), "h")
    assert g.target.shape == (6,)
    g = gp.gradients(model, x, lambda o: tf.reduce_max(o), "h")
    assert g.target.shape == ()


def test_per_example_gradients_are_independent(mlp_x):
    model, x = mlp_x
    g_all = gp.gradients(model, x, [1, 0, 3, 2, 1, 0], ["inputs", "h"])
    h_layer, logits = model.get_layer("h"), model.get_layer("logits")
    for i, cls in enumerate([1, 0, 3, 2, 1, 0]):
        # hand-written tape on example i alone, for its own class
        xi = tf.constant(x[i:i + 1])
        with tf.GradientTape(persistent=True) as t:
            t.watch(xi)
            h = h_layer(xi)
            t.watch(h)
            score = logits(h)[:, cls]
        assert_close(g_all["inputs"][i:i + 1], t.gradient(score, xi), F32)
        assert_close(g_all["h"][i:i + 1], t.gradient(score, h), F32)


def test_output_can_name_an_intermediate_layer(mlp_x):
    model, x = mlp_x
    g = gp.gradients(model, x, lambda a: tf.reduce_sum(a), ["h", "inputs"], output="h")
    assert np.allclose(g["h"], 1.0)
    with tf.GradientTape() as t:
        xt = tf.constant(x)
        t.watch(xt)
        s = tf.reduce_sum(model.get_layer("h")(xt))
    assert_close(g["inputs"], t.gradient(s, xt), F32)


def test_multi_input_dict_and_outputs_by_index():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = layers.Concatenate(name="cat")([layers.Dense(4, name="da")(a), layers.Dense(4, name="db")(b)])
    model = keras.Model({"a": a, "b": b}, [layers.Dense(2, name="o1")(h), layers.Dense(3, name="o2")(h)])
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(4, 3)).astype("float32"), "b": rng.normal(size=(4, 2)).astype("float32")}
    g = gp.gradients(model, x, 2, ["inputs", "cat"], output=1)
    assert set(g) == {"inputs:a", "inputs:b", "cat"}
    xt = {k: tf.constant(v) for k, v in x.items()}
    with tf.GradientTape() as t:
        t.watch(xt)
        s = tf.reduce_sum(model(xt)[1][:, 2])
    exp = t.gradient(s, xt)
    assert_close(g["inputs:a"], exp["a"], F32)
    assert_close(g["inputs:b"], exp["b"], F32)
    g2 = gp.gradients(model, x, 2, "inputs:b", output="o2")
    assert list(g2) == ["inputs:b"] and np.allclose(g2["inputs:b"], g["inputs:b"])


# ------------------------------------------------------------------- compilation
def test_compiled_eager_and_inline_agree(mlp_x):
    model, x = mlp_x
    wrt = ["inputs", "h", "logits", "h.weights"]
    results = [gp.gradients(model, x, "predicted", wrt, compile=c).numpy()
               for c in ("auto", True, False)]

    @tf.function
    def inside(xx):
        return dict(gp.gradients(model, xx, "predicted", wrt))

    results.append({k: v.numpy() for k, v in inside(tf.constant(x)).items()})
    for r in results[1:]:
        assert r.keys() == results[0].keys()
        for k in r:
            assert_close(r[k], results[0][k], F32, k)


def test_same_shapes_do_not_retrace():
    model = _mlp(name="retrace_probe")
    x = np.ones((4, 5), "float32")
    for i in range(4):
        gp.gradients(model, x + i, i % 4, ["h", "h.kernel"])
    fns = [e.fn for e in cache.entries_by_model[model].values()]
    assert len(fns) == 1
    assert fns[0].experimental_get_tracing_count() == 1
    gp.gradients(model, np.ones((7, 5), "float32"), 0, ["h", "h.kernel"])
    assert fns[0].experimental_get_tracing_count() == 2


def test_untraceable_model_falls_back_to_eager():
    class NumpyInside(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = layers.Dense(2, name="dense")

        def call(self, x):
            scale = float(np.asarray(x).mean()) * 0 + 1.0  # needs an eager tensor
            return self.d(x) * scale

    model = NumpyInside()
    x = np.ones((2, 3), "float32")
    model(x)
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        g = gp.gradients(model, x, 0, "dense")
    assert g["dense"].shape == (2, 2)
    g = gp.gradients(model, x, 0, "dense")  # remembered: no second warning needed
    assert np.allclose(g["dense"][:, 0], 1.0)


def test_differentiable_under_outer_tape(mlp_x):
    model, x = mlp_x
    kernel = model.get_layer("logits").kernel
    xt = tf.constant(x)
    with tf.GradientTape() as outer:
        g = gp.gradients(model, xt, 0, "h")
        penalty = tf.reduce_sum(g["h"] ** 2)
    d = outer.gradient(penalty, kernel.value)
    # d/dW of sum_i (W[:, 0])^2 summed over the batch: 2 * N * W[:, 0] in column 0.
    exp = np.zeros(kernel.shape)
    exp[:, 0] = 2 * x.shape[0] * kernel.numpy()[:, 0]
    assert_close(d, exp, F32)
    with tf.GradientTape() as outer:
        g = gp.gradients(model, xt, 0, "h", differentiable=False)
        penalty = tf.reduce_sum(g["h"] ** 2)
    assert outer.gradient(penalty, kernel.value) is None


# ----------------------------------------------------------------------- result
def test_result_views(mlp_x):
    model, x = mlp_x
    g = gp.gradients(model, x, 1, ["h.kernel", "h", "inputs"])
    assert list(g) == ["inputs", "h", "h.kernel"]  # forward order
    assert dict(g.kinds) == {"inputs": "input", "h": "activation", "h.kernel": "weight"}
    assert set(g.activations) == {"inputs", "h"}
    assert_close(g.activations["h"], model.get_layer("h")(tf.constant(x)), F32)
    assert_close(g.outputs, model(x), F32)
    arrays = g.numpy()
    assert list(arrays) == list(g)
    for k, a in arrays.items():
        assert a.dtype == np.float32 and np.array_equal(a, g[k].numpy())
    stats = g.stats()
    for k, a in arrays.items():
        s = stats[k]
        assert s["shape"] == a.shape
        assert np.isclose(s["norm"], np.linalg.norm(a.ravel()))
        assert np.isclose(s["mean_abs"], np.abs(a).mean())
        assert np.isclose(s["max_abs"], np.abs(a).max())
        assert np.isclose(s["std"], a.std(), rtol=1e-5)
        assert s["zero_fraction"] == np.mean(a == 0) and s["nonfinite"] == 0
    with pytest.raises(TypeError):
        g["x"] = 1
    lines = []
    g.summary(print_fn=lines.append)
    text = "\n".join(lines)
    for key in g:
        assert key in text
    assert "weight" in text and "norm" in text
    assert "Gradients(" in repr(g)


class Reversed(keras.Model):
    """Layers created in the reverse of the order they are called in."""

    def __init__(self):
        super().__init__()
        self.c = layers.Dense(2, name="c")
        self.b = layers.Dense(3, activation="tanh", name="b")
        self.a = layers.Dense(4, activation="tanh", name="a")

    def call(self, x):
        return self.c(self.b(self.a(x)))


def test_keys_follow_the_forward_pass_not_definition_or_request_order():
    keras.utils.set_random_seed(0)
    model = Reversed()
    x = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    model(x)
    assert [la.name for la in model.layers] == ["c", "b", "a"]  # definition order
    g = gp.gradients(model, x, 0, ["c.kernel", "b", "inputs", "a.kernel", "c", "a", "b.bias"])
    assert list(g) == ["inputs", "a", "a.kernel", "b", "b.bias", "c", "c.kernel"]
    assert list(gp.gradients(model, x, 0, "*")) == ["a", "b", "c"]


def _chain(scale_layer=None, scale=1.0, depth=6, seed=0, activation="tanh"):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8,))] + [layers.Dense(8, activation=activation,
                                                                 name=f"d{i}")
                                                    for i in range(depth)]
                             + [layers.Dense(3, name="out")])
    if scale_layer is not None:
        k = model.get_layer(scale_layer).kernel
        k.assign(k * scale)
    return model


def test_diagnose_vanishing_and_exploding():
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    healthy = gp.gradients(_chain(), x, 0, "d*")
    assert healthy.diagnose() == []
    g = gp.gradients(_chain("d3", 1e-5), x, 0, "d*")
    kinds = {(f.kind, f.key) for f in g.diagnose()}
    assert {("vanishing", "d0"), ("vanishing", "d1"), ("vanishing", "d2")} <= kinds
    assert all(k not in ("d3", "d4", "d5") for _, k in kinds)
    g = gp.gradients(_chain("d3", 1e4, activation=None), x, 0, "d*")
    found = {(f.kind, f.key) for f in g.diagnose()}
    assert found == {("exploding", "d0"), ("exploding", "d1"), ("exploding", "d2")}, found


def test_diagnose_nonfinite_zero_and_dead():
    class SqrtRelu(layers.Layer):
        def call(self, x):
            return keras.ops.sqrt(keras.ops.relu(x))

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    inp = keras.Input((4,))
    h = layers.Dense(8, activation="relu", name="relu_dense")(inp)
    model = keras.Model(inp, layers.Dense(3, name="out")(layers.Dense(4, name="mid")(h)))
    bias = model.get_layer("relu_dense").bias
    b = bias.numpy()
    b[:3] = -100.0  # three units never activate
    bias.assign(b)
    g = gp.gradients(model, x, 0, ["relu_dense", "relu_dense.weights", "mid", "out",
                                   "out.kernel"])
    found = g.diagnose()
    # the kernel's zero columns carry the finding; biases are not checked for dead
    # units (a bias before BatchNormalization gets exact zeros with no dead unit)
    assert {(f.kind, f.key) for f in found} == {("dead", "relu_dense.kernel")}, found
    assert all("3 of 8" in f.message for f in found)

    inp = keras.Input((4,))
    s = SqrtRelu(name="sqrt")(layers.Dense(4, name="pre")(inp))
    model = keras.Model(inp, layers.Dense(3, name="out")(s))
    g = gp.gradients(model, x, 0, ["pre", "out"])
    found = {f.kind: f for f in g.diagnose()}
    assert "nonfinite" in found and found["nonfinite"].key == "pre"
    assert "out" not in {f.key for f in g.diagnose()}  # other classes' logits are not "dead"
    frozen = keras.Sequential([keras.Input((3,)), layers.Dense(2, name="a"),
                               layers.Dense(2, kernel_initializer="zeros", name="b")])
    g = gp.gradients(frozen, np.ones((2, 3), "float32"), 0, "a")
    assert [f.kind for f in g.diagnose()] == ["zero"]


# --------------------------------------------------------------------- property
@settings(max_examples=15, deadline=None)
@given(width=st.integers(1, 9), batch=st.integers(1, 5), classes=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_weight_and_input_gradients_match_tape(width, batch, classes, seed):
    model = _mlp(seed, width, classes)
    x = np.random.default_rng(seed).normal(size=(batch, 5)).astype("float32")
    k = seed % classes
    g = gp.gradients(model, x, k, ["inputs", "h.kernel", "logits.bias"])
    exp = _tape(model, x, lambda o: o[:, k],
                ["inputs", model.get_layer("h").kernel, model.get_layer("logits").bias])
    for key, e in zip(["inputs", "h.kernel", "logits.bias"], exp):
        assert_close(g[key], e, 1e-5, key)
    # Linearity in the target: the gradient of 3 * f is 3 times the gradient of f.
    g3 = gp.gradients(model, x, lambda o: 3.0 * o[:, k], ["h.kernel"])
    assert_close(g3["h.kernel"], 3.0 * g["h.kernel"].numpy(), 1e-5)


def test_cached_plan_follows_model_changes():
    model = keras.Sequential([keras.Input((5,)), layers.Dense(4, name="a")])
    x = np.ones((2, 5), "float32")
    assert list(gp.gradients(model, x, 0, "*")) == ["a"]
    model.add(layers.Dense(3, name="b"))
    assert list(gp.gradients(model, x, 0, "*")) == ["a", "b"]


def test_cached_plan_follows_a_layer_added_inside_a_nested_model():
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(4, name="a")], name="inner")
    model = keras.Sequential([keras.Input((5,)), layers.Dense(4, name="d"), inner])
    x = np.ones((2, 5), "float32")
    assert list(gp.gradients(model, x, 0, "*.kernel")) == ["d.kernel", "inner/a.kernel"]
    inner.add(layers.Dense(3, name="b"))
    g = gp.gradients(model, x, 0, "*.kernel")
    assert list(g) == ["d.kernel", "inner/a.kernel", "inner/b.kernel"]
    assert g.outputs.shape == (2, 3)


def test_a_class_target_made_eagerly_or_in_a_graph_is_never_mixed_up():
    # The target of one class is made once per (class, batch size) and reused, but
    # only when made eagerly: a graph's class tensor must not reach an eager call.
    model = _mlp(name="class_target_cache")
    x = tf.constant(np.ones((3, 5), "float32"))

    @tf.function
    def inside(xx):
        return gp.gradients(model, xx, 1, "h")["h"]

    eager = gp.gradients(model, x, 1, "h")["h"].numpy()
    assert_close(inside(x), eager, F32)
    assert_close(gp.gradients(model, x, 1, "h")["h"], eager, F32)
    assert_close(inside(x), eager, F32)
    other = gp.gradients(model, x, 2, "h")["h"].numpy()  # another class: another target
    assert not np.allclose(other, eager)
    from gradprobe.core import targets

    assert targets.make_target(1, 3) is targets.make_target(1, 3)
    assert targets.make_target(1, 3) is not targets.make_target(1, 4)


def test_small_constants_are_shared_only_when_made_eagerly():
    from gradprobe.backends import tensorflow as backend

    a = np.arange(6, dtype=np.int32)
    first = backend.constant(a)
    assert backend.constant(a.copy()) is first
    assert backend.constant(a.astype(np.int64)) is not first  # another dtype
    assert backend.constant(a.reshape(2, 3)) is not first  # another shape
    big = np.zeros(100_000, np.int32)
    assert backend.constant(big) is not backend.constant(big)  # large: never kept

    @tf.function
    def graph():
        t = backend.constant(a)
        assert not hasattr(t, "numpy")  # a graph tensor, not the cached eager one
        return t

    np.testing.assert_array_equal(graph(), a)


def test_a_repeated_request_skips_resolution_but_not_its_checks(monkeypatch):
    model = _mlp(name="repeats")
    x = tf.constant(np.ones((3, 5), "float32"))
    first = gp.gradients(model, x, 1, "h")
    made = []
    real_make_target = engine.make_target
    monkeypatch.setattr(engine, "make_target",
                        lambda *a, **k: made.append(a) or real_make_target(*a, **k))
    again = gp.gradients(model, x + 1.0, 1, "h")  # same kind of request: remembered
    assert made == []
    assert_close(again["h"], gp.gradients(model, (x + 1.0).numpy(), 1, "h")["h"], F32)
    assert len(made) == 1  # (a NumPy array always takes the full path)
    assert_close(first["h"], gp.gradients(model, x, 1, "h", compile=False)["h"], F32)
    gp.gradients(model, tf.ones((4, 5)), 1, "h")  # another shape: resolved again
    gp.gradients(model, x, 2, "h")  # another class
    assert len(made) == 4  # the array, compile=False, the shape, the class
    # An option that compares equal to a valid one but is not one is still refused.
    with pytest.raises(gp.GradprobeError, match="compile"):
        gp.gradients(model, x, 1, "h", compile=1)
    with pytest.raises(gp.GradprobeError, match="training"):
        gp.gradients(model, x, 1, "h", training=0)
    # What the run checks is still checked: a class out of range.
    with pytest.raises(gp.GradprobeError, match="class index"):
        gp.gradients(model, x, 9, "h")
    assert len(made) == 5
    with pytest.raises(gp.GradprobeError, match="class index"):
        gp.gradients(model, x, 9, "h")  # remembered, and refused again
    assert len(made) == 5
    engine.clear_cache()  # forgets the remembered requests too
    gp.gradients(model, x, 1, "h")
    assert len(made) == 6


def test_cache_does_not_keep_models_alive():
    import gc
    import weakref

    model = _mlp(name="short_lived")
    gp.gradients(model, np.ones((2, 5), "float32"), 0, ["h", "h.kernel", "inputs"])
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
