"""`gp.GradientMonitor` on every backend (TensorFlow, JAX, PyTorch), written once.

Run with `KERAS_BACKEND=tensorflow`, `jax` or `torch` `python -m pytest
tests/backends/test_common_monitor.py`; not skipped on any backend.
tests/test_monitor.py covers TensorFlow's own cases (strategies, retraces, the
in-graph fast paths).

Oracle (no gradprobe): with SGD without momentum, the gradient a step applied is
`(w_before - w_after) / lr`, from the weights a plain callback reads around the
step (`get_weights`). Float32 bound: `w_after = fl(w_before - fl(lr * g))`, so
each entry is off by at most eps * (|w| / lr + |g|); norms and max |g| are
compared within a multiple of eps of `||w|| / lr + ||g||` (tests/tolerance.py).
"""

from __future__ import annotations

import os
import struct
import warnings

import keras
import numpy as np
import pytest
from keras import layers

import gradprobe as gp
from gradprobe.core import _patch
from tolerance import assert_close, eps

BACKEND = keras.backend.backend()
LR = 0.1
# Every method the monitor may wrap, on any backend.
HOOKED = ("apply", "stateless_apply", "_backend_update_step", "_all_reduce_sum_gradients")
STEPS_PER_EXECUTION = [1] if BACKEND == "torch" else [1, 2]  # Keras: 1 on PyTorch


def _functional(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 1))
    h = layers.Conv2D(3, 3, activation="relu", name="conv")(inp)
    h = layers.Flatten(name="flat")(h)
    out = layers.Dense(2, name="dense")(h)
    return keras.Model(inp, out, name="fcnn")


def _sequential(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6, 6, 1)),
                             layers.Conv2D(3, 3, activation="tanh", name="conv"),
                             layers.MaxPooling2D(2, name="pool"),
                             layers.Flatten(name="flat"),
                             layers.Dense(2, name="dense")], name="scnn")


MODELS = {"functional": _functional, "sequential": _sequential}
KEYS = ["conv.kernel", "conv.bias", "dense.kernel", "dense.bias"]


def _data(n=40, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 6, 6, 1)).astype("float32"),
            rng.normal(size=(n, 2)).astype("float32"))


def _twin(make, model, **compile_kw):
    twin = make()
    twin.set_weights(model.get_weights())
    twin.compile(keras.optimizers.SGD(LR), "mse", **compile_kw)
    return twin


class Oracle(keras.callbacks.Callback):
    """The weights before and after each batch (one step per batch with
    steps_per_execution=1), read through Keras only."""

    def __init__(self):
        super().__init__()
        self.before, self.after = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append([np.asarray(w, np.float64) for w in self.model.get_weights()])

    def on_train_batch_end(self, batch, logs=None):
        self.after.append([np.asarray(w, np.float64) for w in self.model.get_weights()])

    def grads(self, step):
        """The gradients applied at `step` (1-based, as the monitor numbers them)."""
        return [(b - a) / LR for b, a in zip(self.before[step - 1], self.after[step - 1])]


def _assert_step(monitor, step, before, grads, factor=64):
    t = monitor.steps.tolist().index(step)
    for key, w, g in zip(KEYS, before, grads):
        h = monitor.history[key]
        scale = np.linalg.norm(w) / LR + np.linalg.norm(g)
        assert_close(h["norm"][t], np.linalg.norm(g), "float32", factor, scale=scale,
                     what=f"{key} norm at step {step}")
        assert_close(h["max_abs"][t], np.abs(g).max(), "float32", factor,
                     scale=np.abs(w).max() / LR + np.abs(g).max(),
                     what=f"{key} max_abs at step {step}")
        old = np.linalg.norm(w)
        ratio = LR * np.linalg.norm(g) / old if old else 0.0
        assert_close(h["update_ratio"][t], ratio, "float32", factor,
                     scale=ratio + eps("float32") * (1 + LR * np.linalg.norm(g)),
                     what=f"{key} update_ratio at step {step}")
        assert h["nonfinite"][t] == 0


