"""gp.gradients on the JAX and PyTorch backends of Keras 3: the tests that are
the same on both, written once. What only one backend has (JAX's jit cache and
lax loops, PyTorch's refusals, each backend's finite differences) stays in
test_jax.py and test_torch.py.

Run with `KERAS_BACKEND=jax` (or `torch`) `python -m pytest tests/backends`.
Under any other backend the module is skipped.

Oracles: hand-written gradient code of the active backend (`jax.grad` or
`torch.autograd.grad`, through `backend_helpers.oracle()`) of the rest of the
model with respect to an intermediate value, or of `stateless_call` with respect
to a weight or the input.
"""

import keras
import numpy as np
import pytest
from backend_helpers import (
    Twice,
    arr,
    assert_sacred_state,
    close,
    oracle,
    sacred_state,
    skip_unless_jax_or_torch,
    tanh_mlp,
)
from keras import layers

import gradprobe as gp
from catalog import Looped
from gradprobe.core import _patch

skip_unless_jax_or_torch()
B = oracle()  # jax.grad on JAX, torch.autograd.grad on PyTorch


# ------------------------------------------------------------------ Sequential
def test_sequential_activation_weight_input_against_backend_autograd():
    model = tanh_mlp()
    x = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    before, out_before = sacred_state(model), arr(model(x))
    g = gp.gradients(model, x, 2, ["h", "out.kernel", "h.bias", "inputs"])
    assert list(g) == ["inputs", "h", "h.bias", "out.kernel"]
    assert dict(g.kinds) == {"inputs": "input", "h": "activation", "h.bias": "weight",
                             "out.kernel": "weight"}
    h = model.get_layer("h")(x)

    def objective(y):
        return y[:, 2].sum()

    close(g["h"], B.grad(lambda a: objective(model.get_layer("out")(a)))(h), what="h")
    close(g.activations["h"], h, what="activation value")
    close(g["out.kernel"], B.weight_grad(model, model.get_layer("out").kernel, x, objective))
    close(g["h.bias"], B.weight_grad(model, model.get_layer("h").bias, x, objective))
    close(g["inputs"], B.input_grad(model, x, objective))
    close(g.target, out_before[:, 2], what="target value")
    close(g.outputs, out_before, what="outputs")
    assert g.unconnected == () and g.skipped == ()
    assert dict(g.per_example_method) == {} and dict(g.per_example_fallbacks) == {}
    if B.name == "torch":  # (plain tensors, detached: NumPy views of them are writeable;
        # a JAX array's NumPy view is read-only by design)
        assert all(arr(t).flags.writeable for t in g.values())
    assert_sacred_state(model, before, x, out_before)


# ------------------------------------------------------------ Functional, nested
def test_functional_multi_input_with_nested_model():
    keras.utils.set_random_seed(7)
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(4, activation="relu", name="d1")],
                             name="inner")
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = layers.Concatenate(name="cat")([layers.Dense(2, name="pa")(a), b])
    model = keras.Model([a, b], layers.Dense(3, name="head")(inner(h)))
    rng = np.random.default_rng(2)
    x = [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(4, 2)).astype("float32")]
    g = gp.gradients(model, x, [0, 2, 1, 0], ["cat", "inner/d1", "inputs:1", "pa.kernel"])

    def objective(y):
        return B.pick(y, [0, 2, 1, 0]).sum()

    cat = model.get_layer("cat")([model.get_layer("pa")(x[0]), x[1]])
    close(g["cat"], B.grad(lambda c: objective(model.get_layer("head")(inner(c))))(cat))
    close(g["inner/d1"], B.grad(lambda v: objective(model.get_layer("head")(v)))(inner(cat)))
    tv, ntv = B.values(model)
    x0 = B.tensor(x[0])
    close(g["inputs:1"], B.grad(lambda v: objective(model.stateless_call(tv, ntv, [x0, v])[0]))(
        x[1]))
    close(g["pa.kernel"], B.weight_grad(model, model.get_layer("pa").kernel, x, objective))


