"""Fixtures shared by the backend tests (tests/backends/test_*.py). The shared
helpers (`close`, `Twice`, ...) are in `backend_helpers.py`: test modules import
them from there, as a conftest module is not meant to be imported.

Nothing here imports `jax` or `torch` at import time: the test modules of the
other backend skip themselves, and only the JAX backend imports `jax` (lazily).
"""

import keras
import pytest


@pytest.fixture
def x64(float64):
    """float64 Keras models (the `float64` fixture of tests/conftest.py); on JAX also
    `jax_enable_x64` (without it JAX truncates float64 to float32). Restores the
    previous settings afterwards."""
    if keras.backend.backend() != "jax":
        yield
        return
    import jax

    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)