def _no_hooks_left(model):
    assert _patch.active_wrappers() == 0
    for opt in (model.optimizer, getattr(model.optimizer, "inner_optimizer", None)):
        assert opt is None or not any(k in vars(opt) for k in HOOKED), vars(opt).keys()
    assert "train_step" not in vars(model)
    assert all("call" not in vars(layer) for layer in model.layers)
    assert not hasattr(model.train_function, "_gradprobe_own_train_function")


MODES = {"compiled": {}, "eager": {"run_eagerly": True}}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("kind", list(MODELS))
def test_recorded_gradients_are_the_applied_weight_differences(kind, every, mode):
    model = MODELS[kind]()
    model.compile(keras.optimizers.SGD(LR), "mse", **MODES[mode])
    x, y = _data()
    monitor, oracle = gp.GradientMonitor(every=every), Oracle()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[oracle, monitor])
    expected = [s for s in range(1, 6) if s % every == 0]
    assert monitor.steps.tolist() == expected
    assert monitor.skipped.tolist() == [0] * len(expected)
    for step in expected:
        _assert_step(monitor, step, oracle.before[step - 1], oracle.grads(step))
    assert monitor.first_nonfinite is None
    _no_hooks_left(model)


@pytest.mark.parametrize("mode", list(MODES))
def test_zero_fraction_and_dead_units_count_the_applied_zeros(mode):
    """Two hidden ReLU units held off by a large negative bias: their kernel
    columns, their biases and the output kernel's rows for them get exactly zero
    gradients. The recorded zero fraction and dead units (units of the last axis
    whose gradient is all zero) equal the counts in the applied weight
    differences (exact zeros: a zero gradient leaves the weight unchanged)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), layers.Dense(4, activation="relu", name="h"),
                              layers.Dense(2, name="o")])
    kernel, bias, *rest = model.get_weights()
    bias[[0, 2]] = -100.0
    model.set_weights([kernel, bias, *rest])
    model.compile(keras.optimizers.SGD(LR), "mse", **MODES[mode])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 5)).astype("float32"), rng.normal(size=(24, 2)).astype("float32")
    monitor, oracle = gp.GradientMonitor(), Oracle()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[oracle, monitor])
    keys = ["h.kernel", "h.bias", "o.kernel", "o.bias"]
    expected = {"h.kernel": (0.5, 2), "h.bias": (0.5, 2), "o.kernel": (0.5, 0),
                "o.bias": (0.0, 0)}
    for step in (1, 2, 3):
        for key, g in zip(keys, oracle.grads(step)):
            zero = g == 0
            units = zero.reshape(-1, g.shape[-1]).all(axis=0)
            h = monitor.history[key]
            assert h["zero_fraction"][step - 1] == zero.mean() == expected[key][0], key
            assert h["dead_units"][step - 1] == units.sum() == expected[key][1], key
    _no_hooks_left(model)


@pytest.mark.skipif(BACKEND == "torch", reason="Keras: steps_per_execution must be 1 on PyTorch")
@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("kind", list(MODELS))
def test_steps_per_execution_records_each_step_of_an_execution(kind, every):
    """Two steps per call of the train function: each recorded as the same model
    trained one step per call (the oracle's twin) applied it, and each pair
    sums to the weight difference around the execution."""
    make = MODELS[kind]
    model = make()
    twin = _twin(make, model)
    model.compile(keras.optimizers.SGD(LR), "mse", steps_per_execution=2)
    x, y = _data()
    oracle, pairs, monitor = Oracle(), Oracle(), gp.GradientMonitor(every=every)
    twin.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[oracle])
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[pairs, monitor])
    expected = [s for s in range(1, 6) if s % every == 0]
    assert monitor.steps.tolist() == expected
    for step in expected:
        # Two twins' trajectories agree to rounding: their difference goes into the scale.
        _assert_step(monitor, step, oracle.before[step - 1], oracle.grads(step), factor=256)
    if every == 1:  # executions (1, 2), (3, 4), (5): the recorded norms of each pair
        for e, (first, last) in enumerate([(1, 2), (3, 4)]):
            total = [(b - a) / LR for b, a in zip(pairs.before[e], pairs.after[e])]
            hand = [g1 + g2 for g1, g2 in zip(oracle.grads(first), oracle.grads(last))]
            for key, g, h in zip(KEYS, total, hand):
                scale = np.linalg.norm(pairs.before[e][KEYS.index(key)]) / LR
                assert_close(g, h, "float32", 256, scale=scale, what=key)
    _no_hooks_left(model)


@pytest.mark.skipif(BACKEND == "torch", reason="PyTorch: jit_compile has its own test below")
def test_jit_compile_records_the_applied_gradients():
    model = _functional()
    model.compile(keras.optimizers.SGD(LR), "mse", jit_compile=True)
    x, y = _data(24)
    monitor, oracle = gp.GradientMonitor(), Oracle()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[oracle, monitor])
    assert monitor.steps.tolist() == [1, 2, 3]
    for step in (1, 2, 3):
        _assert_step(monitor, step, oracle.before[step - 1], oracle.grads(step))
    _no_hooks_left(model)


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile: PyTorch only")
def test_torch_jit_compile_runs_the_monitored_steps_eagerly_and_says_so():
    model = _functional()
    model.compile(keras.optimizers.SGD(LR), "mse", jit_compile=True)
    x, y = _data(16)
    monitor, oracle = gp.GradientMonitor(), Oracle()
    with pytest.warns(RuntimeWarning, match="jit_compile=True on PyTorch.*eagerly"):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                  callbacks=[oracle, monitor])
    for step in (1, 2):
        _assert_step(monitor, step, oracle.before[step - 1], oracle.grads(step))
    assert model.jit_compile is True
    _no_hooks_left(model)


class PoisonAt(layers.Layer):
    """Multiplies its input by NaN at one training step (counted by the layer)."""

    def __init__(self, step, **kwargs):
        super().__init__(**kwargs)
        self.step = step

    def build(self, shape):
        self.count = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                     name="count")

    def call(self, x, training=False):
        if not training:
            return x
        self.count.assign(self.count + 1.0)
        poison = keras.ops.where(keras.ops.equal(self.count, float(self.step)), np.nan, 1.0)
        return x * poison


@pytest.mark.parametrize("steps_per_execution", STEPS_PER_EXECUTION)
@pytest.mark.parametrize("every", [1, 2])
def test_planted_nan_is_reported_at_its_step_and_stops(every, steps_per_execution):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 1)), layers.Conv2D(3, 3, name="conv"),
                              layers.Flatten(name="flat"), PoisonAt(3, name="poison"),
                              layers.Dense(2, name="dense")])
    model.compile(keras.optimizers.SGD(LR), "mse", steps_per_execution=steps_per_execution)
    x, y = _data()
    monitor = gp.GradientMonitor(every=every)
    with pytest.warns(RuntimeWarning, match=r"non-finite gradient \(NaN/Inf\) at step 3, "
                                            r"first in forward order in 'conv.kernel'"):
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[monitor])
    assert monitor.first_nonfinite == (3, "conv.kernel")
    # Training stopped after the execution holding step 3.
    last = 3 if steps_per_execution == 1 else 4
    assert int(np.asarray(model.optimizer.iterations)) == last
    assert monitor.steps.tolist() == [s for s in range(1, last + 1) if s % every == 0]
    if every == 1:
        assert monitor.history["conv.kernel"]["nonfinite"].tolist()[:3] == [0, 0, 27]
        assert monitor.history["conv.kernel"]["nonfinite"][:2].sum() == 0
    _no_hooks_left(model)


def test_csv_holds_the_history(tmp_path):
    model = _functional()
    model.compile(keras.optimizers.SGD(LR), "mse")
    x, y = _data()
    path = tmp_path / "grads.csv"
    monitor = gp.GradientMonitor(every=2, csv=path)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    steps, history = gp.monitor.read_csv(str(path))
    assert steps.tolist() == monitor.steps.tolist() == [2, 4, 6, 8, 10]
    for key in KEYS:
        for stat in ("norm", "max_abs", "zero_fraction", "nonfinite", "update_ratio"):
            assert np.allclose(history[key][stat], monitor.history[key][stat], rtol=1e-7)


def _events(folder):
    """(tag, step, simple_value or None) of every value in the event files of
    `folder`, read with the `tensorboard` package's protocol buffers alone."""
    from tensorboard.compat.proto import event_pb2

    out = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value if v.HasField("simple_value")
                            else None))
    return out


