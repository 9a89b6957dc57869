"""The docstring examples of src/gradprobe on JAX and PyTorch: those whose heading
names the backend (`Example (JAX):`) and the unmarked ones. On TensorFlow,
tests/test_doctests.py runs them; here the module is skipped.
"""

import keras
import pytest

from test_doctests import params, run_docstring

pytestmark = pytest.mark.skipif(keras.backend.backend() not in ("jax", "torch"),
                                reason="tests/test_doctests.py runs them on TensorFlow")


@pytest.mark.parametrize("test", params(keras.backend.backend()))
def test_docstring_examples_run(test, tmp_path, monkeypatch):
    run_docstring(test, tmp_path, monkeypatch)
