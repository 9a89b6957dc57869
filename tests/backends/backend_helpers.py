"""Helpers shared by the backend tests (tests/backends/test_*.py): array
comparison and the models several of them use. Imports no backend library."""

import keras
import numpy as np
from keras import layers


def arr(t):
    """A NumPy array of a JAX array, a PyTorch tensor (detached, on the CPU) or an array."""
    if hasattr(t, "detach"):  # a torch.Tensor
        return t.detach().cpu().numpy()
    return np.asarray(t)


def close(a, b, tol=1e-5, what=""):
    """`a` equals `b` within `tol` times max(1, max |b|) (absolute below 1)."""
    a, b = arr(a).astype(np.float64), arr(b).astype(np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = max(1.0, float(np.abs(b).max()) if b.size else 1.0)
    err = float(np.abs(a - b).max()) if a.size else 0.0
    assert err <= tol * scale, f"{what}: max error {err} (scale {scale})"


def rel_close(a, b, rtol=1e-6, what=""):
    """`a` equals `b` within `rtol` times max |b| (relative, for float64 oracles)."""
    a, b = arr(a).astype(np.float64), arr(b).astype(np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = max(float(np.abs(b).max()), 1e-12)
    err = float(np.abs(a - b).max())
    assert err <= rtol * scale, f"{what}: max error {err} (scale {scale})"


class Twice(keras.Model):
    """A subclassed model calling one Dense layer twice."""

    def __init__(self):
        super().__init__(name="twice")
        self.shared = layers.Dense(3, activation="tanh", name="shared")
        self.head = layers.Dense(2, name="head")

    def call(self, x):
        return self.head(self.shared(self.shared(x)) * 2.0)