def test_tensorboard_scalars_and_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    model = _functional()
    model.compile(keras.optimizers.SGD(LR), "mse")
    x, y = _data(32)
    monitor = gp.GradientMonitor(log_dir=tmp_path / "logs", histograms=True)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    events = _events(tmp_path / "logs")
    tags = {tag for tag, _, _ in events}
    assert {f"gradients/{k}/{s}" for k in KEYS for s in gp.monitor.STATS} <= tags
    assert {f"gradients/{k}" for k in KEYS} <= tags  # histograms
    if BACKEND != "tensorflow":  # TensorFlow writes tensors, not simple values
        norms = [(step, v) for tag, step, v in events if tag == "gradients/dense.kernel/norm"]
        assert [s for s, _ in norms] == [1, 2, 3, 4]
        assert np.allclose([v for _, v in norms], monitor.history["dense.kernel"]["norm"],
                           rtol=1e-6)


def test_model_unchanged_and_a_later_plain_fit_matches_an_unmonitored_twin():
    model = _functional()
    model.compile(keras.optimizers.SGD(LR), "mse")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    own = model.train_function
    monitor = gp.GradientMonitor()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    assert model.train_function is own and len(monitor.steps) == 5
    _no_hooks_left(model)
    twin = _twin(_functional, model)
    twin.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)  # the same iteration count
    twin.set_weights(model.get_weights())
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    twin.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), twin.get_weights()):
        assert np.array_equal(a, b)
    assert model.train_function is own and len(monitor.steps) == 5


