"""The GradientMonitor in a newcomer's first hour: one spelling of a variable
(the monitor's history, CSV, TensorBoard tags and `gp.gradients` agree, and a
lookup by another spelling works or names the close match), an unbuilt
subclassed model that simply trains, and a CSV never replaced without
`overwrite=True`. TensorFlow only (the monitor runs there)."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest

if keras.backend.backend() != "tensorflow":
    pytest.skip("the GradientMonitor runs on TensorFlow only", allow_module_level=True)

import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 4)).astype("float32"), rng.integers(0, 3, size=n)


def _sequential():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), layers.Dense(5, activation="tanh", name="dense"),
                             layers.Dense(3, name="head")], name="seq")


class Block(layers.Layer):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.inner = layers.Dense(5, activation="tanh", name="inner")

    def call(self, x):
        return self.inner(x)


class Sub(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.block = Block(name="block")
        self.head = layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.block(x))


def _hand_norms(model, x, y):
    """The L2 norm of each trainable variable's gradient on (x, y), by tape."""
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=True))
    grads = tape.gradient(loss, [v.value for v in model.trainable_weights])
    return [float(np.linalg.norm(g.numpy().astype(np.float64))) for g in grads]


# ------------------------------------------------------------ one spelling
@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
def test_history_keys_are_gp_gradients_keys(kind, tmp_path):
    model = _sequential() if kind == "sequential" else Sub(name="sub")
    x, y = _data()
    if kind == "subclassed":
        model(x[:1])
    model.compile(keras.optimizers.SGD(0.0), LOSS)
    csv_path = str(tmp_path / "g.csv")
    monitor = gp.GradientMonitor(csv=csv_path)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    g = gp.gradients(model, x[:16], gp.loss(LOSS, y[:16]),
                     "*.weights")
    assert list(monitor.history) == list(g)
    expected = (["dense.kernel", "dense.bias", "head.kernel", "head.bias"] if kind == "sequential"
                else ["block/inner.kernel", "block/inner.bias", "head.kernel", "head.bias"])
    assert list(g) == expected
    with open(csv_path) as f:
        header = f.readline().strip().split(",")
    assert header[3:8] == [f"{expected[0]}/{s}" for s in gp.monitor.STATS]
    steps, history = gp.monitor.read_csv(csv_path)
    assert list(history) == expected
    # Every spelling of each variable finds the same record, in the monitor's
    # history and in the CSV read back; lr=0, so the hand gradients of the
    # first batch are those of step 1.
    hand = _hand_norms(model, x[:16], y[:16])
    for v, key, norm in zip(model.trainable_weights, expected, hand):
        owner, _, name = key.rpartition(".")
        for spelling in (key, v.path, f"{owner}/{name}", v.path.split("/", 1)[1]):
            assert spelling in monitor.history, spelling
            assert np.isclose(monitor.history[spelling]["norm"][0], norm, rtol=1e-5), spelling
            assert monitor.history.get(spelling) is monitor.history[key]
            assert np.isclose(history[spelling]["norm"][0], norm, rtol=1e-5), spelling
    if kind == "subclassed":  # a unique suffix, as selectors take it
        assert monitor.history["inner.kernel"] is monitor.history["block/inner.kernel"]


def test_a_lookup_that_matches_nothing_names_the_close_match():
    model = _sequential()
    model.compile(keras.optimizers.SGD(0.01), LOSS)
    x, y = _data(16)
    monitor = gp.GradientMonitor()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    with pytest.raises(KeyError) as info:
        monitor.history["dense.kernal"]
    assert isinstance(info.value, gp.GradprobeError)
    assert "Did you mean 'dense.kernel'" in str(info.value)
    assert "dense.kernal" not in monitor.history and monitor.history.get("x") is None
    with pytest.raises(gp.GradprobeError, match=re.escape(
            "'kernel' names 2 recorded sources; index one of them: 'dense.kernel', "
            "'head.kernel'")):
        monitor.history["kernel"]


