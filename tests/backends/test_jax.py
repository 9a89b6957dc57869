"""gp.gradients on the JAX backend of Keras 3.

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
from backend_helpers import Twice, close  # noqa: E402
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402
from gradprobe.core import _functional, _patch  # noqa: E402


def values(model):
    return ([v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables])


def weight_grad(model, var, x, objective, training=False):
    """jax.grad of objective(stateless_call(...)) with respect to one variable."""
    tv, ntv = values(model)
    pos = [id(v) for v in model.trainable_variables].index(id(var))

    def f(w):
        vals = list(tv)
        vals[pos] = w
        kw = {"training": True} if training else {}  # (a subclass `call` may not take it)
        return objective(model.stateless_call(vals, ntv, x, **kw)[0])

    return jax.grad(f)(tv[pos])


def input_grad(model, x, objective, training=False):
    tv, ntv = values(model)
    kw = {"training": True} if training else {}
    return jax.grad(lambda xx: objective(model.stateless_call(tv, ntv, xx, **kw)[0]))(x)


def mlp(name="mlp"):
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((5,)), layers.Dense(6, activation="tanh", name="h"),
                             layers.Dense(4, name="out")], name=name)


def snapshot(model):
    return {
        "weights": [np.array(v.value) for v in model.weights],
        "attrs": {id(layer): sorted(vars(layer)) for layer in model._flatten_layers()},
        "calls": [layer.__dict__.get("call") for layer in model._flatten_layers()],
    }


def assert_sacred(model, before, x=None, out_before=None):
    after = snapshot(model)
    for a, b in zip(before["weights"], after["weights"]):
        np.testing.assert_array_equal(a, b)
    assert before["attrs"] == after["attrs"]
    assert all(c is None for c in after["calls"])  # no instance-level `call` left
    assert _patch.active_wrappers() == 0
    if x is not None:
        np.testing.assert_array_equal(np.asarray(model(x)), out_before)


# ------------------------------------------------------------------ Sequential
def test_sequential_activation_weight_input_against_hand_written_jax():
    model = mlp()
    x = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    before, out_before = snapshot(model), np.asarray(model(x))
    g = gp.gradients(model, x, 2, ["h", "out.kernel", "h.bias", "inputs"])
    assert list(g) == ["inputs", "h", "h.bias", "out.kernel"]
    assert dict(g.kinds) == {"inputs": "input", "h": "activation", "h.bias": "weight",
                             "out.kernel": "weight"}
    h = model.get_layer("h")(x)

    def objective(y):
        return jnp.sum(y[:, 2])

    close(g["h"], jax.grad(lambda a: objective(model.get_layer("out")(a)))(h), what="h")
    close(g.activations["h"], h, what="activation value")
    close(g["out.kernel"], weight_grad(model, model.get_layer("out").kernel, x, objective))
    close(g["h.bias"], weight_grad(model, model.get_layer("h").bias, x, objective))
    close(g["inputs"], input_grad(model, jnp.asarray(x), objective))
    close(g.target, np.asarray(model(x))[:, 2], what="target value")
    close(g.outputs, out_before, what="outputs")
    assert g.unconnected == () and g.skipped == ()
    assert dict(g.per_example_method) == {} and dict(g.per_example_fallbacks) == {}
    assert_sacred(model, before, x, out_before)


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
    tv, ntv = values(model)

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


# ------------------------------------------------------------ Functional, nested
def test_functional_multi_input_with_nested_model():
    keras.utils.set_random_seed(7)
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(4, activation="relu", name="d1")],
                             name="inner")
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = layers.Concatenate(name="cat")([layers.Dense(2, name="pa")(a), b])
    out = layers.Dense(3, name="head")(inner(h))
    model = keras.Model([a, b], out)
    rng = np.random.default_rng(2)
    x = [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(4, 2)).astype("float32")]
    g = gp.gradients(model, x, [0, 2, 1, 0], ["cat", "inner/d1", "inputs:1", "pa.kernel"])
    classes = jnp.asarray([0, 2, 1, 0])

    def objective(y):
        return jnp.sum(jnp.take_along_axis(y, classes[:, None], axis=1))

    cat = model.get_layer("cat")([model.get_layer("pa")(x[0]), x[1]])
    close(g["cat"], jax.grad(lambda c: objective(model.get_layer("head")(inner(c))))(cat))
    d1 = inner(cat)
    close(g["inner/d1"], jax.grad(lambda v: objective(model.get_layer("head")(v)))(d1))
    tv, ntv = values(model)
    x1 = jax.grad(lambda v: objective(model.stateless_call(tv, ntv, [x[0], v])[0]))(
        jnp.asarray(x[1]))
    close(g["inputs:1"], x1)
    close(g["pa.kernel"], weight_grad(model, model.get_layer("pa").kernel, x, objective))


def test_shared_layer_one_result_per_call_subclassed():
    keras.utils.set_random_seed(11)
    model = Twice()
    x = np.random.default_rng(3).normal(size=(2, 3)).astype("float32")
    model(x)
    before, out_before = snapshot(model), np.asarray(model(x))
    g = gp.gradients(model, x, "predicted", ["shared", "shared.kernel"])
    assert list(g) == ["shared@0", "shared.kernel", "shared@1"]  # forward order, as on TF
    pred = np.argmax(out_before, axis=1)
    shared, head = model.shared, model.head

    def hand(p0, p1):  # the model's call written by hand, with a probe per call
        y = head((shared(shared(x) + p0) + p1) * 2.0)
        return jnp.sum(jnp.take_along_axis(y, jnp.asarray(pred)[:, None], axis=1))

    zeros = jnp.zeros((2, 3))
    e0, e1 = jax.grad(hand, argnums=(0, 1))(zeros, zeros)
    close(g["shared@0"], e0, what="call 0")
    close(g["shared@1"], e1, what="call 1")
    assert not np.allclose(e0, e1)
    close(g["shared.kernel"], weight_grad(
        model, shared.kernel, x,
        lambda y: jnp.sum(jnp.take_along_axis(y, jnp.asarray(pred)[:, None], axis=1))))
    one = gp.gradients(model, x, 0, "shared@1")
    assert list(one) == ["shared@1"]
    assert_sacred(model, before, x, out_before)


# --------------------------------------------------------------- layer kinds
def cnn():
    keras.utils.set_random_seed(13)
    return keras.Sequential([
        keras.Input((6, 6, 2)), layers.Conv2D(3, 3, name="conv"),
        layers.BatchNormalization(name="bn"), layers.Activation("relu", name="act"),
        layers.Dropout(0.5, name="drop"), layers.GlobalAveragePooling2D(name="gap"),
        layers.Dense(2, name="out")])


@pytest.mark.parametrize("training", [False, True])
def test_conv_batchnorm_dropout_state_untouched(training):
    model = cnn()
    x = np.random.default_rng(4).normal(size=(3, 6, 6, 2)).astype("float32")
    model(x)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.full((3,), 0.3, "float32"))
    before = snapshot(model)
    seeds = [np.array(v.value) for v in model.non_trainable_variables]
    g = gp.gradients(model, x, 1, ["conv", "conv.kernel", "bn.gamma"], training=training)
    for s, v in zip(seeds, model.non_trainable_variables):  # moving stats, seed state
        np.testing.assert_array_equal(s, np.asarray(v.value))
    assert_sacred(model, before)

    def objective(y):
        return jnp.sum(y[:, 1])

    if training:  # Dropout is random: compare the weights against the same stateless call
        tv, ntv = values(model)
        ref = jax.grad(lambda k: objective(model.stateless_call(
            [k, *tv[1:]], ntv, x, training=True)[0]))(tv[0])
        close(g["conv.kernel"], ref, what="conv.kernel (training)")
        return
    close(g["conv.kernel"], weight_grad(model, model.get_layer("conv").kernel, x, objective))
    close(g["bn.gamma"], weight_grad(model, bn.gamma, x, objective))
    conv = model.get_layer("conv")(x)
    rest = model.layers[1:]

    def tail(c):
        for layer in rest:
            c = layer(c, training=False)
        return objective(c)

    close(g["conv"], jax.grad(tail)(conv), what="conv")


def test_embedding_integer_input():
    keras.utils.set_random_seed(17)
    model = keras.Sequential([keras.Input((4,), dtype="int32"),
                              layers.Embedding(10, 3, name="emb"),
                              layers.GlobalAveragePooling1D(name="pool"),
                              layers.Dense(2, name="out")])
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 0]], "int32")
    g = gp.gradients(model, ids, 0, ["emb", "emb.embeddings"])
    e = model.get_layer("emb")(ids)
    ref = jax.grad(lambda v: jnp.sum(model.get_layer("out")(
        model.get_layer("pool")(v))[:, 0]))(e)
    close(g["emb"], ref)
    close(g["emb.embeddings"], weight_grad(model, model.get_layer("emb").embeddings, ids,
                                           lambda y: jnp.sum(y[:, 0])))
    with pytest.raises(gp.GradprobeError, match="inputs"):
        gp.gradients(model, ids, 0, "inputs")


def test_lstm_output_and_cell_weights():
    keras.utils.set_random_seed(19)
    model = keras.Sequential([keras.Input((5, 3)), layers.LSTM(4, name="lstm"),
                              layers.Dense(2, name="out")])
    x = np.random.default_rng(5).normal(size=(2, 5, 3)).astype("float32")
    g = gp.gradients(model, x, 1, "*")
    assert list(g) == ["lstm", "out"]
    h = model.get_layer("lstm")(x)
    close(g["lstm"], jax.grad(lambda v: jnp.sum(model.get_layer("out")(v)[:, 1]))(h))
    with pytest.raises(gp.GradprobeError, match=r"lstm_cell.*time loop"):
        gp.gradients(model, x, 1, "lstm/lstm_cell")
    cell = model.get_layer("lstm").cell
    w = gp.gradients(model, x, 1, "lstm/lstm_cell.kernel")
    close(w["lstm/lstm_cell.kernel"], weight_grad(model, cell.kernel, x,
                                                  lambda y: jnp.sum(y[:, 1])))


def test_keras_mask_survives_the_probe():
    """A probe on a masked Embedding keeps its mask for the LSTM after it: padding
    steps get exactly zero gradient, as without gradprobe."""
    keras.utils.set_random_seed(29)
    model = keras.Sequential([keras.Input((5,), dtype="int32"),
                              layers.Embedding(9, 3, mask_zero=True, name="emb"),
                              layers.LSTM(4, name="lstm"), layers.Dense(2, name="out")])
    ids = np.array([[3, 1, 4, 0, 0], [2, 7, 1, 8, 2]], "int32")
    g = gp.gradients(model, ids, 0, "emb")
    e = model.get_layer("emb")(ids)
    mask = jnp.asarray(ids != 0)

    def rest(v):
        return jnp.sum(model.get_layer("out")(model.get_layer("lstm")(v, mask=mask))[:, 0])

    close(g["emb"], jax.grad(rest)(e))
    assert not np.any(np.asarray(g["emb"])[0, 3:])  # padding: exactly zero
    assert np.all(np.abs(np.asarray(g["emb"])[1]).sum(axis=-1) > 0)


class Looped(keras.Model):
    """A layer called in a loop body (keras.ops.fori_loop: a lax loop on JAX)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.pre = layers.Dense(4, name="pre")
        self.step = layers.Dense(4, activation="tanh", name="step")
        self.out = layers.Dense(3, name="out")

    def call(self, x):
        h = self.pre(x)
        h = keras.ops.fori_loop(0, 3, lambda i, h: self.step(h), h)
        return self.out(h)