class Raise(keras.callbacks.Callback):
    def __init__(self, hook, error, at=2):
        super().__init__()
        self.error, self.at, self.calls = error, at, 0
        setattr(self, hook, self._maybe_raise)

    def _maybe_raise(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise self.error("boom")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("hook", ["on_train_batch_begin", "on_train_batch_end"])
def test_hooks_are_removed_when_a_callback_raises(hook, error, tmp_path):
    model = _functional()
    model.compile(keras.optimizers.SGD(LR), "mse")
    x, y = _data()
    model.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)
    own = model.train_function
    monitor = gp.GradientMonitor(csv=tmp_path / "g.csv")
    with pytest.raises(error, match="boom"):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                  callbacks=[monitor, Raise(hook, error)])
    assert model.train_function is own
    _no_hooks_left(model)
    # The monitor records again in the next fit, numbering on from the optimizer.
    start = int(np.asarray(model.optimizer.iterations))
    model.fit(x[:16], y[:16], batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.steps.tolist()[-2:] == [start + 1, start + 2]
    assert model.train_function is own
    _no_hooks_left(model)


def test_gradient_accumulation_records_the_applied_average():
    model = _functional()
    model.compile(keras.optimizers.SGD(LR, gradient_accumulation_steps=2), "mse")
    x, y = _data(32)
    monitor, oracle = gp.GradientMonitor(), Oracle()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[oracle, monitor])
    assert monitor.steps.tolist() == [1, 2, 3, 4]
    assert monitor.skipped.tolist() == [2, 0, 2, 0]
    for step in (2, 4):  # the applied steps: the average of the two steps' gradients
        _assert_step(monitor, step, oracle.before[step - 1], oracle.grads(step))
    assert np.all(monitor.history["dense.kernel"]["update_ratio"][[0, 2]] == 0)
    _no_hooks_left(model)


