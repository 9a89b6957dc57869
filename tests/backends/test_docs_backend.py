"""The README's and docs/*.md's ```python blocks on JAX and PyTorch: every block that
is not marked for other backends only (see tests/doc_blocks.py). On TensorFlow,
tests/test_docs.py runs them; here the module is skipped.
"""

import keras
import pytest

import doc_blocks
from test_docs import params

pytestmark = pytest.mark.skipif(keras.backend.backend() not in ("jax", "torch"),
                                reason="tests/test_docs.py runs the blocks on TensorFlow")


@pytest.mark.parametrize("block", params(keras.backend.backend()))
def test_block_runs(block, tmp_path):
    doc_blocks.run(block, tmp_path)
