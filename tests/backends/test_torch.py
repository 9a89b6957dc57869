"""gp.gradients on the PyTorch backend of Keras 3.

Run with `KERAS_BACKEND=torch python -m pytest tests/backends`. Under any other
backend the module is skipped before `torch` is imported.

Oracles: hand-written `torch.autograd.grad` code (of the rest of the model with
respect to an intermediate value, or of `stateless_call` with respect to a
weight or the input) and float64 central finite differences.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":
    pytest.skip("PyTorch backend tests: run with KERAS_BACKEND=torch", allow_module_level=True)

import torch  # noqa: E402
from backend_helpers import Twice, arr, close  # noqa: E402
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402
from gradprobe.core import _patch  # noqa: E402


def values(model):
    return ([v.value.detach() for v in model.trainable_variables],
            [v.value.detach() for v in model.non_trainable_variables])


def weight_grad(model, var, x, objective, training=False):
    """torch.autograd.grad of objective(stateless_call(...)) for one variable."""
    tv, ntv = values(model)
    pos = [id(v) for v in model.trainable_variables].index(id(var))
    w = tv[pos].clone().requires_grad_(True)
    vals = list(tv)
    vals[pos] = w
    kw = {"training": True} if training else {}
    y = model.stateless_call(vals, ntv, keras.tree.map_structure(torch.as_tensor, x), **kw)[0]
    return torch.autograd.grad(objective(y), w)[0]


def grad_at(fn, value):
    """torch.autograd.grad of fn(v) at `value` (an intermediate activation)."""
    v = torch.as_tensor(arr(value)).clone().requires_grad_(True)
    return torch.autograd.grad(fn(v), v)[0]


def mlp():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((5,)), layers.Dense(6, activation="tanh", name="h"),
                             layers.Dense(4, name="out")])


def snapshot(model):
    return {"weights": [arr(v.value).copy() for v in model.weights],
            "attrs": {id(layer): sorted(vars(layer)) for layer in model._flatten_layers()},
            "calls": [layer.__dict__.get("call") for layer in model._flatten_layers()]}


def assert_sacred(model, before):
    after = snapshot(model)
    for a, b in zip(before["weights"], after["weights"]):
        np.testing.assert_array_equal(a, b)
    assert before["attrs"] == after["attrs"]
    assert all(c is None for c in after["calls"])
    assert _patch.active_wrappers() == 0


def test_sequential_activation_weight_input_against_autograd():
    model = mlp()
    x = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    before, out_before = snapshot(model), arr(model(x))
    g = gp.gradients(model, x, 2, ["h", "out.kernel", "h.bias", "inputs"])
    assert list(g) == ["inputs", "h", "h.bias", "out.kernel"]

    def objective(y):
        return y[:, 2].sum()

    h = model.get_layer("h")(x)
    close(g["h"], grad_at(lambda a: objective(model.get_layer("out")(a)), h), what="h")
    close(g.activations["h"], h)
    close(g["out.kernel"], weight_grad(model, model.get_layer("out").kernel, x, objective))
    close(g["h.bias"], weight_grad(model, model.get_layer("h").bias, x, objective))
    tv, ntv = values(model)
    close(g["inputs"], grad_at(lambda v: objective(model.stateless_call(tv, ntv, v)[0]), x))
    close(g.target, out_before[:, 2])
    close(g.outputs, out_before)
    assert not any(arr(t).flags.writeable is False for t in g.values())
    assert_sacred(model, before)
    np.testing.assert_array_equal(arr(model(x)), out_before)


def test_finite_differences_float64(float64):
    """Central differences of the function the model defines, computed in float64
    NumPy from its weights: Keras' matmul on PyTorch is about 4e-8 off in float64
    (measured), which differences at eps=1e-6 would magnify to 1e-2."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), layers.Dense(5, activation="tanh", name="a"),
                              layers.Dense(3, activation="sigmoid", name="b")])
    x = np.random.default_rng(1).normal(size=(2, 4))
    g = gp.gradients(model, x, 1, ["inputs", "a.kernel", "a"])
    assert arr(g["inputs"]).dtype == np.float64
    w1, b1, w2, b2 = (arr(v.value) for v in model.trainable_variables)
    eps = 1e-6

    def f(x_=x, k=w1, a=None):
        h = np.tanh(x_ @ k + b1) if a is None else a
        return float((1 / (1 + np.exp(-(h @ w2 + b2))))[:, 1].sum())

    def fd(base, at):
        out = np.zeros_like(base)
        for i in np.ndindex(base.shape):
            d = np.zeros_like(base)
            d[i] = eps
            out[i] = (at(base + d) - at(base - d)) / (2 * eps)
        return out

    close(g["inputs"], fd(x, lambda v: f(x_=v)), 1e-6, "inputs")
    close(g["a.kernel"], fd(w1, lambda v: f(k=v)), 1e-6, "a.kernel")
    a = np.tanh(x @ w1 + b1)
    close(g["a"], fd(a, lambda v: f(a=v)), 1e-6, "a")