@pytest.mark.parametrize("compile", ["auto", False])
def test_layer_inside_lax_loop_is_never_probed(compile):
    keras.utils.set_random_seed(10)
    model = Looped()
    x = np.random.default_rng(11).normal(size=(2, 4)).astype("float32")
    model(x)
    with pytest.raises(gp.GradprobeError, match=r"'step'.*inside backend control flow "
                                                r"\((scan|while_loop|fori_loop)\)"):
        gp.gradients(model, x, 0, "step", compile=compile)
    g = gp.gradients(model, x, 0, "*", compile=compile)
    assert list(g) == ["pre", "out"]
    assert any(s.startswith("step: ") and "control flow" in s for s in g.skipped)
    h = model.pre(x)

    def rest(v):
        return jnp.sum(model.out(keras.ops.fori_loop(0, 3, lambda i, a: model.step(a), v))[:, 0])

    close(g["pre"], jax.grad(rest)(h))
    gw = gp.gradients(model, x, 0, "step.kernel", compile=compile)  # weights still work
    close(gw["step.kernel"], weight_grad(model, model.step.kernel, x,
                                         lambda y: jnp.sum(y[:, 0])))
    assert _patch.active_wrappers() == 0


# --------------------------------------------------------------------- targets
@pytest.mark.parametrize("form", ["int", "ints", "predicted", "loss_object", "loss_name",
                                  "loss_weighted", "callable_scalar", "callable_per_example"])
