"""A request is resolved once: every public attribution call makes its target
once (`targets.make_target`, counted by a spy), its chunks and repeated copies
use views of that one target (`Target.take`), and `"predicted"` is fixed once
(`Target.fixed`); `targets.evaluate` is the one "call the model, select the
output, compute the target". Results against hand-written NumPy gradients of a
float64 two-layer model. Backend-neutral (runs on TensorFlow, JAX and PyTorch).
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import keras
import numpy as np
import pytest

import gradprobe as gp
from gradprobe.core import engine, targets
from tolerance import tolerance

N, D, H, C = 5, 4, 6, 3
# Keras computes some float64 ops in float32 on JAX and PyTorch (relative errors ~1e-7):
# there the tolerance is float32's (tests/tolerance.py), as rtol and as atol for values ~1
TOL = 1e-9 if keras.backend.backend() == "tensorflow" else tolerance("float32")


@pytest.fixture
def mlp(float64, request):
    """`out = tanh(x W1 + b1) W2 + b2` in float64, and its weights as arrays."""
    if keras.backend.backend() == "jax":  # (without x64, JAX computes float64 in float32)
        import jax

        jax.config.update("jax_enable_x64", True)
        request.addfinalizer(lambda: jax.config.update("jax_enable_x64", False))
    keras.utils.set_random_seed(3)
    inp = keras.Input((D,))
    h = keras.layers.Dense(H, activation="tanh", name="h")(inp)
    out = keras.layers.Dense(C, name="out")(h)
    model = keras.Model(inp, out)
    w = [keras.ops.convert_to_numpy(v) for v in model.weights]
    x = np.random.default_rng(0).normal(size=(N, D))
    return model, w, x


def _forward(w, x):
    w1, b1, w2, b2 = w
    h = np.tanh(x @ w1 + b1)
    return h, h @ w2 + b2


def _input_grad(w, x, dout):
    """d sum(out * dout) / dx, per example (`dout`: (n, C))."""
    w1, _, w2, _ = w
    h, _ = _forward(w, x)
    return ((dout @ w2.T) * (1 - h ** 2)) @ w1.T


def _ig(w, x, dout, steps):
    """Trapezoid Integrated Gradients from a zero baseline, in NumPy."""
    alphas = np.linspace(0.0, 1.0, steps)
    wk = np.full(steps, 1.0 / (steps - 1))
    wk[[0, -1]] *= 0.5
    total = sum(k * _input_grad(w, a * x, dout) for a, k in zip(alphas, wk))
    return x * total


def _onehot(classes):
    return np.eye(C)[np.asarray(classes)]


@pytest.fixture
def make_target_calls(monkeypatch):
    """Every call of `targets.make_target`, wherever gradprobe imported it."""
    for name in ("gradprobe.core.capture.functional", "gradprobe.core._functional_form",
                 "gradprobe.higher.per_example", "gradprobe.higher.hvp"):
        with contextlib.suppress(ImportError):  # (TensorFlow is optional)
            importlib.import_module(name)
    original = targets.make_target
    calls = []

    def spy(target, batch_size):
        calls.append(target)
        return original(target, batch_size)

    patched = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("gradprobe") and getattr(module, "make_target", None) is original:
            monkeypatch.setattr(module, "make_target", spy)
            patched += 1
    assert patched >= 3  # targets, engine, the attribution layer at least
    return calls


def _weights_y(x):
    return np.random.default_rng(1).normal(size=(len(x), C))


def _dout(form, w, x):
    """The target's d(objective)/d(outputs) per example, and the target argument."""
    if form == "int":
        return _onehot([2] * len(x)), 2
    if form == "classes":
        classes = [0, 2, 1, 1, 0][:len(x)]
        return _onehot(classes), classes
    if form == "predicted":
        return _onehot(np.argmax(_forward(w, x)[1], axis=-1)), "predicted"
    y = _weights_y(x)
    sw = np.linspace(0.5, 1.5, len(x))
    dot = lambda y_true, y_pred: keras.ops.sum(y_true * y_pred, axis=-1)  # noqa: E731
    return y * sw[:, None], gp.loss(dot, y, sample_weight=sw)


FORMS = ["int", "classes", "predicted", "loss"]


@pytest.mark.parametrize("form", FORMS)
def test_integrated_gradients_makes_its_target_once_over_chunks_and_steps(
        mlp, make_target_calls, form):
    model, w, x = mlp
    dout, target = _dout(form, w, x)
    # 5 examples x 6 steps = 30 rows in chunks of 4: 8 chunks, the last one padded,
    # each chunk holding copies of several examples (rows r % 5)
    ig = gp.integrated_gradients(model, x, target, steps=6, batch_size=4)
    assert len(make_target_calls) == 1, make_target_calls
    np.testing.assert_allclose(np.asarray(ig), _ig(w, x, dout, 6), rtol=TOL, atol=TOL)
    value = (_forward(w, x)[1] * dout).sum(axis=-1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ig.target), value, rtol=TOL,
                               atol=TOL)


