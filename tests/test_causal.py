"""Interventions and threads (TensorFlow; the backend-neutral tests are in
tests/backends/test_common_causal.py): while one thread runs `gp.intervene`, another
thread calling the model, or asking for its gradients, sees the model's own
behaviour; the intervention sees only its own thread's forward pass."""

import threading

import keras
import numpy as np

import gradprobe as gp
from gradprobe.core import _patch
from tolerance import assert_close


def test_other_threads_see_the_model_unchanged_while_an_intervention_runs():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="hidden"),
                              keras.layers.Dense(2, name="out")])
    x = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    expected_grad = gp.gradients(model, x, 0, "inputs").numpy()["inputs"]
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def held(a):  # runs in the intervening thread, in the middle of its forward pass
        inside.set()
        assert release.wait(30)
        return a * 0.0

    def intervene():
        seen["intervened"] = keras.ops.convert_to_numpy(
            gp.intervene(model, x, set={"hidden": held}).outputs)

    worker = threading.Thread(target=intervene)
    worker.start()
    try:
        assert inside.wait(30)
        seen["direct"] = keras.ops.convert_to_numpy(model(x))
        seen["grad"] = gp.gradients(model, x, 0, "inputs", compile=False).numpy()["inputs"]
    finally:
        release.set()
        worker.join(30)
    np.testing.assert_array_equal(seen["direct"], expected)
    assert_close(seen["grad"], expected_grad, "float32")
    bias = keras.ops.convert_to_numpy(model.get_layer("out").bias)
    np.testing.assert_array_equal(seen["intervened"], np.broadcast_to(bias, (2, 2)))
    assert _patch.active_wrappers() == 0
    assert all(layer.__dict__.get("call") is None for layer in model.layers)