def test_every_target_form(form):
    model = mlp()
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 5)).astype("float32")
    y = np.array([1, 3, 0])
    sw = np.array([0.5, 2.0, 1.0], "float32")
    out = np.asarray(model(x))
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def per_example_ce(yy):
        return -jnp.take_along_axis(jax.nn.log_softmax(yy), jnp.asarray(y)[:, None], 1)[:, 0]

    target, objective = {
        "int": (3, lambda yy: jnp.sum(yy[:, 3])),
        "ints": (y, lambda yy: jnp.sum(jnp.take_along_axis(yy, jnp.asarray(y)[:, None], 1))),
        "predicted": ("predicted", lambda yy: jnp.sum(jnp.max(yy, axis=1))),
        "loss_object": (gp.loss(sce, y), lambda yy: jnp.mean(per_example_ce(yy))),
        "loss_name": (gp.loss("mse", np.ones((3, 4), "float32")),
                      lambda yy: jnp.sum(jnp.mean((yy - 1.0) ** 2, axis=1))),
        "loss_weighted": (gp.loss(lambda t, p: keras.losses.sparse_categorical_crossentropy(
            t, p, from_logits=True), y, sw), lambda yy: jnp.sum(per_example_ce(yy) * sw)),
        "callable_scalar": (lambda o: keras.ops.sum(o[:, 1] ** 2),
                            lambda yy: jnp.sum(yy[:, 1] ** 2)),
        "callable_per_example": (lambda o: o[:, 2] * 3.0, lambda yy: jnp.sum(yy[:, 2] * 3.0)),
    }[form]
    g = gp.gradients(model, x, target, ["h", "out.bias"])
    close(g["out.bias"], weight_grad(model, model.get_layer("out").bias, x, objective),
          1e-5, form)
    h = model.get_layer("h")(x)
    close(g["h"], jax.grad(lambda v: objective(model.get_layer("out")(v)))(h), 1e-5, form)
    expected_value = {"int": out[:, 3], "predicted": out.max(axis=1),
                      "callable_per_example": out[:, 2] * 3.0}.get(form)
    if expected_value is not None:
        close(g.target, expected_value, 1e-6, form)