def test_layer_integrated_gradients_makes_its_target_once(mlp, make_target_calls):
    model, w, x = mlp
    classes = [0, 2, 1, 1, 0]
    ig = gp.integrated_gradients(model, x, classes, steps=5, layer="h", batch_size=3)
    assert len(make_target_calls) == 1, make_target_calls
    # `out` is linear in `h`: the layer attributions are exact, (h(x) - h(0)) * W2[:, c]
    h_x, _ = _forward(w, x)
    h_0, _ = _forward(w, np.zeros_like(x))
    expect = (h_x - h_0) * w[2].T[classes]
    np.testing.assert_allclose(np.asarray(ig), expect, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("form", ["classes", "predicted"])
def test_saliency_and_smoothgrad_make_their_target_once(mlp, make_target_calls, form):
    model, w, x = mlp
    dout, target = _dout(form, w, x)
    maps = gp.saliency(model, x, target, absolute=False, batch_size=2)  # 3 chunks
    assert len(make_target_calls) == 1
    np.testing.assert_allclose(np.asarray(maps), _input_grad(w, x, dout), rtol=TOL, atol=TOL)
    gp.smoothgrad(model, x, target, samples=3, noise=0.1, seed=0, batch_size=4)
    assert len(make_target_calls) == 2


def test_smoothgrad_without_noise_averages_the_same_gradient(mlp):
    model, w, x = mlp
    dout, target = _dout("classes", w, x)
    maps = gp.smoothgrad(model, x, target, samples=3, noise=0.0, absolute=False,
                         batch_size=4)  # 15 rows in 4 chunks, each example in several
    np.testing.assert_allclose(np.asarray(maps), _input_grad(w, x, dout), rtol=max(TOL, 1e-7),
                               atol=max(TOL, 1e-9))


def test_grad_cam_makes_its_target_once(make_target_calls):
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inp)
    out = keras.layers.Dense(4, name="out")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 2)).astype("float32")
    gp.grad_cam(model, x, "predicted", "conv")
    assert len(make_target_calls) == 1


# ------------------------------------------------------------- target views
def test_class_target_view_takes_its_rows_and_keeps_its_key():
    tgt = targets.make_target([3, 1, 4, 1, 5], 5)
    rows = np.array([4, 0, 0, 2])
    view = tgt.take(rows)
    assert view is not tgt and view.cache_key == tgt.cache_key
    np.testing.assert_array_equal(view.classes, [5, 3, 3, 4])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(view.args["classes"]),
                                  [5, 3, 3, 4])
    np.testing.assert_array_equal(tgt.classes, [3, 1, 4, 1, 5])  # the target is untouched
    with pytest.raises(gp.GradprobeError, match=r"class 5 is out of range"):
        view.check({"num_classes": 5})  # (its own rows only: 5 is in the view)
    tgt.take(np.array([1, 3])).check({"num_classes": 5})


def test_loss_target_view_takes_labels_and_weights():
    y = np.array([0, 1, 2, 1])
    sw = np.array([0.1, 0.2, 0.3, 0.4])
    tgt = targets.make_target(gp.loss("sparse_categorical_crossentropy", y, sw), 4)
    view = tgt.take(np.array([3, 3, 0]))
    assert view.cache_key == tgt.cache_key
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(view.args["y_true"]), [1, 1, 0])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(view.args["sample_weight"]),
                               [0.4, 0.4, 0.1])
    np.testing.assert_array_equal(view.labels, [1, 1, 0])


def test_position_target_view_takes_positions_and_classes():
    tgt = targets.make_target(gp.at([0, 2, 1], [5, 6, 7]), 3)
    view = tgt.take(np.array([2, 0]))
    assert view.cache_key == tgt.cache_key
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(view.args["positions"]), [1, 0])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(view.args["classes"]), [7, 5])


def test_a_made_target_passes_through_make_target():
    tgt = targets.make_target(2, 4)
    assert targets.make_target(tgt, 4) is tgt
    assert targets.make_target(lambda y: y[:, 0], 4).take(np.arange(2)).kind == "callable"


def test_predicted_is_fixed_once_to_the_argmax_classes(mlp):
    model, w, x = mlp
    req = engine.resolve_request(model, x, "predicted")
    fixed = req.fixed()
    assert fixed.target.kind == "class" and req.target.kind == "predicted"
    np.testing.assert_array_equal(fixed.target.classes, np.argmax(_forward(w, x)[1], axis=-1))
    assert fixed.fixed() is fixed


def test_evaluate_calls_selects_and_computes(mlp):
    model, w, x = mlp
    tgt = targets.make_target([0, 2, 1, 1, 0], N)
    ev = targets.evaluate(model, keras.ops.convert_to_tensor(x), tgt)
    out = _forward(w, x)[1]
    expect = out[np.arange(N), [0, 2, 1, 1, 0]]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ev.value), expect, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(ev.objective)), expect.sum(),
                               rtol=TOL, atol=TOL)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ev.selected), out, rtol=TOL, atol=TOL)
    assert ev.meta == {"num_classes": C}
    # `output=` names a layer: the target is computed on that layer's activation
    h = _forward(w, x)[0]
    ev = targets.evaluate(model, keras.ops.convert_to_tensor(x), targets.make_target(4, N),
                          output="h", layer_value=lambda: keras.ops.convert_to_tensor(h))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ev.value), h[:, 4], rtol=TOL, atol=TOL)
