"""Concurrent gradprobe calls on one model (and on several models), while other
threads call the model directly: each call sees only its own thread's forward
pass, every result equals the single-threaded result of the same request, no
wrapper outlives the calls, and the model is unchanged."""

from __future__ import annotations

import threading

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import gradprobe as gp
from gradprobe.core import _patch
from tolerance import assert_close


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    h = layers.Dense(8, activation="tanh", name="h")(inp)
    shared = layers.Dense(8, activation="tanh", name="shared")
    s = shared(shared(h))
    return keras.Model(inp, layers.Dense(3, name="out")(s))


def _all_layers(model):
    return [model, *model._flatten_layers(include_self=False, recursive=True)]


def _fingerprint(model, x):
    model(x)  # Keras marks a model as called on its first call
    return {
        "vars": [v.numpy().copy() for v in model.variables],
        "attrs": [{k: id(v) for k, v in vars(layer).items()} for layer in _all_layers(model)],
        "out": model(x).numpy(),
    }


def _assert_unchanged(model, x, before):
    for layer in _all_layers(model):
        assert "call" not in vars(layer), f"wrapper left on {layer.name}"
    assert _patch.active_wrappers() == 0
    for a, b in zip(model.variables, before["vars"]):
        np.testing.assert_array_equal(a.numpy(), b)
    assert [{k: id(v) for k, v in vars(layer).items()} for layer in _all_layers(model)] \
        == before["attrs"]
    np.testing.assert_array_equal(model(x).numpy(), before["out"])


def _requests(model, x):
    """name -> zero-argument function computing one request (numpy results)."""
    v_kernel = np.linspace(-1, 1, 24).reshape(8, 3).astype("float32")
    v_h = np.linspace(-1, 1, 4 * 8).reshape(4, 8).astype("float32")

    def tape():
        with gp.Tape(model, watch=["h", "shared"]) as t:
            y = model(x)
            loss = tf.reduce_sum(y[:, 1]) + tf.reduce_sum(t.activation("h") ** 2)
        return t.gradient(loss, ["h", "shared", "out.kernel"])

    return {
        "compiled": lambda: gp.gradients(model, x, 0, ["h", "shared", "out.kernel"]),
        "eager": lambda: gp.gradients(model, x, 2, ["shared", "inputs"], compile=False,
                                      unconnected="zero"),
        "saliency": lambda: gp.saliency(model, x, 1),
        "ig": lambda: gp.integrated_gradients(model, x, 2, steps=8),
        "tape": tape,
        "hvp_weights": lambda: gp.hvp(model, x, 0, "out.kernel", v_kernel),
        "hvp_act": lambda: gp.hvp(model, x, 1, "h", v_h),
    }


def _flat(result):
    if isinstance(result, dict):
        return {k: _flat(v) for k, v in result.items()}
    if isinstance(result, list):
        return [_flat(v) for v in result]
    if hasattr(result, "keys") and hasattr(result, "__getitem__"):
        return {k: np.asarray(result[k]) for k in result}
    return np.asarray(result)


def _assert_same(got, want, where):
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (where, list(got), list(want))
        for k in want:
            _assert_same(got[k], want[k], f"{where}[{k}]")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert_close(got, want, "float32", what=where)


def _run_threads(workers, rounds):
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(workers))

    def body(work):
        try:
            barrier.wait()
            for i in range(rounds):
                work(i)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=body, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_concurrent_requests_on_one_model_see_only_their_own_forward_pass():
    model = _model()
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    requests = _requests(model, x)
    # Single-threaded references (this also traces the compiled functions once;
    # the threads then trace new shapes of their own, see below).
    expected = {name: _flat(fn()) for name, fn in requests.items()}
    plain = model(x).numpy()
    model.predict(x, verbose=0)  # Keras keeps its predict function as an attribute
    before = _fingerprint(model, x)
    # A second batch shape, first traced while the other threads run.
    x6 = np.random.default_rng(1).normal(size=(6, 6)).astype("float32")
    want6 = _flat(gp.gradients(model, x6, 1, ["h", "shared"], compile=False))
    checked = {name: 0 for name in requests} | {"direct": 0, "new_shape": 0}
    lock = threading.Lock()

    def count(name):
        with lock:
            checked[name] += 1

    def worker(names):
        def work(i):
            name = names[i % len(names)]
            _assert_same(_flat(requests[name]()), expected[name], name)
            count(name)
        return work

    def direct(i):
        assert_close(model(x).numpy(), plain, "float32")
        if i % 5 == 0:
            assert_close(model.predict(x, verbose=0), plain, "float32")
        count("direct")

    def new_shape(i):
        if i % 4 == 0:
            gp.clear_cache()  # forces new traces while other threads run
        _assert_same(_flat(gp.gradients(model, x6, 1, ["h", "shared"])), want6, "new_shape")
        count("new_shape")

    workers = [worker(["compiled", "eager"]), worker(["saliency", "ig"]),
               worker(["tape", "hvp_act"]), worker(["hvp_weights", "compiled"]),
               direct, new_shape]
    _run_threads(workers, rounds=40)
    assert sum(checked.values()) == 6 * 40
    assert all(checked.values()), checked
    _assert_unchanged(model, x, before)