def test_a_csv_of_an_older_version_is_looked_up_by_the_new_spelling(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("step,seq/dense/kernel/norm,seq/head/kernel/norm\n1,0.5,2.0\n2,0.25,1.0\n")
    steps, history = gp.monitor.read_csv(str(path))
    assert steps.tolist() == [1, 2]
    assert history["dense.kernel"]["norm"].tolist() == [0.5, 0.25]
    assert history["seq/head/kernel"]["norm"].tolist() == [2.0, 1.0]
    with pytest.raises(KeyError, match="Did you mean"):
        history["head.kernal"]


def test_variables_selected_and_differentiated_by_their_keras_path():
    model = _sequential()
    model.compile(keras.optimizers.SGD(0.0), LOSS)
    x, y = _data(16)
    paths = [v.path for v in model.trainable_weights]  # "seq/dense/kernel", ...
    monitor = gp.GradientMonitor(layers=[paths[2], "dense"])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert list(monitor.history) == ["dense.kernel", "dense.bias", "head.kernel"]
    target = gp.loss(LOSS, y)
    g = gp.gradients(model, x, target, [paths[2], "dense/kernel"])
    assert list(g) == ["dense.kernel", "head.kernel"]
    assert np.isclose(float(np.linalg.norm(np.asarray(g[paths[2]]))),
                      monitor.history["head.kernel"]["norm"][0], rtol=1e-5)
    with pytest.raises(gp.GradprobeError, match="no layer named 'dense/kernal'"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[gp.GradientMonitor(layers="dense/kernal")])


# ------------------------------------------------------------ unbuilt model
@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
@pytest.mark.parametrize("kind", ["subclassed", "sequential without Input"])
def test_an_unbuilt_model_simply_trains_and_is_recorded_from_step_1(kind, run_eagerly):
    keras.utils.set_random_seed(0)
    model = Sub(name="sub") if kind == "subclassed" else keras.Sequential(
        [layers.Dense(5, activation="tanh"), layers.Dense(3, name="head")])
    assert not model.built
    model.compile(keras.optimizers.SGD(0.0), LOSS, run_eagerly=run_eagerly)
    x, y = _data(32)
    monitor = gp.GradientMonitor()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    own = model.train_function
    assert monitor.steps.tolist() == [1, 2]
    assert int(model.optimizer.iterations.numpy()) == 2
    assert len(monitor.history) == 4 == len(model.trainable_weights)
    for t in range(2):  # lr=0: the weights are the initial ones at every step
        hand = _hand_norms(model, x[16 * t:16 * (t + 1)], y[16 * t:16 * (t + 1)])
        for v, norm in zip(model.trainable_weights, hand):
            assert np.isclose(monitor.history[v.path]["norm"][t], norm, rtol=1e-5), (v.path, t)
    # A second fit continues with the same monitor; the model's own function is back.
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    assert monitor.steps.tolist() == [1, 2, 3, 4]
    assert model.train_function is own


class NeedsValues(keras.Model):
    """A model whose call needs concrete values: it cannot be built symbolically."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.head = layers.Dense(3, name="head")

    def call(self, x):
        scale = float(np.asarray(x).max())  # fails on a symbolic tensor
        return self.head(x * scale)


def test_a_model_that_cannot_be_built_from_shapes_says_the_fix():
    model = NeedsValues()
    model.compile(keras.optimizers.SGD(0.01), LOSS, run_eagerly=True)
    x, y = _data(16)
    with pytest.raises(gp.GradprobeError, match=re.escape("Call the model once on a batch "
                                                          "(model(x[:1])) before fit")):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[gp.GradientMonitor()])
    assert int(model.optimizer.iterations.numpy()) == 0  # no step ran
    model(x[:1])  # the fix
    monitor = gp.GradientMonitor()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.steps.tolist() == [1] and list(monitor.history) == ["head.kernel", "head.bias"]


# ------------------------------------------------------------ nothing is lost
def test_an_existing_csv_is_replaced_only_with_overwrite(tmp_path):
    path = tmp_path / "grads.csv"
    path.write_text("an earlier run\n")
    with pytest.raises(gp.GradprobeError, match=re.escape(
            f"Received: csv={str(path)!r}, which exists; pass overwrite=True to replace it")):
        gp.GradientMonitor(csv=str(path))
    assert path.read_text() == "an earlier run\n"
    with pytest.raises(gp.GradprobeError, match="Received: overwrite='yes'"):
        gp.GradientMonitor(csv=str(path), overwrite="yes")
    model = _sequential()
    model.compile(keras.optimizers.SGD(0.01), LOSS)
    x, y = _data(32)
    monitor = gp.GradientMonitor(csv=str(path), overwrite=True)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert gp.monitor.read_csv(str(path))[0].tolist() == [1, 2]
    # The same monitor's later fits continue its own file, with no flag.
    monitor.overwrite = False
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert gp.monitor.read_csv(str(path))[0].tolist() == [1, 2, 3, 4]
    # A file created after the monitor, before fit: checked again, nothing written.
    late = tmp_path / "late.csv"
    monitor = gp.GradientMonitor(csv=str(late))
    late.write_text("written meanwhile\n")
    with pytest.raises(gp.GradprobeError, match="pass overwrite=True"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert late.read_text() == "written meanwhile\n"


# ------------------------------------------------------------ exclude
def test_exclude_drops_variables_and_activation_layers_with_the_layers_selectors():
    model = _sequential()
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    x, y = _data(16)
    everything = gp.GradientMonitor()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[everything])
    all_keys = list(everything.history)
    # a layer name, a glob and a variable key; the layers' activations follow
    for exclude, gone in (("head", {"head.kernel", "head.bias"}),
                          (["*.bias"], {k for k in all_keys if k.endswith(".bias")}),
                          ("dense.kernel", {"dense.kernel"})):
        monitor = gp.GradientMonitor(exclude=exclude, activations=True)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
        assert list(monitor.history) == [k for k in all_keys if k not in gone], exclude
        layers_seen = set(monitor.activation_history)
        if exclude == "head":
            assert "head" not in layers_seen and "dense" in layers_seen
        else:  # a variable selector drops no layer's activation
            assert {"dense", "head"} <= layers_seen
    with_include = gp.GradientMonitor(layers="dense", exclude="dense.bias")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[with_include])
    assert list(with_include.history) == ["dense.kernel"]


def test_exclude_errors_name_the_argument():
    with pytest.raises(gp.GradprobeError, match=r"Expected exclude to be None, .*Received: exclude=3"):
        gp.GradientMonitor(exclude=3)
    model = _sequential()
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    x, y = _data(16)
    with pytest.raises(gp.GradprobeError, match="exclude: .*no layer named 'hed'"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[gp.GradientMonitor(exclude="hed")])
    with pytest.raises(gp.GradprobeError, match=r"layers \(less exclude\).*exclude=\['\*'\]"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[gp.GradientMonitor(exclude="*")])
    assert not hasattr(model.train_function, "_gradprobe_own_train_function")