def test_target_errors_are_gradprobe_errors():
    model = mlp()
    x = np.ones((2, 5), "float32")
    with pytest.raises(gp.GradprobeError, match="target"):
        gp.gradients(model, x, 7, "h")  # out of range: 4 classes
    with pytest.raises(gp.GradprobeError, match="callable"):
        gp.gradients(model, x, lambda o: o, "h")  # not scalar / per example
    with pytest.raises(gp.GradprobeError, match="gp.at"):
        gp.gradients(model, x, gp.at(0, 1), "h")


# ------------------------------------------------------------ gp.at positions
def sequence_model():
    """A token classifier: (batch, 5 steps, 3 features) -> (batch, 5, 4 classes)."""
    keras.utils.set_random_seed(12)
    return keras.Sequential([keras.Input((5, 3)), layers.Dense(6, activation="tanh", name="h"),
                             layers.Dense(4, name="out")], name="tagger")


POSITION_FORMS = ["fixed_last", "each_position_each_class", "predicted", "predicted_log_prob",
                  "last_with_mask", "position_out_of_range"]


def position_case(form, out):
    """`(gp.at target, the positions and classes it picks, whether log-softmax)`; the
    classes of "predicted" are read off the concrete output (an arg-max has no gradient)."""
    rows = np.arange(out.shape[0])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], "int32")
    if form == "fixed_last":
        return gp.at(-1, 2), np.full(3, 4), np.full(3, 2), False
    if form == "each_position_each_class":
        return gp.at([0, 3, 4], [1, 0, 3]), np.array([0, 3, 4]), np.array([1, 0, 3]), False
    if form == "predicted":
        return gp.at(2), np.full(3, 2), out[rows, 2].argmax(-1), False
    if form == "predicted_log_prob":
        return gp.at(1, "predicted", log_prob=True), np.full(3, 1), out[rows, 1].argmax(-1), True
    if form == "last_with_mask":
        return gp.at("last", [3, 1, 0], mask=mask), np.array([4, 2, 0]), np.array([3, 1, 0]), \
            False
    raise AssertionError(form)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("form", POSITION_FORMS[:-1])