def test_models_first_traced_concurrently_keep_no_wrapper():
    # Six models, first traced at the same time; they share one backbone layer
    # (several heads on one feature extractor), so their captures overlap on it.
    keras.utils.set_random_seed(4)
    backbone = layers.Dense(8, activation="tanh", name="backbone")
    models = []
    for i in range(6):
        inp = keras.Input((6,))
        h = layers.Dense(8, activation="relu", name=f"own{i}")(backbone(inp))
        models.append(keras.Model(inp, layers.Dense(3, name=f"head{i}")(h)))
    x = np.random.default_rng(2).normal(size=(3, 6)).astype("float32")
    before = [_fingerprint(m, x) for m in models]
    results = [None] * len(models)

    def worker(i):
        def work(_):
            results[i] = _flat(gp.gradients(models[i], x, 0, "*"))
        return work

    _run_threads([worker(i) for i in range(len(models))], rounds=1)
    for m, b in zip(models, before):
        _assert_unchanged(m, x, b)
    for m, got in zip(models, results):
        want = _flat(gp.gradients(m, x, 0, "*", compile=False))
        _assert_same(got, want, m.name)


def test_a_thread_calling_the_model_is_not_recorded_by_another_threads_tape():
    model = _model()
    x = np.random.default_rng(3).normal(size=(2, 6)).astype("float32")
    inside = threading.Event()
    done = threading.Event()
    seen = {}

    def other():
        inside.wait()
        seen["out"] = model(x).numpy()  # runs while the tape below is recording
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with gp.Tape(model, watch=["h"]) as tape:
        inside.set()
        done.wait()
        y = model(x)
    t.join()
    assert tape.keys() == ["h"]  # one call: the other thread's pass is not recorded
    np.testing.assert_array_equal(seen["out"], y.numpy())
    assert _patch.active_wrappers() == 0


def test_hooks_registered_for_all_threads_see_other_threads():
    layer = layers.Dense(2)
    layer.build((None, 3))
    calls = []
    x = tf.ones((1, 3))
    with _patch.wrapped_calls([layer], lambda lay, out, a, k: calls.append(1) or out,
                              threads="all"):
        t = threading.Thread(target=lambda: layer(x))
        t.start()
        t.join()
    with _patch.wrapped_calls([layer], lambda lay, out, a, k: calls.append(2) or out):
        t = threading.Thread(target=lambda: layer(x))
        t.start()
        t.join()
    assert calls == [1]
    assert "call" not in vars(layer)


def test_a_mirrored_strategy_replica_thread_runs_on_behalf_of_the_registering_thread():
    # MirroredStrategy runs each replica of a `fit` step in a thread of this class
    # (tensorflow/python/distribute/mirrored_run.py) while the calling thread waits.
    class _MirroredReplicaThread(threading.Thread):
        pass

    layer = layers.Dense(2)
    layer.build((None, 3))
    calls = []
    x = tf.ones((1, 3))
    with _patch.wrapped_calls([layer], lambda lay, out, a, k: calls.append("hooked") or out):
        for cls in (_MirroredReplicaThread, threading.Thread):
            t = cls(target=lambda: layer(x))
            t.start()
            t.join()
    assert calls == ["hooked"]  # the replica thread is hooked, a plain thread is not
    assert "call" not in vars(layer)