def test_loss_scale_overflow_steps_are_skipped_not_reported():
    model = _functional()
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR),
                                                    initial_scale=2.0 ** 127)
    model.compile(optimizer, "mse")
    x, y = _data(64)
    y = y * 10.0  # a loss of ~10 to 100: the scaled loss overflows float32 at scales >= 2**126
    monitor, oracle = gp.GradientMonitor(), Oracle()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[oracle, monitor])
    skipped, scales = monitor.skipped.tolist(), monitor.loss_scale.tolist()
    assert monitor.steps.tolist() == list(range(1, 9))
    assert skipped[:2] == [1, 1] and 0 in skipped, skipped
    assert monitor.first_nonfinite is None
    assert scales[:2] == [2.0 ** 127, 2.0 ** 126]
    assert all(b == a / 2 for a, b, s in zip(scales, scales[1:], skipped) if s == 1)
    assert monitor.history["dense.kernel"]["nonfinite"][0] > 0  # the overflowed gradients
    for step, code in zip(monitor.steps.tolist(), skipped):
        if code == 0:
            _assert_step(monitor, step, oracle.before[step - 1], oracle.grads(step))
        else:  # not applied: the weights did not move
            assert all(np.array_equal(b, a) for b, a in
                       zip(oracle.before[step - 1], oracle.after[step - 1]))
            assert np.all(monitor.history["dense.kernel"]["update_ratio"][step - 1] == 0)
    _no_hooks_left(model)


@pytest.mark.parametrize("steps_per_execution", STEPS_PER_EXECUTION)
@pytest.mark.parametrize("mode", list(MODES))
def test_activation_gradients_of_the_output_layer(mode, steps_per_execution):
    """The gradient of the mean squared error w.r.t. the output, by hand:
    2 (p - y) / size, from the predictions before each recorded step."""
    model = _functional()
    model.compile(keras.optimizers.SGD(LR), "mse", steps_per_execution=steps_per_execution,
                  **MODES[mode])
    x, y = _data(32)

    class Predictions(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.before = []

        def on_train_batch_begin(self, batch, logs=None):
            self.before.append(np.asarray(self.model.predict(x, verbose=0), np.float64))

    monitor, predictions = gp.GradientMonitor(layers=["dense"], activations=True, every=2), \
        Predictions()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[predictions, monitor])
    assert monitor.steps.tolist() == [2, 4]
    for t, step in enumerate([2, 4]):
        if steps_per_execution == 1:
            p = predictions.before[step - 1][(step - 1) * 8:step * 8]
            hand = 2.0 * (p - y[(step - 1) * 8:step * 8]) / p.size
            got = monitor.activation_history["dense"]["norm"][t]
            assert_close(got, np.linalg.norm(hand), "float32", scale=np.linalg.norm(hand),
                         what=f"step {step}")
        else:  # the second step of each execution: recorded, non-zero
            assert monitor.activation_history["dense"]["norm"][t] > 0
        assert monitor.activation_history["dense"]["nonfinite"][t] == 0
    _no_hooks_left(model)


def test_monitor_runs_without_warnings_on_a_plain_fit():
    model = _sequential()
    model.compile(keras.optimizers.SGD(LR), "mse")
    x, y = _data(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[gp.GradientMonitor()])


