"""`diagnose()` on JAX and PyTorch: the planted cases of tests/test_diagnose.py
(deep sigmoid stack, exploding init, dead ReLU units) and two healthy models,
with the same 10x margins. Under any other backend the module is skipped."""

import keras
import numpy as np
from backend_helpers import skip_unless_jax_or_torch
from keras import layers as L

import gradprobe as gp
from gradprobe.core.stats import EXPLODING, VANISHING

skip_unless_jax_or_torch()

ALL = ["inputs", "*", "*.weights"]
TIGHT = {"vanishing": VANISHING * 10, "exploding": EXPLODING / 10}


def _x(*shape):
    return np.random.default_rng(0).normal(size=shape).astype("float32")


def _stack(depth, width, activation, init="glorot_uniform", inputs=16, seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((inputs,))]
                            + [L.Dense(width, activation=activation, kernel_initializer=init,
                                       name=f"d{i}") for i in range(depth)]
                            + [L.Dense(10, name="out")])


def _depth(findings):
    return {(f.kind, f.key): f.value for f in findings if f.kind in ("vanishing", "exploding")}


def test_planted_vanishing_exploding_and_dead():
    g = gp.gradients(_stack(10, 32, "sigmoid"), _x(32, 16), 0, ALL)
    found = _depth(g.diagnose())
    assert found.get(("vanishing", "d0"), 1) < VANISHING / 10, found
    assert found.get(("vanishing", "d0.kernel"), 1) < VANISHING / 10, found
    assert {k for k, _ in found} == {"vanishing"}

    init = keras.initializers.RandomNormal(stddev=4 / np.sqrt(32))
    g = gp.gradients(_stack(10, 32, None, init, inputs=32, seed=2), _x(32, 32), 0, ALL)
    found = _depth(g.diagnose())
    assert found.get(("exploding", "d0"), 0) > EXPLODING * 10, found
    assert {k for k, _ in found} == {"exploding"}

    model = _stack(4, 32, "relu", "he_normal", seed=11)
    bias = model.get_layer("d2").bias
    b = np.zeros(bias.shape, "float32")
    b[:24] = -100.0
    bias.assign(b)
    found = gp.gradients(model, _x(32, 16), 0, ALL).diagnose()
    dead = {f.key: f.value for f in found if f.kind == "dead"}
    assert dead.get("d2.kernel", 0) >= 24 / 32 and not _depth(found), found


def test_healthy_mlp_and_cnn_stay_silent():
    keras.utils.set_random_seed(4)
    cnn = keras.Sequential([
        keras.Input((16, 16, 1)), L.Conv2D(8, 3, activation="relu", name="c1"),
        L.MaxPooling2D(name="p1"), L.Conv2D(16, 3, activation="relu", name="c2"),
        L.GlobalAveragePooling2D(name="gap"), L.Dense(10, name="out")])
    for model, x in ((_stack(6, 64, "relu", "he_normal", inputs=20, seed=3), _x(32, 20)),
                     (cnn, _x(16, 16, 16, 1))):
        g = gp.gradients(model, x, 0, ALL)
        assert _depth(g.diagnose(**TIGHT)) == {}, _depth(g.diagnose(**TIGHT))
        assert [f for f in g.diagnose() if f.kind != "dead"] == []
