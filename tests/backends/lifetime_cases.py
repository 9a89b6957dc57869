"""How long a compiled request and a result live, on every backend (TensorFlow:
tests/test_lifetime.py; JAX and PyTorch: tests/backends/test_common_lifetime.py).

A compiled request lives exactly as long as its model (and its target callable,
where one is part of the key): the garbage collector never makes a living model
re-trace or rebuild, and a dead one leaves nothing behind. A result is freed as
soon as its last reference goes, without the garbage collector: a result in a
reference cycle stays in memory until the next full collection (gigabytes of
activations and gradients on a big model, whose pages the next call then has to
fault in again: issue 28's slow calls). Traces are counted, never timed: the
model's Python `call` runs only while a backend traces it (TensorFlow, JAX) and
on every call on PyTorch, which compiles nothing.
"""

import gc
import weakref

import keras
import numpy as np
import pytest

import gradprobe as gp
from gradprobe.core import cache

EAGER = keras.backend.backend() == "torch"  # PyTorch: every call runs `call` in Python


class Counting(keras.Model):
    """Dense -> ReLU -> BatchNormalization -> Dense, counting the Python runs of `call`."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.a = keras.layers.Dense(16, activation="relu", name="a")
        self.bn = keras.layers.BatchNormalization(name="bn")
        self.b = keras.layers.Dense(4, name="b")
        self.runs = 0

    def call(self, x, training=False):
        self.runs += 1
        return self.b(self.bn(self.a(x), training=training))


def _model():
    keras.utils.set_random_seed(0)
    model = Counting(name="counting")
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    model(x)
    return model, x


def _tensors(g):
    return [*g.values(), *g.activations.values(), g.target, *keras.tree.flatten(g.outputs)]


@pytest.mark.parametrize("call", ["gradients", "gradients_per_example", "saliency",
                                  "integrated_gradients"])
def test_a_result_is_freed_without_the_collector(call):
    model, x = _model()
    run = {
        "gradients": lambda: gp.gradients(model, x, 0, "*"),
        "gradients_per_example": lambda: gp.gradients(model, x, 0, ["a", "b.kernel"],
                                                      per_example=True),
        "saliency": lambda: gp.saliency(model, x, 0),
        "integrated_gradients": lambda: gp.integrated_gradients(model, x, 0, steps=4,
                                                                progress=False),
    }[call]
    gc.collect()
    gc.disable()
    try:
        for i in range(3):  # the first call (which traces) and the cached ones
            result = run()
            parts = _tensors(result) if call.startswith("gradients") else \
                [result.values, result.target]
            refs = [weakref.ref(t) for t in parts if t is not None]
            view = getattr(result, "activations", None)
            del result, parts, view
            alive = sum(r() is not None for r in refs)
            assert alive == 0, f"call {i}: {alive} of {len(refs)} tensors outlive the result"
    finally:
        gc.enable()


def test_a_view_does_not_keep_the_gradients_alive():
    model, x = _model()
    gc.disable()
    try:
        g = gp.gradients(model, x, 0, "*")
        grads = [weakref.ref(t) for t in g.values()]
        activations = g.activations
        del g
        assert all(r() is None for r in grads)
        assert np.asarray(activations["a"]).shape == (4, 16)  # the view still answers
    finally:
        gc.enable()


@pytest.mark.skipif(EAGER, reason="PyTorch traces nothing: `call` runs on every call")
def test_the_collector_never_makes_a_living_request_trace_again():
    model, x = _model()

    def first_unit(y):  # a callable target the caller keeps: part of the key
        return y[:, 0]

    loss = gp.loss("mse", np.zeros((4, 4), "float32"))
    targets = {"int": 2, "callable": first_unit, "loss": loss, "predicted": "predicted"}
    for target in targets.values():  # warm-up: one trace per request
        gp.gradients(model, x, target, "*")
    entries = {id(e) for e in cache.entries_by_model[model].values()}
    runs = model.runs
    for _ in range(4):
        for target in targets.values():
            gp.gradients(model, x, target, "*")
            gc.collect()
    assert model.runs == runs, f"{model.runs - runs} traces after the warm-up"
    assert {id(e) for e in cache.entries_by_model[model].values()} == entries  # nothing rebuilt


def test_requests_die_with_their_model_and_target():
    model, x = _model()

    def target(y):
        return y[:, 1]

    gp.gradients(model, x, target, "*")
    gp.gradients(model, x, 0, "a")
    assert all(cache.alive(k) for k in cache.entries_by_model[model])
    del target
    gc.collect()
    dead = [k for k in cache.entries_by_model[model] if not cache.alive(k)]
    assert len(dead) == 1  # the callable's request: never found again, pruned when the
    gp.gradients(model, x, 0, "b")  # next new request is cached
    assert all(cache.alive(k) for k in cache.entries_by_model[model])
    ref, models = weakref.ref(model), len(cache.entries_by_model)
    del model
    gc.collect()
    assert ref() is None
    assert len(cache.entries_by_model) == models - 1  # the model's requests went with it