def test_functional_multi_input_nested_model():
    keras.utils.set_random_seed(7)
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(4, activation="relu", name="d1")],
                             name="inner")
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    cat = layers.Concatenate(name="cat")([layers.Dense(2, name="pa")(a), b])
    model = keras.Model([a, b], layers.Dense(3, name="head")(inner(cat)))
    rng = np.random.default_rng(2)
    x = [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(4, 2)).astype("float32")]
    g = gp.gradients(model, x, [0, 2, 1, 0], ["cat", "inner/d1", "inputs:1", "pa.kernel"])
    idx = torch.tensor([0, 2, 1, 0])

    def objective(y):
        return y.gather(1, idx[:, None]).sum()

    c = model.get_layer("cat")([model.get_layer("pa")(x[0]), x[1]])
    close(g["cat"], grad_at(lambda v: objective(model.get_layer("head")(inner(v))), c))
    close(g["inner/d1"], grad_at(lambda v: objective(model.get_layer("head")(v)), inner(c)))
    tv, ntv = values(model)
    close(g["inputs:1"], grad_at(
        lambda v: objective(model.stateless_call(tv, ntv, [torch.as_tensor(x[0]), v])[0]), x[1]))
    close(g["pa.kernel"], weight_grad(model, model.get_layer("pa").kernel, x, objective))


def test_shared_layer_one_result_per_call():
    keras.utils.set_random_seed(11)
    model = Twice()
    x = np.random.default_rng(3).normal(size=(2, 3)).astype("float32")
    model(x)
    before = snapshot(model)
    g = gp.gradients(model, x, 0, ["shared", "shared.kernel"])
    assert list(g) == ["shared@0", "shared.kernel", "shared@1"]
    p0 = torch.zeros((2, 3), requires_grad=True)
    p1 = torch.zeros((2, 3), requires_grad=True)
    y = model.head((model.shared(model.shared(torch.as_tensor(x)) + p0) + p1) * 2.0)
    e0, e1 = torch.autograd.grad(y[:, 0].sum(), [p0, p1])
    close(g["shared@0"], e0)
    close(g["shared@1"], e1)
    assert not np.allclose(arr(e0), arr(e1))
    close(g["shared.kernel"], weight_grad(model, model.shared.kernel, x,
                                          lambda o: o[:, 0].sum()))
    assert_sacred(model, before)


@pytest.mark.parametrize("training", [False, True])
def test_conv_batchnorm_dropout_state_untouched(training):
    keras.utils.set_random_seed(13)
    model = keras.Sequential([
        keras.Input((6, 6, 2)), layers.Conv2D(3, 3, name="conv"),
        layers.BatchNormalization(name="bn"), layers.Activation("relu", name="act"),
        # (seeded: an unseeded Dropout draws from torch's global generator on PyTorch,
        # whatever the model's seed state, so no oracle could repeat its mask)
        layers.Dropout(0.5, seed=1, name="drop"), layers.GlobalAveragePooling2D(name="gap"),
        layers.Dense(2, name="out")])
    x = np.random.default_rng(4).normal(size=(3, 6, 6, 2)).astype("float32")
    model(x)
    model.get_layer("bn").moving_mean.assign(np.full((3,), 0.3, "float32"))
    before = snapshot(model)
    g = gp.gradients(model, x, 1, ["conv", "conv.kernel"], training=training)
    assert_sacred(model, before)  # moving statistics and seed state included
    if training:  # the same stateless call (same seed state: the same dropout mask)
        close(g["conv.kernel"], weight_grad(model, model.get_layer("conv").kernel, x,
                                            lambda y: y[:, 1].sum(), training=True))
        return
    close(g["conv.kernel"], weight_grad(model, model.get_layer("conv").kernel, x,
                                        lambda y: y[:, 1].sum()))

    def tail(c):
        for layer in model.layers[1:]:
            c = layer(c, training=False)
        return c[:, 1].sum()

    close(g["conv"], grad_at(tail, model.get_layer("conv")(x)))


