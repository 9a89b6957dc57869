import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def float64():
    """Builds models in float64 for the finite-difference oracle."""
    old, old_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(old)
        keras.config.set_dtype_policy(old_policy)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