class ByHand(keras.Model):
    """Updates its weights by hand, without the optimizer: no hook sees its steps."""

    def __init__(self):
        super().__init__(name="by_hand")
        self.d = layers.Dense(2, name="d")

    def call(self, x):
        return self.d(x)

    if BACKEND == "jax":
        def train_step(self, state, data):
            trainable, non_trainable, optimizer, metrics = state
            return ({"loss": keras.ops.mean(data[0])},
                    ([v - 0.01 for v in trainable], non_trainable, optimizer, metrics))
    else:
        def train_step(self, data):
            self.d.kernel.assign(self.d.kernel - 0.01)
            return {"loss": keras.ops.mean(data[0])}


def test_steps_that_ran_without_the_hooks_are_an_error_or_a_warning_never_a_gap():
    model = ByHand()
    model(np.ones((1, 3), "float32"))
    model.compile(keras.optimizers.SGD(LR), "mse")
    x, y = np.ones((8, 3), "float32"), np.ones((8, 2), "float32")
    with pytest.raises(gp.GradprobeError, match=r"step 1 ran without the monitor's hooks"):
        model.fit(x, y, batch_size=4, verbose=0, callbacks=[gp.GradientMonitor()])
    _no_hooks_left(model)
    monitor = gp.GradientMonitor(on_nonfinite="warn")
    with pytest.warns(RuntimeWarning, match=r"step \d ran without the monitor's hooks"):
        model.fit(x, y, batch_size=4, verbose=0, callbacks=[monitor])
    assert len(monitor.steps) == 0
    _no_hooks_left(model)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow writes with tf.summary")
def test_log_dir_without_the_tensorboard_package_is_refused_with_the_fix(monkeypatch):
    from gradprobe.backends import _monitor_host

    def missing():
        raise ImportError("No module named 'tensorboard'")

    monkeypatch.setattr(_monitor_host, "_tensorboard_modules", missing)
    with pytest.raises(gp.GradprobeError, match=r"pip install tensorboard.*Received: log_dir='logs'\."):
        gp.GradientMonitor(log_dir="logs")
    gp.GradientMonitor(csv=None)  # without log_dir: no TensorBoard needed


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "loss_scale"])
def test_clipped_gradients_are_recorded_as_applied(scaled):
    """clipnorm: the recorded gradients are the clipped ones (on JAX under loss
    scaling, where the inner optimizer applies them inside lax.cond, too)."""
    model = _functional()
    optimizer = keras.optimizers.SGD(LR, clipnorm=0.05)
    if scaled:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2.0 ** 10)
    model.compile(optimizer, "mse")
    x, y = _data(24)
    monitor, oracle = gp.GradientMonitor(), Oracle()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[oracle, monitor])
    assert monitor.skipped.tolist() == [0, 0, 0]
    for step in (1, 2, 3):
        _assert_step(monitor, step, oracle.before[step - 1], oracle.grads(step))
    assert np.all(monitor.history["dense.kernel"]["norm"] <= 0.05 * (1 + 1e-5))
    assert np.any(monitor.history["dense.kernel"]["norm"] > 0.049)  # clipping was active
    _no_hooks_left(model)


_DISTRIBUTED = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, keras, numpy as np
import gradprobe as gp

mode = sys.argv[1]
devices = keras.distribution.list_devices("cpu")
assert len(devices) == 4
if mode == "dp":
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
else:  # a 2x2 mesh; d1's kernel split over "model", d2's over "batch"
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), devices)
    layouts = keras.distribution.LayoutMap(mesh)
    layouts[".*d1/kernel"] = (None, "model")
    layouts[".*d2/kernel"] = ("model", None)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch"))
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="tanh", name="d1"),
                          keras.layers.Dense(2, name="d2")])
model.compile(keras.optimizers.SGD(0.1), "mse")
if mode == "mp":
    kernel = [v for v in model.trainable_variables if v.path.endswith("d1/kernel")][0]
    assert len(kernel.value.sharding.device_set) == 4, kernel.value.sharding
rng = np.random.default_rng(0)
x = rng.normal(size=(32, 4)).astype("float32")
y = rng.normal(size=(32, 2)).astype("float32")