def test_embedding_and_lstm():
    keras.utils.set_random_seed(17)
    model = keras.Sequential([keras.Input((5,), dtype="int32"),
                              layers.Embedding(9, 3, mask_zero=True, name="emb"),
                              layers.LSTM(4, name="lstm"), layers.Dense(2, name="out")])
    ids = np.array([[3, 1, 4, 0, 0], [2, 7, 1, 8, 2]], "int32")
    g = gp.gradients(model, ids, 0, ["emb", "lstm", "lstm/lstm_cell.kernel"])
    mask = torch.as_tensor(ids != 0)
    e = model.get_layer("emb")(ids)
    close(g["emb"], grad_at(lambda v: model.get_layer("out")(
        model.get_layer("lstm")(v, mask=mask))[:, 0].sum(), e))
    assert not np.any(arr(g["emb"])[0, 3:])  # padding: exactly zero (the mask survived)
    close(g["lstm/lstm_cell.kernel"], weight_grad(model, model.get_layer("lstm").cell.kernel,
                                                  ids, lambda y: y[:, 0].sum()))
    with pytest.raises(gp.GradprobeError, match="inputs"):
        gp.gradients(model, ids, 0, "inputs")


class Looped(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.pre = layers.Dense(4, name="pre")
        self.step = layers.Dense(4, activation="tanh", name="step")
        self.out = layers.Dense(3, name="out")

    def call(self, x):
        return self.out(keras.ops.fori_loop(0, 3, lambda i, h: self.step(h), self.pre(x)))


def test_layer_inside_keras_loop_is_reported_as_on_tensorflow():
    keras.utils.set_random_seed(10)
    model = Looped()
    x = np.random.default_rng(11).normal(size=(2, 4)).astype("float32")
    model(x)
    with pytest.raises(gp.GradprobeError, match=r"'step'.*control flow \(fori_loop\)"):
        gp.gradients(model, x, 0, "step")
    g = gp.gradients(model, x, 0, "*")
    assert list(g) == ["pre", "out"]
    assert any(s.startswith("step: ") for s in g.skipped)
    close(g["step.kernel"] if "step.kernel" in g else gp.gradients(model, x, 0, "step.kernel")[
        "step.kernel"], weight_grad(model, model.step.kernel, x, lambda y: y[:, 0].sum()))


@pytest.mark.parametrize("form", ["int", "ints", "predicted", "loss", "callable"])
def test_target_forms(form):
    model = mlp()
    x = np.random.default_rng(6).normal(size=(3, 5)).astype("float32")
    y = np.array([1, 3, 0])
    out = arr(model(x))
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    yt = torch.as_tensor(y)
    target, objective = {
        "int": (3, lambda o: o[:, 3].sum()),
        "ints": (y, lambda o: o.gather(1, yt[:, None]).sum()),
        "predicted": ("predicted", lambda o: o.max(dim=1).values.sum()),
        "loss": (gp.loss(sce, y), lambda o: torch.nn.functional.cross_entropy(o, yt)),
        "callable": (lambda o: keras.ops.sum(o[:, 1] ** 2), lambda o: (o[:, 1] ** 2).sum()),
    }[form]
    g = gp.gradients(model, x, target, ["h", "out.bias"])
    close(g["out.bias"], weight_grad(model, model.get_layer("out").bias, x, objective), 1e-5)
    close(g["h"], grad_at(lambda v: objective(model.get_layer("out")(v)),
                          model.get_layer("h")(x)), 1e-5)
    if form == "int":
        close(g.target, out[:, 3])


# ------------------------------------------------------------ gp.at positions
def sequence_model():
    """A token classifier: (batch, 5 steps, 3 features) -> (batch, 5, 4 classes)."""
    keras.utils.set_random_seed(12)
    return keras.Sequential([keras.Input((5, 3)), layers.Dense(6, activation="tanh", name="h"),
                             layers.Dense(4, name="out")])


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


@pytest.mark.parametrize("form", ["fixed_last", "each_position_each_class", "predicted",
                                  "predicted_log_prob", "last_with_mask"])
def test_position_targets_against_autograd(form):
    model = sequence_model()
    x = np.random.default_rng(13).normal(size=(3, 5, 3)).astype("float32")
    out = arr(model(x))
    before = snapshot(model)
    target, pos, cls, log_prob = position_case(form, out)
    rows = torch.arange(3)

    def objective(y):
        scores = y[rows, torch.as_tensor(pos)]
        if log_prob:
            scores = torch.log_softmax(scores, dim=-1)
        return scores[rows, torch.as_tensor(cls)].sum()

    g = gp.gradients(model, x, target, ["h", "out.kernel", "inputs"])
    close(g["h"], grad_at(lambda v: objective(model.get_layer("out")(v)),
                          model.get_layer("h")(x)), 1e-5, form)
    close(g["out.kernel"], weight_grad(model, model.get_layer("out").kernel, x, objective),
          1e-5, form)
    tv, ntv = values(model)
    close(g["inputs"], grad_at(lambda v: objective(model.stateless_call(tv, ntv, v)[0]), x),
          1e-5, form)
    scores = torch.as_tensor(out[np.arange(3), pos])
    if log_prob:
        scores = torch.log_softmax(scores, dim=-1)
    close(g.target, arr(scores)[np.arange(3), cls], 1e-6, form)
    assert_sacred(model, before)


def test_position_target_errors():
    model = sequence_model()
    x = np.random.default_rng(14).normal(size=(3, 5, 3)).astype("float32")
    with pytest.raises(gp.GradprobeError, match="position"):
        gp.gradients(model, x, gp.at(5, 0), "h")  # 5 steps: positions -5..4
    with pytest.raises(gp.GradprobeError, match="target"):
        gp.gradients(model, x, gp.at(0, 4), "h")  # 4 classes
    with pytest.raises(gp.GradprobeError, match="sequence output"):
        gp.gradients(mlp(), np.ones((2, 5), "float32"), gp.at(0, 1), "h")


def test_unconnected_raise_and_zero():
    keras.utils.set_random_seed(23)
    inp = keras.Input((4,))
    trunk = layers.Dense(3, name="trunk")(inp)
    model = keras.Model(inp, {"a": layers.Dense(2, name="a")(trunk),
                              "b": layers.Dense(2, name="b")(trunk)})
    x = np.ones((2, 4), "float32")
    before = snapshot(model)
    with pytest.raises(gp.GradprobeError, match=r"does not depend on 1 requested source.*'b'"):
        gp.gradients(model, x, 0, ["trunk", "b"], output="a")
    g = gp.gradients(model, x, 0, ["trunk", "b", "b.kernel"], output="a", unconnected="zero")
    assert g.unconnected == ("b", "b.kernel")
    assert not np.any(arr(g["b"])) and not np.any(arr(g["b.kernel"]))
    assert np.any(arr(g["trunk"]))
    assert_sacred(model, before)


def test_options_and_refusals():
    model = mlp()
    x = np.random.default_rng(8).normal(size=(3, 5)).astype("float32")
    ref = gp.gradients(model, x, 0, ["h", "out.kernel"], compile=False)
    for compile in ("auto", True):
        g = gp.gradients(model, x, 0, ["h", "out.kernel"], compile=compile)
        for k in ref:
            close(g[k], ref[k], 0.0, k)
    with pytest.raises(gp.GradprobeError) as info:
        gp.GradientMonitor()
    assert "gp.GradientMonitor" in str(info.value) and "'torch'" in str(info.value)
    model.get_layer("out").kernel.assign(np.zeros((6, 4), "float32"))  # weights read per call
    assert not np.any(arr(gp.gradients(model, x, 0, "h")["h"]))


class Stopped(keras.Model):
    def __init__(self):
        super().__init__()
        self.d1 = layers.Dense(3, name="d1")
        self.d2 = layers.Dense(2, name="d2")

    def call(self, x):
        return self.d2(keras.ops.stop_gradient(self.d1(x)))


def test_stop_gradient_counts_as_unconnected():
    model = Stopped()
    x = np.ones((2, 4), "float32")
    model(x)
    with pytest.raises(gp.GradprobeError, match="d1"):
        gp.gradients(model, x, 0, ["d1", "d2"])
    g = gp.gradients(model, x, 0, ["d1.kernel", "d2.kernel"], unconnected="zero")
    assert g.unconnected == ("d1.kernel",)
    assert not np.any(arr(g["d1.kernel"])) and np.any(arr(g["d2.kernel"]))


def test_write_report_without_attribution(tmp_path):
    # The report itself runs on PyTorch (its attribution maps need gp.saliency/gp.grad_cam).
    model = mlp()
    x = np.random.default_rng(21).normal(size=(4, 5)).astype("float32")
    before = snapshot(model)
    path = gp.write_report(str(tmp_path / "report.html"), model, x, 1, attribution=False)
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert f"PyTorch {torch.__version__}" in text and "TensorFlow" not in text
    for key in ("h.kernel", "out.bias"):
        assert key in text
    with pytest.raises(gp.GradprobeError, match="exists"):
        gp.write_report(path, model, x, 1, attribution=False)
    assert_sacred(model, before)