def test_position_targets_against_hand_written_jax(form, compile):
    model = sequence_model()
    x = np.random.default_rng(13).normal(size=(3, 5, 3)).astype("float32")
    out = np.asarray(model(x))
    before = snapshot(model)
    target, pos, cls, log_prob = position_case(form, out)

    def objective(y):
        scores = y[jnp.arange(3), jnp.asarray(pos)]
        if log_prob:
            scores = jax.nn.log_softmax(scores, axis=-1)
        return jnp.sum(scores[jnp.arange(3), jnp.asarray(cls)])

    g = gp.gradients(model, x, target, ["h", "out.kernel", "inputs"], compile=compile)
    h = model.get_layer("h")(x)
    close(g["h"], jax.grad(lambda v: objective(model.get_layer("out")(v)))(h), 1e-5, form)
    close(g["out.kernel"], weight_grad(model, model.get_layer("out").kernel, x, objective),
          1e-5, form)
    close(g["inputs"], input_grad(model, jnp.asarray(x), objective), 1e-5, form)
    scores = out[np.arange(3), pos]
    if log_prob:
        scores = np.asarray(jax.nn.log_softmax(scores, axis=-1))
    close(g.target, scores[np.arange(3), cls], 1e-6, form)
    assert_sacred(model, before)


def test_position_target_errors_and_per_example():
    model = sequence_model()
    x = np.random.default_rng(14).normal(size=(3, 5, 3)).astype("float32")
    with pytest.raises(gp.GradprobeError, match="position"):
        gp.gradients(model, x, gp.at(5, 0), "h")  # 5 steps: positions -5..4
    with pytest.raises(gp.GradprobeError, match="target"):
        gp.gradients(model, x, gp.at(0, 4), "h")  # 4 classes
    with pytest.raises(gp.GradprobeError, match="sequence output"):
        gp.gradients(mlp(), np.ones((2, 5), "float32"), gp.at(0, 1), "h")
    # One value per example: per-example weight gradients sum to the batch gradient.
    g = gp.gradients(model, x, gp.at([4, 0, 2], 1), "out.kernel", per_example=True)
    batch = gp.gradients(model, x, gp.at([4, 0, 2], 1), "out.kernel")
    assert np.asarray(g["out.kernel"]).shape == (3, 6, 4)
    close(np.asarray(g["out.kernel"]).sum(axis=0), batch["out.kernel"], 1e-5)
    one = gp.gradients(model, x[1:2], gp.at([0], 1), "out.kernel")
    close(np.asarray(g["out.kernel"])[1], one["out.kernel"], 1e-5)


# ----------------------------------------------------------------- unconnected
def two_heads():
    keras.utils.set_random_seed(23)
    inp = keras.Input((4,))
    trunk = layers.Dense(3, name="trunk")(inp)
    a = layers.Dense(2, name="a")(trunk)
    b = layers.Dense(2, name="b")(trunk)
    return keras.Model(inp, {"a": a, "b": b})


def test_unconnected_raise_and_zero():
    model = two_heads()
    x = np.ones((2, 4), "float32")
    before = snapshot(model)
    with pytest.raises(gp.GradprobeError, match=r"does not depend on 1 requested source.*'b'"):
        gp.gradients(model, x, 0, ["trunk", "b"], output="a")
    assert_sacred(model, before)
    g = gp.gradients(model, x, 0, ["trunk", "b", "b.kernel"], output="a", unconnected="zero")
    assert g.unconnected == ("b", "b.kernel")
    assert not np.any(np.asarray(g["b"])) and not np.any(np.asarray(g["b.kernel"]))
    assert np.any(np.asarray(g["trunk"]))
    assert_sacred(model, before)


class Stopped(keras.Model):
    def __init__(self):
        super().__init__()
        self.d1 = layers.Dense(3, name="d1")
        self.d2 = layers.Dense(2, name="d2")

    def call(self, x):
        return self.d2(keras.ops.stop_gradient(self.d1(x)))