def test_shared_layer_one_result_per_call_subclassed():
    keras.utils.set_random_seed(11)
    model = Twice()
    x = np.random.default_rng(3).normal(size=(2, 3)).astype("float32")
    model(x)
    before, out_before = sacred_state(model), arr(model(x))
    g = gp.gradients(model, x, "predicted", ["shared", "shared.kernel"])
    assert list(g) == ["shared@0", "shared.kernel", "shared@1"]  # forward order, as on TF
    pred = np.argmax(out_before, axis=1)
    shared, head, xt = model.shared, model.head, B.tensor(x)

    def hand(probes):  # the model's call written by hand, with a probe per call
        p0, p1 = probes
        return B.pick(head((shared(shared(xt) + p0) + p1) * 2.0), pred).sum()

    zeros = np.zeros((2, 3), "float32")
    e0, e1 = B.grad(hand)([zeros, zeros])
    close(g["shared@0"], e0, what="call 0")
    close(g["shared@1"], e1, what="call 1")
    assert not np.allclose(e0, e1)
    close(g["shared.kernel"], B.weight_grad(model, shared.kernel, x,
                                            lambda y: B.pick(y, pred).sum()))
    one = gp.gradients(model, x, 0, "shared@1")
    assert list(one) == ["shared@1"]
    assert_sacred_state(model, before, x, out_before)


# --------------------------------------------------------------- layer kinds
def conv_bn_dropout():
    keras.utils.set_random_seed(13)
    return keras.Sequential([
        keras.Input((6, 6, 2)), layers.Conv2D(3, 3, name="conv"),
        layers.BatchNormalization(name="bn"), layers.Activation("relu", name="act"),
        # (seeded: an unseeded Dropout draws from torch's global generator on PyTorch,
        # whatever the model's seed state, so no oracle could repeat its mask)
        layers.Dropout(0.5, seed=1, name="drop"), layers.GlobalAveragePooling2D(name="gap"),
        layers.Dense(2, name="out")])


@pytest.mark.parametrize("training", [False, True])
def test_conv_batchnorm_dropout_state_untouched(training):
    model = conv_bn_dropout()
    x = np.random.default_rng(4).normal(size=(3, 6, 6, 2)).astype("float32")
    model(x)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.full((3,), 0.3, "float32"))
    before = sacred_state(model)
    seeds = [arr(v.value).copy() for v in model.non_trainable_variables]
    g = gp.gradients(model, x, 1, ["conv", "conv.kernel", "bn.gamma"], training=training)
    for s, v in zip(seeds, model.non_trainable_variables):  # moving stats, seed state
        np.testing.assert_array_equal(s, arr(v.value))
    assert_sacred_state(model, before)

    def objective(y):
        return y[:, 1].sum()

    conv = model.get_layer("conv")
    if training:  # Dropout is random: the same stateless call (same seed state: same mask)
        close(g["conv.kernel"], B.weight_grad(model, conv.kernel, x, objective, training=True),
              what="conv.kernel (training)")
        return
    close(g["conv.kernel"], B.weight_grad(model, conv.kernel, x, objective))
    close(g["bn.gamma"], B.weight_grad(model, bn.gamma, x, objective))

    def tail(c):
        for layer in model.layers[1:]:
            c = layer(c, training=False)
        return objective(c)

    close(g["conv"], B.grad(tail)(conv(x)), what="conv")


def test_keras_mask_survives_the_probe_and_lstm_cell_weights():
    """A probe on a masked Embedding keeps its mask for the LSTM after it: padding
    steps get exactly zero gradient, as without gradprobe."""
    keras.utils.set_random_seed(29)
    model = keras.Sequential([keras.Input((5,), dtype="int32"),
                              layers.Embedding(9, 3, mask_zero=True, name="emb"),
                              layers.LSTM(4, name="lstm"), layers.Dense(2, name="out")])
    ids = np.array([[3, 1, 4, 0, 0], [2, 7, 1, 8, 2]], "int32")
    g = gp.gradients(model, ids, 0, ["emb", "lstm/lstm_cell.kernel"])
    mask = B.tensor(ids != 0)

    def rest(v):
        return model.get_layer("out")(model.get_layer("lstm")(v, mask=mask))[:, 0].sum()

    close(g["emb"], B.grad(rest)(model.get_layer("emb")(ids)))
    assert not np.any(arr(g["emb"])[0, 3:])  # padding: exactly zero
    assert np.all(np.abs(arr(g["emb"])[1]).sum(axis=-1) > 0)
    close(g["lstm/lstm_cell.kernel"], B.weight_grad(model, model.get_layer("lstm").cell.kernel,
                                                    ids, lambda y: y[:, 0].sum()))
    with pytest.raises(gp.GradprobeError, match="inputs"):
        gp.gradients(model, ids, 0, "inputs")



