"""gp.gradients on the PyTorch backend of Keras 3: what only PyTorch has (float64
finite differences of NumPy code, the refusals). The tests that are the same on
JAX and PyTorch are in test_common_gradients.py.

Run with `KERAS_BACKEND=torch python -m pytest tests/backends`. Under any other
backend the module is skipped before `torch` is imported.

Oracles: float64 central finite differences; compile=False as the reference of
the compiled forms.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":
    pytest.skip("PyTorch backend tests: run with KERAS_BACKEND=torch", allow_module_level=True)

from backend_helpers import arr, close, tanh_mlp  # noqa: E402
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402


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


def test_options_and_refusals():
    model = tanh_mlp()
    x = np.random.default_rng(8).normal(size=(3, 5)).astype("float32")
    ref = gp.gradients(model, x, 0, ["h", "out.kernel"], compile=False)
    for compile in ("auto", True):
        g = gp.gradients(model, x, 0, ["h", "out.kernel"], compile=compile)
        for k in ref:
            close(g[k], ref[k], 0.0, k)
    model.get_layer("out").kernel.assign(np.zeros((6, 4), "float32"))  # weights read per call
    assert not np.any(arr(gp.gradients(model, x, 0, "h")["h"]))
