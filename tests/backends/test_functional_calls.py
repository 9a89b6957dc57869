"""What a warm `gp.gradients` call does on JAX and PyTorch (the functional
capture, `gradprobe.core.capture.functional`): counted, never timed.

Run with `KERAS_BACKEND=torch` or `KERAS_BACKEND=jax python -m pytest
tests/backends`; skipped on TensorFlow. After the first call of a request, a
call hooks only the layers it probes (and the `output=` layer), and keeps
Keras' variable lists between calls, asking Keras again when a layer's
`trainable` flag changed (and then giving the right gradients: the positions
of the requested weights move). Oracles: closed-form gradients of linear
layers and the backend's own gradient code.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() not in ("jax", "torch"):
    pytest.skip("functional-capture tests: run with KERAS_BACKEND=jax or torch",
                allow_module_level=True)

from backend_helpers import arr, close  # noqa: E402
from backend_helpers import oracle as backend_oracle  # noqa: E402
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402
from gradprobe.core.capture.recorder import FunctionalRecorder  # noqa: E402

B = backend_oracle()  # the backend's own gradient code (jax.grad, torch.autograd.grad)


def linear():
    """Two linear Dense layers (the gradients have closed forms)."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((4,))
    h = layers.Dense(3, name="d0")(inp)
    return keras.Model(inp, layers.Dense(2, name="d1")(h))


def data():
    return np.random.default_rng(6).normal(size=(5, 4)).astype("float32")


def oracle(model, x):
    """Gradients of the summed class-0 score: d1.kernel[:, 0] = sum of d0's
    outputs, d0.kernel = outer(sum of x, d1.kernel[:, 0])."""
    w0, b0 = (arr(v.value) for v in model.get_layer("d0").weights)
    w1 = arr(model.get_layer("d1").kernel.value)
    h = x @ w0 + b0
    g1 = np.zeros_like(w1)
    g1[:, 0] = h.sum(0)
    return {"d1.kernel": g1, "d0.kernel": np.outer(x.sum(0), w1[:, 0])}


@pytest.fixture
def hooks(monkeypatch):
    """The layer ids each `_Recorder.hook` call saw, in order."""
    seen = []
    original = FunctionalRecorder.hook

    def counted(self, layer, outputs, *rest):
        seen.append(layer.name)
        return original(self, layer, outputs, *rest)

    monkeypatch.setattr(FunctionalRecorder, "hook", counted)
    return seen


@pytest.mark.parametrize("wrt, output, expected", [
    ("*.weights", None, []),           # weight owners: hooked by discovery only
    ("inputs", None, []),
    ("d0", None, ["d0"]),
    (["d0", "d1.kernel"], None, ["d0"]),
    ("d0.kernel", "d0", ["d0"]),       # the output= layer
])
def test_a_warm_call_hooks_only_the_layers_it_probes(hooks, wrt, output, expected):
    model, x = linear(), data()
    first = gp.gradients(model, x, 0, wrt, output=output, compile=False)
    if wrt != "inputs":  # (no layer to discover for the input alone)
        assert hooks, "the first call discovers the layers through the hook"
    hooks.clear()
    again = gp.gradients(model, x, 0, wrt, output=output, compile=False)
    assert hooks == expected
    assert list(again) == list(first)
    for k in again:
        close(again[k], first[k], 1e-6, k)
    if "d1.kernel" in again:
        close(again["d1.kernel"], oracle(model, x)["d1.kernel"], 1e-5, "d1.kernel")


def test_variable_lists_kept_between_calls(monkeypatch):
    model, x = linear(), data()
    asked = []
    cls = type(model)
    for name in ("trainable_variables", "non_trainable_variables"):
        prop = getattr(cls, name)
        monkeypatch.setattr(cls, name, property(
            lambda self, prop=prop, name=name: asked.append(name) or prop.fget(self)))
    gp.gradients(model, x, 0, "d1.kernel")
    asked.clear()
    for _ in range(3):
        gp.gradients(model, x, 0, "d1.kernel")
    assert asked == []
    model.get_layer("d0").trainable = False
    gp.gradients(model, x, 0, "d1.kernel")
    assert sorted(set(asked)) == ["non_trainable_variables", "trainable_variables"]


@pytest.mark.parametrize("compile", [True, False])
def test_trainable_flag_change_moves_the_requested_weights(compile):
    """The requested weights' positions in Keras' lists move when a layer before
    them stops being trainable: the gradients must follow (they used to come
    out for another variable's slot, silently wrong)."""
    model, x = linear(), data()
    want = oracle(model, x)
    for step, frozen in enumerate([False, True, False]):
        model.get_layer("d0").trainable = not frozen
        g = gp.gradients(model, x, 0, ["d1.kernel", "d0.kernel"], compile=compile)
        for k in ("d1.kernel", "d0.kernel"):
            close(g[k], want[k], 1e-5, f"{k} (step {step}, d0 frozen: {frozen})")
    assert model.get_layer("d0").trainable


class LoopAfter(keras.Model):
    """`step` called once outside a Keras loop, then inside it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.pre = layers.Dense(4, name="pre")
        self.step = layers.Dense(4, activation="tanh", name="step")
        self.out = layers.Dense(3, name="out")

    def head(self, a):
        return self.out(keras.ops.fori_loop(0, 2, lambda i, h: self.step(h), a))

    def call(self, x):
        return self.head(self.step(self.pre(x)))


def test_probed_call_outside_a_loop_of_the_same_layer():
    """The call outside the loop is probed on every call, the loop's calls
    never (the control-flow test runs on each probed layer call, cached per
    code object on PyTorch). Oracle: the backend's gradient of the loop and
    head at the activation."""
    keras.utils.set_random_seed(12)
    model = LoopAfter()
    x = np.random.default_rng(13).normal(size=(2, 4)).astype("float32")
    model(x)
    a = arr(model.step(model.pre(x)))
    want = B.grad(lambda v: model.head(v)[:, 0].sum())(a)
    for _ in range(2):  # the first call prepares; the second is a warm run
        g = gp.gradients(model, x, 0, "step", compile=False)
        assert list(g) == ["step"]
        close(g["step"], want, 1e-5, "step")
        close(g.activations["step"], a, 1e-6, "activation")
    g = gp.gradients(model, x, 0, "*", compile=False)
    assert list(g) == ["pre", "step", "out"]
    close(g["step"], want, 1e-5, "step (with every layer)")