def test_embedding_integer_input():
    keras.utils.set_random_seed(17)
    model = keras.Sequential([keras.Input((4,), dtype="int32"),
                              layers.Embedding(10, 3, name="emb"),
                              layers.GlobalAveragePooling1D(name="pool"),
                              layers.Dense(2, name="out")])
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 0]], "int32")
    g = gp.gradients(model, ids, 0, ["emb", "emb.embeddings"])
    ref = B.grad(lambda v: model.get_layer("out")(model.get_layer("pool")(v))[:, 0].sum())(
        model.get_layer("emb")(ids))
    close(g["emb"], ref)
    close(g["emb.embeddings"], B.weight_grad(model, model.get_layer("emb").embeddings, ids,
                                             lambda y: y[:, 0].sum()))
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
    close(g["lstm"], B.grad(lambda v: model.get_layer("out")(v)[:, 1].sum())(h))
    with pytest.raises(gp.GradprobeError, match=r"lstm_cell.*time loop"):
        gp.gradients(model, x, 1, "lstm/lstm_cell")
    cell = model.get_layer("lstm").cell
    w = gp.gradients(model, x, 1, "lstm/lstm_cell.kernel")
    close(w["lstm/lstm_cell.kernel"], B.weight_grad(model, cell.kernel, x,
                                                    lambda y: y[:, 1].sum()))



@pytest.mark.parametrize("compile", ["auto", False])
def test_layer_inside_a_keras_loop_is_never_probed(compile):
    """Reported as on TensorFlow, whether the loop is a lax loop (JAX) or a Python one."""
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

    def rest(v):
        return model.out(keras.ops.fori_loop(0, 3, lambda i, a: model.step(a), v))[:, 0].sum()

    close(g["pre"], B.grad(rest)(model.pre(x)))
    gw = gp.gradients(model, x, 0, "step.kernel", compile=compile)  # weights still work
    close(gw["step.kernel"], B.weight_grad(model, model.step.kernel, x, lambda y: y[:, 0].sum()))
    assert _patch.active_wrappers() == 0

# --------------------------------------------------------------------- targets
@pytest.mark.parametrize("form", ["int", "ints", "predicted", "loss_object", "loss_name",
                                  "loss_weighted", "callable_scalar", "callable_per_example"])
def test_every_target_form(form):
    model = tanh_mlp()
    x = np.random.default_rng(6).normal(size=(3, 5)).astype("float32")
    y = np.array([1, 3, 0])
    sw = np.array([0.5, 2.0, 1.0], "float32")
    out = arr(model(x))
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def per_example_ce(yy):
        return -B.pick(B.log_softmax(yy), y)

    target, objective = {
        "int": (3, lambda yy: yy[:, 3].sum()),
        "ints": (y, lambda yy: B.pick(yy, y).sum()),
        "predicted": ("predicted", lambda yy: B.amax(yy, 1).sum()),
        "loss_object": (gp.loss(sce, y), lambda yy: per_example_ce(yy).mean()),
        "loss_name": (gp.loss("mse", np.ones((3, 4), "float32")),
                      lambda yy: ((yy - 1.0) ** 2).mean(-1).sum()),
        "loss_weighted": (gp.loss(lambda t, p: keras.losses.sparse_categorical_crossentropy(
            t, p, from_logits=True), y, sw), lambda yy: (per_example_ce(yy) * B.tensor(sw)).sum()),
        "callable_scalar": (lambda o: keras.ops.sum(o[:, 1] ** 2),
                            lambda yy: (yy[:, 1] ** 2).sum()),
        "callable_per_example": (lambda o: o[:, 2] * 3.0, lambda yy: (yy[:, 2] * 3.0).sum()),
    }[form]
    g = gp.gradients(model, x, target, ["h", "out.bias"])
    close(g["out.bias"], B.weight_grad(model, model.get_layer("out").bias, x, objective),
          1e-5, form)
    close(g["h"], B.grad(lambda v: objective(model.get_layer("out")(v)))(model.get_layer("h")(x)),
          1e-5, form)
    expected_value = {"int": out[:, 3], "predicted": out.max(axis=1),
                      "callable_per_example": out[:, 2] * 3.0}.get(form)
    if expected_value is not None:
        close(g.target, expected_value, 1e-6, form)


# ------------------------------------------------------------ gp.at positions
def sequence_model():
    """A token classifier: (batch, 5 steps, 3 features) -> (batch, 5, 4 classes)."""
    keras.utils.set_random_seed(12)
    return keras.Sequential([keras.Input((5, 3)), layers.Dense(6, activation="tanh", name="h"),
                             layers.Dense(4, name="out")], name="tagger")


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
@pytest.mark.parametrize("form", ["fixed_last", "each_position_each_class", "predicted",
                                  "predicted_log_prob", "last_with_mask"])
