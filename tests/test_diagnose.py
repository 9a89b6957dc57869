"""`diagnose()` on planted cases and on healthy untrained models (issue 23, item 5).

Vanishing and exploding are ratios across depth (see `gradprobe.core.stats.diagnose`).
A planted case must pass its default threshold by >= 10x and a healthy model must
stay >= 10x inside both defaults, so the outcome does not hinge on float noise,
oneDNN kernels or the CPU: healthy models are checked with thresholds 10x tighter
than the defaults (`vanishing=10 * VANISHING`, `exploding=EXPLODING / 10`).
"""

import keras
import numpy as np
import pytest
from keras import layers as L

import gradprobe as gp
from gradprobe.core.stats import EXPLODING, VANISHING, diagnose, tensor_stats
from gradprobe.errors import GradprobeError

ALL = ["inputs", "*", "*.weights"]  # activation, weight and input gradients
TIGHT = {"vanishing": VANISHING * 10, "exploding": EXPLODING / 10}


def _x(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _stack(depth, width, activation, init="glorot_uniform", inputs=16, seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((inputs,))]
                            + [L.Dense(width, activation=activation, kernel_initializer=init,
                                       name=f"d{i}") for i in range(depth)]
                            + [L.Dense(10, name="out")])


def _targets(n):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return {"class 0": 0, "loss": gp.loss(loss, np.arange(n) % 10)}


def _depth_findings(findings):
    return {(f.kind, f.key): f.value for f in findings if f.kind in ("vanishing", "exploding")}


# ----------------------------------------------------------------- planted cases
@pytest.mark.parametrize("target", ["class 0", "loss"])
def test_deep_sigmoid_stack_is_vanishing_with_defaults(target):
    model, x = _stack(10, 32, "sigmoid"), _x(32, 16)
    g = gp.gradients(model, x, _targets(32)[target], ALL)
    found = _depth_findings(g.diagnose())
    # the first layers, activations and kernels, ten times past the default threshold
    for key in ("d0", "d0.kernel", "d1", "d1.kernel"):
        assert found.get(("vanishing", key), 1.0) < VANISHING / 10, (key, found)
    # the layers nearest the target are the reference, never flagged; no bias is judged
    assert not {k for _, k in found} & {"d7", "d8", "d9", "d9.kernel", "out", "inputs"}
    assert not any(k.endswith(".bias") for _, k in found)
    assert {kind for kind, _ in found} == {"vanishing"}
    message = next(f.message for f in g.diagnose() if f.key == "d0")
    assert "vanishing gradient" in message and "nearest the target" in message


def test_the_old_rule_missed_a_moderate_sigmoid_stack():
    """Eight sigmoid layers: the gradient shrinks ~4.5x a layer, ~10^4 from the
    last hidden layer to the first; the old default (1e-3 of the median of all
    later layers) said nothing."""
    model, x = _stack(8, 32, "sigmoid"), _x(32, 16)
    g = gp.gradients(model, x, 0, "*")
    st = g.stats()
    assert st["d7"]["mean_abs"] / st["d0"]["mean_abs"] > 3e3
    found = _depth_findings(g.diagnose())
    assert found.get(("vanishing", "d0"), 1.0) < VANISHING / 10, found


@pytest.mark.parametrize("target", ["class 0", "loss"])
def test_exploding_init_deep_linear_stack(target):
    # weights 4x larger than variance-preserving: the gradient grows ~4x a layer toward the input
    init = keras.initializers.RandomNormal(stddev=4 / np.sqrt(32))
    model, x = _stack(10, 32, None, init, inputs=32, seed=2), _x(32, 32)
    g = gp.gradients(model, x, _targets(32)[target], ALL)
    found = _depth_findings(g.diagnose())
    assert found.get(("exploding", "d0"), 0.0) > EXPLODING * 10, found
    assert {kind for kind, _ in found} == {"exploding"}
    # a kernel's gradient is (activation x gradient): activations shrink as fast toward
    # the input as the gradient grows, so kernels are not exploding
    assert not any(k.endswith("kernel") for _, k in found)
    # the keyword thresholds are the ratios: a looser one silences it
    worst = max(found.values())
    assert not _depth_findings(g.diagnose(exploding=worst * 2))


def test_planted_scale_step_flags_only_the_layers_before_it():
    keras.utils.set_random_seed(0)
    model = _stack(6, 8, "tanh", inputs=8, seed=0)
    k = model.get_layer("d3").kernel
    k.assign(k * 1e-5)
    g = gp.gradients(model, _x(16, 8), 0, "d*")
    found = _depth_findings(g.diagnose())
    assert {k for _, k in found} == {"d0", "d1", "d2"}, found
    assert all(kind == "vanishing" and v < 1e-4 for (kind, _), v in found.items())