def test_stop_gradient_and_argmax_count_as_unconnected():
    model = Stopped()
    x = np.ones((2, 4), "float32")
    model(x)
    with pytest.raises(gp.GradprobeError, match="d1"):
        gp.gradients(model, x, 0, ["d1", "d2"])
    g = gp.gradients(model, x, 0, ["d1.kernel", "d2.kernel"], unconnected="zero")
    assert g.unconnected == ("d1.kernel",)
    # a target through an integer operation only (an arg-max) depends on nothing
    with pytest.raises(gp.GradprobeError, match="does not depend"):
        gp.gradients(model, x, lambda o: keras.ops.cast(keras.ops.argmax(o, axis=1),
                                                        "float32"), "d2")


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
    close(g["loop.w"], weight_grad(model, w, x, lambda y: jnp.sum(y[:, 0])))
    assert np.any(np.asarray(g["loop.w"]))


# -------------------------------------------------------------- options, cache
def test_compile_true_false_auto_agree_and_jit_cache_hits():
    model = mlp("cached")
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
    model = mlp()
    x = np.ones((2, 5), "float32")
    g = gp.gradients(model, x, 0, "h", differentiable=False)
    close(g["h"], gp.gradients(model, x, 0, "h")["h"], 0.0)


def test_differentiable_under_the_callers_jax_grad():
    """Second order: the caller's jax.grad through gp.gradients (an input-gradient
    penalty), against jax.grad of hand-written jax.grad."""
    model = keras.Sequential([keras.Input((5,)), layers.Dense(4, activation="sigmoid", name="d1"),
                              layers.Dense(3, name="d2")])
    x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 5)).astype("float32"))
    tv, ntv = values(model)

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
    model = mlp()
    for call, name, points_to in [(lambda: gp.Tape(model), "gp.Tape", "gp.functional"),
                                  (lambda: gp.GradientMonitor(), "gp.GradientMonitor",
                                   "KERAS_BACKEND=tensorflow")]:
        with pytest.raises(gp.GradprobeError) as info:
            call()
        text = str(info.value)
        assert name in text and "'jax'" in text and points_to in text, text
    assert _patch.active_wrappers() == 0


def test_stats_summary_and_diagnose_work():
    model = mlp()
    g = gp.gradients(model, np.ones((2, 5), "float32"), 0, "*")
    stats = g.stats()
    assert set(stats) == set(g)
    close(stats["h"]["norm"], np.linalg.norm(np.asarray(g["h"])), 1e-5)
    assert isinstance(g.diagnose(), list)


def test_input_errors_are_gradprobe_errors():
    model = mlp()
    with pytest.raises(gp.GradprobeError):
        gp.gradients(model, np.ones((2, 7), "float32"), 0, "h")
    with pytest.raises(gp.GradprobeError, match="nope"):
        gp.gradients(model, np.ones((2, 5), "float32"), 0, "nope")
    assert _patch.active_wrappers() == 0


def test_cache_does_not_keep_models_alive():
    import gc
    import weakref

    model = mlp("short_lived")
    gp.gradients(model, np.ones((2, 5), "float32"), 0, ["h", "h.kernel", "inputs"])
    gp.gradients(model, np.ones((2, 5), "float32"), 0, "h", compile=False)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_output_layer_aliases_and_objects():
    model = mlp()
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

    model = mlp("threads")
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


def test_float16_models_are_refused_not_underflowed():
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((3,)), layers.Dense(2, name="d")])
    finally:
        keras.config.set_dtype_policy(old)
    with pytest.raises(gp.GradprobeError, match="float16.*not supported on the jax backend"):
        gp.gradients(model, np.ones((2, 3), "float32"), 0, "d")


def test_write_report_without_attribution(tmp_path):
    # The report itself runs on JAX (its attribution maps need gp.saliency/gp.grad_cam).
    model = mlp()
    x = np.random.default_rng(21).normal(size=(4, 5)).astype("float32")
    before = snapshot(model)
    path = gp.write_report(str(tmp_path / "report.html"), model, x, 1, attribution=False)
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert f"JAX {jax.__version__}" in text and "TensorFlow" not in text
    for key in ("h.kernel", "out.bias"):
        assert key in text
    with pytest.raises(gp.GradprobeError, match="exists"):
        gp.write_report(path, model, x, 1, attribution=False)
    assert_sacred(model, before)