def test_position_targets_against_backend_autograd(form, compile):
    model = sequence_model()
    x = np.random.default_rng(13).normal(size=(3, 5, 3)).astype("float32")
    out = arr(model(x))
    before = sacred_state(model)
    target, pos, cls, log_prob = position_case(form, out)

    def objective(y):
        scores = y[B.tensor(np.arange(3)), B.tensor(pos)]
        if log_prob:
            scores = B.log_softmax(scores)
        return B.pick(scores, cls).sum()

    g = gp.gradients(model, x, target, ["h", "out.kernel", "inputs"], compile=compile)
    close(g["h"], B.grad(lambda v: objective(model.get_layer("out")(v)))(model.get_layer("h")(x)),
          1e-5, form)
    close(g["out.kernel"], B.weight_grad(model, model.get_layer("out").kernel, x, objective),
          1e-5, form)
    close(g["inputs"], B.input_grad(model, x, objective), 1e-5, form)
    scores = out[np.arange(3), pos]
    if log_prob:
        scores = arr(B.log_softmax(B.tensor(scores)))
    close(g.target, scores[np.arange(3), cls], 1e-6, form)
    assert_sacred_state(model, before)


def test_position_target_errors_and_per_example():
    model = sequence_model()
    x = np.random.default_rng(14).normal(size=(3, 5, 3)).astype("float32")
    with pytest.raises(gp.GradprobeError, match="position"):
        gp.gradients(model, x, gp.at(5, 0), "h")  # 5 steps: positions -5..4
    with pytest.raises(gp.GradprobeError, match="target"):
        gp.gradients(model, x, gp.at(0, 4), "h")  # 4 classes
    with pytest.raises(gp.GradprobeError, match="sequence output"):
        gp.gradients(tanh_mlp(), np.ones((2, 5), "float32"), gp.at(0, 1), "h")
    # One value per example: per-example weight gradients sum to the batch gradient.
    g = gp.gradients(model, x, gp.at([4, 0, 2], 1), "out.kernel", per_example=True)
    batch = gp.gradients(model, x, gp.at([4, 0, 2], 1), "out.kernel")
    assert arr(g["out.kernel"]).shape == (3, 6, 4)
    close(arr(g["out.kernel"]).sum(axis=0), batch["out.kernel"], 1e-5)
    one = gp.gradients(model, x[1:2], gp.at([0], 1), "out.kernel")
    close(arr(g["out.kernel"])[1], one["out.kernel"], 1e-5)


# ----------------------------------------------------------------- unconnected
def test_unconnected_raise_and_zero():
    keras.utils.set_random_seed(23)
    inp = keras.Input((4,))
    trunk = layers.Dense(3, name="trunk")(inp)
    model = keras.Model(inp, {"a": layers.Dense(2, name="a")(trunk),
                              "b": layers.Dense(2, name="b")(trunk)})
    x = np.ones((2, 4), "float32")
    before = sacred_state(model)
    with pytest.raises(gp.GradprobeError, match=r"does not depend on 1 requested source.*'b'"):
        gp.gradients(model, x, 0, ["trunk", "b"], output="a")
    assert_sacred_state(model, before)
    g = gp.gradients(model, x, 0, ["trunk", "b", "b.kernel"], output="a", unconnected="zero")
    assert g.unconnected == ("b", "b.kernel")
    assert not np.any(arr(g["b"])) and not np.any(arr(g["b.kernel"]))
    assert np.any(arr(g["trunk"]))
    assert_sacred_state(model, before)


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
    assert not np.any(arr(g["d1.kernel"])) and np.any(arr(g["d2.kernel"]))
    # a target through an integer operation only (an arg-max) depends on nothing
    with pytest.raises(gp.GradprobeError, match="does not depend"):
        gp.gradients(model, x, lambda o: keras.ops.cast(keras.ops.argmax(o, axis=1),
                                                        "float32"), "d2")


# ---------------------------------------------------------------------- report
def test_write_report_without_attribution(tmp_path):
    # The report itself runs on the backend (its attribution maps need gp.saliency/gp.grad_cam).
    model = tanh_mlp()
    x = np.random.default_rng(21).normal(size=(4, 5)).astype("float32")
    before = sacred_state(model)
    path = gp.write_report(str(tmp_path / "report.html"), model, x, 1, attribution=False)
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert B.library in text and "TensorFlow" not in text
    for key in ("h.kernel", "out.bias"):
        assert key in text
    with pytest.raises(gp.GradprobeError, match="exists"):
        gp.write_report(path, model, x, 1, attribution=False)
    assert_sacred_state(model, before)