def test_dead_relu_layer():
    model, x = _stack(4, 32, "relu", "he_normal", seed=11), _x(32, 16)
    bias = model.get_layer("d2").bias
    b = np.zeros(bias.shape, "float32")
    b[:24] = -100.0  # 24 of 32 units never fire
    bias.assign(b)
    g = gp.gradients(model, x, 0, ALL)
    found = g.diagnose()
    dead = {f.key: f.value for f in found if f.kind == "dead"}
    assert dead.get("d2.kernel", 0) >= 24 / 32, found
    assert not _depth_findings(found), found

    b[:] = -100.0  # all-negative bias: the whole layer is dead, nothing below gets a signal
    bias.assign(b)
    found = gp.gradients(model, x, 0, ALL).diagnose()
    kinds = {f.key: f.kind for f in found}
    for key in ("inputs", "d0", "d0.kernel", "d1", "d2.kernel", "d2.bias"):
        assert kinds.get(key) == "zero", found
    assert not _depth_findings(found), found


# --------------------------------------------------------------- healthy models
def _relu_mlp():
    return _stack(6, 64, "relu", "he_normal", inputs=20, seed=3), _x(32, 20)


def _cnn():
    keras.utils.set_random_seed(4)
    return keras.Sequential([
        keras.Input((16, 16, 1)), L.Conv2D(8, 3, activation="relu", name="c1"),
        L.MaxPooling2D(name="p1"), L.Conv2D(16, 3, activation="relu", name="c2"),
        L.MaxPooling2D(name="p2"), L.Flatten(name="flat"),
        L.Dense(32, activation="relu", name="fc"), L.Dense(10, name="out")]), _x(32, 16, 16, 1)


def _cnn_gap():
    """A first layer on a large map, then global average pooling: each entry's
    gradient is 1/(48*48) of the pooled one (the L2 norm drops 48x, the sum does not)."""
    keras.utils.set_random_seed(13)
    return keras.Sequential([
        keras.Input((48, 48, 3)), L.Conv2D(8, 3, padding="same", activation="relu", name="c1"),
        L.Conv2D(8, 3, padding="same", activation="relu", name="c2"),
        L.GlobalAveragePooling2D(name="gap"), L.Dense(10, name="out")]), _x(8, 48, 48, 3)


def _batchnorm():
    keras.utils.set_random_seed(6)
    inp = keras.Input((20,))
    h = inp
    for i in range(4):
        h = L.Dense(64, name=f"d{i}")(h)  # a bias before BatchNormalization: its gradient
        h = L.BatchNormalization(name=f"bn{i}")(h)  # cancels exactly in training mode
        h = L.Activation("relu", name=f"r{i}")(h)
    return keras.Model(inp, L.Dense(10, name="out")(h)), _x(32, 20)


def _resnet():
    keras.utils.set_random_seed(7)
    inp = keras.Input((12, 12, 3))
    h = L.Conv2D(16, 3, padding="same", activation="relu", name="stem")(inp)
    for i in range(3):
        r = L.Conv2D(16, 3, padding="same", activation="relu", name=f"b{i}a")(h)
        r = L.Conv2D(16, 3, padding="same", name=f"b{i}b")(r)
        h = L.Activation("relu", name=f"relu{i}")(L.Add(name=f"add{i}")([h, r]))
    h = L.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(inp, L.Dense(10, name="out")(h)), _x(8, 12, 12, 3)


def _transformer():
    keras.utils.set_random_seed(8)
    inp = keras.Input((12, 16))
    h = L.Dense(32, name="proj")(inp)
    for i in range(2):
        a = L.MultiHeadAttention(4, 8, name=f"mha{i}")(h, h)
        h = L.LayerNormalization(name=f"ln{i}a")(L.Add(name=f"add{i}a")([h, a]))
        f = L.Dense(32, name=f"ff{i}b")(L.Dense(64, activation="relu", name=f"ff{i}a")(h))
        h = L.LayerNormalization(name=f"ln{i}b")(L.Add(name=f"add{i}b")([h, f]))
    h = L.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(inp, L.Dense(10, name="out")(h)), _x(8, 12, 16)


def _text():
    keras.utils.set_random_seed(9)
    inp = keras.Input((20,), dtype="int32")
    h = L.Embedding(1000, 16, name="emb")(inp)  # rows absent from the batch: zero gradient
    h = L.Conv1D(32, 3, activation="relu", name="conv")(h)
    h = L.GlobalMaxPooling1D(name="gmp")(h)
    h = L.Dense(16, activation="tanh", name="fc")(h)
    ids = np.random.default_rng(0).integers(0, 1000, size=(16, 20)).astype("int32")
    return keras.Model(inp, L.Dense(10, name="out")(h)), ids


HEALTHY = {"relu_mlp_he": _relu_mlp, "cnn": _cnn, "cnn_gap": _cnn_gap, "batchnorm": _batchnorm,
           "resnet": _resnet, "transformer": _transformer, "text": _text}


@pytest.mark.parametrize("name, training", [(n, False) for n in sorted(HEALTHY)]
                         + [("batchnorm", True)])
