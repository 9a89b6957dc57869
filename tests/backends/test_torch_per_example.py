"""gp.gradients(..., per_example=...) on the PyTorch backend of Keras 3: what only
PyTorch has (no vmap: per_example="vmap" is refused). The per-example tests that
are the same on JAX and PyTorch (the loop of single-example passes, the
Jacobian of the batched pass) are in test_common_per_example.py.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":
    pytest.skip("PyTorch backend tests: run with KERAS_BACKEND=torch", allow_module_level=True)

from backend_helpers import embedding_model  # noqa: E402

import gradprobe as gp  # noqa: E402


def test_refusals_name_the_argument():
    model = embedding_model()
    ids = np.array([[1, 2, 1, 3, 1], [0, 0, 0, 0, 0], [6, 5, 4, 3, 2]], "int32")
    with pytest.raises(gp.GradprobeError, match="needs a per-example target"):
        gp.gradients(model, ids, lambda y: y.sum(), "out.kernel", per_example=True)
    with pytest.raises(gp.GradprobeError, match="Received: per_example='vmap'"):
        gp.gradients(model, ids, 0, "out.kernel", per_example="vmap")