class Oracle(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.grads = []
    def on_train_batch_begin(self, batch, logs=None):
        self.before = [np.asarray(w, np.float64) for w in self.model.get_weights()]
    def on_train_batch_end(self, batch, logs=None):
        after = [np.asarray(w, np.float64) for w in self.model.get_weights()]
        self.grads.append([(b - a) / 0.1 for b, a in zip(self.before, after)])

monitor, oracle = gp.GradientMonitor(every=2, histograms=True, log_dir="logs"), Oracle()
model.fit(x, y, batch_size=8, verbose=0, shuffle=False, callbacks=[oracle, monitor])
assert monitor.steps.tolist() == [2, 4], monitor.steps
eps = float(np.finfo(np.float32).eps)
for t, step in enumerate((2, 4)):
    for key, g, w in zip(["d1.kernel", "d1.bias", "d2.kernel", "d2.bias"], oracle.grads[step - 1],
                         model.get_weights()):
        got = monitor.history[key]["norm"][t]
        # (w_after = fl(w - fl(lr g)): each entry off by eps (|w| / lr + |g|))
        bound = 64 * eps * (np.linalg.norm(w) / 0.1 + np.linalg.norm(g))
        assert abs(got - np.linalg.norm(g)) <= bound, (mode, key, step, got, np.linalg.norm(g))
        assert monitor.history[key]["nonfinite"][t] == 0
# The histogram copies of the last recorded step (step 4), whole, on the host.
copies = monitor._built[1].histogram_values()
for g, copy, w in zip(oracle.grads[3], copies, oracle.before):  # (before step 4)
    assert copy.shape == g.shape
    assert np.abs(copy - g).max() <= 64 * eps * (np.abs(w).max() / 0.1 + np.abs(g).max()), mode
print(mode, "distributed ok", gp.__file__)
"""


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on four CPU devices: JAX")
@pytest.mark.parametrize("mode", ["dp", "mp"])
def test_jax_distribution_records_the_global_gradients(tmp_path, mode):
    """DataParallel, and ModelParallel with a LayoutMap sharding both kernels:
    the recorded norms are those of the applied weight differences (global,
    not one shard's) on 4 host devices."""
    import subprocess
    import sys

    script = tmp_path / "distributed.py"
    script.write_text(_DISTRIBUTED)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src")
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([os.path.abspath(src),
                                           os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(script), mode], capture_output=True,
                            text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert f"{mode} distributed ok" in result.stdout
    assert os.path.abspath(src) in result.stdout  # this checkout's gradprobe


# ------------------------------------------------------------ replay: where a NaN starts
REPLAY_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _replay_model(kind, **compile_kw):
    """A model whose step 3 (batches of 10) makes a NaN: in the forward pass (a
    log of a negative number in layer 'log') or only in the backward pass (layer
    'sqrt': sqrt(|t|) of an exact zero is finite, its gradient 0 * inf is NaN;
    step 3's inputs are all zero, so its input `t` is zero whatever the weights)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((5,))
    h = layers.Dense(5, name="first", kernel_initializer="identity",
                     use_bias=kind != "backward")(inp)
    if kind == "forward":
        h = layers.Lambda(lambda t: keras.ops.log(t[:, :1] + 3.0) + t, name="log")(h)
    else:
        h = layers.Lambda(lambda t: keras.ops.sqrt(keras.ops.abs(t[:, :1])) + t,
                          name="sqrt")(h)
    model = keras.Model(inp, layers.Dense(3, name="last")(layers.Dense(4, name="mid")(h)))
    model.compile(keras.optimizers.SGD(0.01), REPLAY_LOSS, **compile_kw)
    x = np.random.default_rng(0).random((60, 5)).astype("float32") + 0.5
    x[20:30] = -100.0 if kind == "forward" else 0.0
    return model, x, np.zeros(60, dtype=int)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind,phase,layer", [("forward", "forward", "log"),
                                              ("backward", "backward", "sqrt")])
def test_replay_names_the_layer_where_the_nan_starts(kind, phase, layer, mode):
    model, x, y = _replay_model(kind, **MODES[mode])
    twin, _, _ = _replay_model(kind, **MODES[mode])
    twin.fit(x[:20], y[:20], batch_size=10, shuffle=False, verbose=0)  # steps 1 and 2 only
    monitor = gp.GradientMonitor(replay=True)
    with pytest.warns(RuntimeWarning, match=rf"step 3, .*Replay: it starts in the {phase} "
                                            rf"pass.*'{layer}'.*step 3 was not applied"):
        model.fit(x, y, batch_size=10, shuffle=False, verbose=0, callbacks=[monitor])
    origin = monitor.nonfinite_origin
    assert (origin.step, origin.phase, origin.layer) == (3, phase, layer), origin
    step, variable = monitor.first_nonfinite
    assert step == 3 and (kind == "forward" or variable == "first.kernel"), variable
    assert monitor.skipped.tolist() == [0, 0, 3]
    assert monitor.history[variable]["nonfinite"][2] > 0
    assert np.all(monitor.history[variable]["update_ratio"][2] == 0)
    # the model keeps the weights step 3 started from: those of a model fitted 2 steps
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 2
    for a, b in zip(model.get_weights(), twin.get_weights()):
        assert_close(a, b, "float32", 16)
    _no_hooks_left(model)


@pytest.mark.parametrize("mode", list(MODES))
def test_replay_leaves_healthy_training_as_without_the_monitor(mode):
    model, x, y = _replay_model("backward", **MODES[mode])
    twin, _, _ = _replay_model("backward", **MODES[mode])
    x[20:30] = 0.75  # no NaN anywhere
    monitor = gp.GradientMonitor(replay=True, every=2)
    model.fit(x, y, batch_size=10, shuffle=False, verbose=0, callbacks=[monitor])
    twin.fit(x, y, batch_size=10, shuffle=False, verbose=0)
    assert monitor.nonfinite_origin is None and monitor.first_nonfinite is None
    assert monitor.steps.tolist() == [2, 4, 6] and monitor.skipped.tolist() == [0, 0, 0]
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 6
    for a, b in zip(model.get_weights(), twin.get_weights()):
        assert_close(a, b, "float32", 16)
    _no_hooks_left(model)


def test_replay_refuses_what_it_cannot_replay_before_the_model_changes():
    with pytest.raises(gp.GradprobeError, match=r"on_nonfinite='stop' with replay=True"):
        gp.GradientMonitor(replay=True, on_nonfinite="warn")
    model, x, y = _replay_model("forward")
    model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01)),
                  REPLAY_LOSS)
    with pytest.raises(gp.GradprobeError, match=r"loss scaling.*replay=False"):
        model.fit(x, y, batch_size=10, verbose=0, callbacks=[gp.GradientMonitor(replay=True)])
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
    _no_hooks_left(model)
    if BACKEND == "jax":  # under a keras.distribution the update runs per device
        model, x, y = _replay_model("forward")
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        try:
            with pytest.raises(gp.GradprobeError, match=r"distribution strategy.*replay=False"):
                model.fit(x, y, batch_size=10, verbose=0,
                          callbacks=[gp.GradientMonitor(replay=True)])
        finally:
            keras.distribution.set_distribution(None)
        _no_hooks_left(model)
    if BACKEND != "torch":  # Keras refuses steps_per_execution > 1 on PyTorch itself
        model, x, y = _replay_model("forward", steps_per_execution=2)
        with pytest.raises(gp.GradprobeError, match=r"steps_per_execution=2.*replay=False"):
            model.fit(x, y, batch_size=10, verbose=0,
                      callbacks=[gp.GradientMonitor(replay=True)])
        assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
        _no_hooks_left(model)