def test_healthy_models_stay_silent(name, training):
    model, x = HEALTHY[name]()
    wrt = ["*", "*.weights"] if x.dtype.kind == "i" else ALL
    for target in _targets(len(x)).values():
        g = gp.gradients(model, x, target, wrt, training=training)
        assert {g.kinds[k] for k in g} >= {"activation", "weight"}
        # 10x inside both default thresholds
        assert _depth_findings(g.diagnose(**TIGHT)) == {}, _depth_findings(g.diagnose(**TIGHT))
        # ReLU units that are off for every example of a batch of noise are real
        # "dead on this batch" findings at initialisation; nothing else is reported
        found = [f for f in g.diagnose() if f.kind != "dead"]
        assert found == [], found
        if name in ("resnet", "transformer", "cnn_gap") or (name == "batchnorm" and training):
            assert g.diagnose() == []


# ------------------------------------------------------------- rule and keywords
def _act(rows, value):
    return np.full((rows, 8), value, "float32")


def _run(arrays, kinds=None, **kw):
    stats = {k: tensor_stats(a) for k, a in arrays.items()}
    kinds = kinds or dict.fromkeys(arrays, "activation")
    return diagnose(stats, kinds, arrays, **kw)


def test_reference_is_the_median_of_the_window_nearest_the_target():
    arrays = {"a": _act(4, 1e-3), "b": _act(4, 1.0), "c": _act(4, 100.0), "d": _act(4, 1.0),
              "e": _act(4, 1.0)}
    found = {(f.kind, f.key): f.value for f in _run(arrays)}
    # a vs median(c, d, e) = 1 -> 1e-3 < 1e-2; b vs the same median -> 1, fine;
    # c vs median(d, e) = 1 -> 100, below exploding=1e3
    assert found == {("vanishing", "a"): pytest.approx(1e-3)}
    found = {(f.kind, f.key): f.value for f in _run(arrays, window=1, exploding=50)}
    assert found == {("vanishing", "a"): pytest.approx(1e-3), ("exploding", "c"): 100.0}


def test_inputs_heads_biases_and_vectors_are_not_judged():
    arrays = {"inputs": _act(4, 1e-9), "h1": _act(4, 1.0), "h2": _act(4, 1.0),
              "out": _act(4, 1e-9), "k1": np.full((8, 8), 1e-9, "float32"),
              "k1b.bias": np.full((8, 8), 1e-9, "float32"),
              "g.gamma": np.full((8,), 1e-9, "float32"),
              "k2": np.ones((8, 8), "float32")}
    kinds = {"inputs": "input", "h1": "activation", "h2": "activation", "out": "activation",
             "k1": "weight", "k1b.bias": "weight", "g.gamma": "weight", "k2": "weight"}
    found = {(f.kind, f.key) for f in _run(arrays, kinds, heads=("out",))}
    assert found == {("vanishing", "k1")}
    # without `heads`, the output layer is h2's reference: h2 looks exploding
    found = {(f.kind, f.key) for f in _run(arrays, kinds)}
    assert ("exploding", "h2") in found


def test_weight_size_ignores_zero_rows():
    """An embedding table whose rows mostly received no token: only the non-zero
    entries count (the RMS over all entries would be 100x smaller)."""
    emb = np.zeros((10000, 8), "float32")
    emb[:1] = 1.0
    arrays = {"emb.embeddings": emb, "k": np.ones((8, 8), "float32")}
    assert _run(arrays, dict.fromkeys(arrays, "weight")) == []


@pytest.mark.parametrize("kw, name", [
    ({"vanishing": 2.0}, "vanishing"), ({"vanishing": 0}, "vanishing"),
    ({"exploding": 0.5}, "exploding"), ({"exploding": float("inf")}, "exploding"),
    ({"window": 0}, "window"), ({"window": 2.5}, "window"), ({"window": True}, "window")])
def test_bad_keywords_name_the_argument(kw, name):
    model, x = _stack(2, 4, "tanh", inputs=3), _x(4, 3)
    g = gp.gradients(model, x, 0, "*")
    for call in (lambda: g.diagnose(**kw), lambda: _run({"a": _act(2, 1.0)}, **kw)):
        with pytest.raises(GradprobeError, match=name) as err:
            call()
        assert "Received" in str(err.value)


@pytest.mark.parametrize("kw, name", [({"vanishng": 1e-3}, "vanishng"),
                                      ({"vanishing": 2.0}, "vanishing"),
                                      ({"window": 0}, "window")])
def test_monitor_diagnose_checks_its_keywords(kw, name):
    model = _stack(2, 4, "tanh", inputs=3)
    model.compile(optimizer="sgd", loss="mse")
    x = _x(8, 3)
    monitor = gp.GradientMonitor()
    model.fit(x, np.zeros((8, 1), "float32"), batch_size=4, epochs=1, verbose=0,
              callbacks=[monitor])
    assert isinstance(monitor.diagnose(vanishing=1e-3, exploding=1e4, window=2), list)
    with pytest.raises(GradprobeError, match=name) as err:
        monitor.diagnose(**kw)
    assert "Received" in str(err.value)
