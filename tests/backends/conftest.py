"""Fixtures shared by the backend tests (tests/backends/test_*.py). The shared
helpers (`close`, `Twice`, ...) are in `backend_helpers.py`: test modules import
them from there, as a conftest module is not meant to be imported.

Nothing here imports `jax` or `torch` at import time: the test modules of the
other backend skip themselves, and only the JAX backend imports `jax` (lazily).
"""

import keras
import pytest


@pytest.fixture
def x64():
    """float64 Keras models; on JAX also `jax_enable_x64` (without it JAX truncates
    float64 to float32). Restores the previous settings afterwards."""
    old, old_policy = keras.config.floatx(), keras.config.dtype_policy()
    jax = None
    if keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(old)
        keras.config.set_dtype_policy(old_policy)
        if jax is not None:
            jax.config.update("jax_enable_x64", False)
