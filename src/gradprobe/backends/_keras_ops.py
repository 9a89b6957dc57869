"""The pieces of the backend interface that JAX and PyTorch compute the same way,
with `keras.ops` (TensorFlow has its own, which `tf.vectorized_map` converts)."""

from __future__ import annotations

from typing import Any

import keras


def argmax_int32(scores: Any) -> Any:
    """Each row's arg-max class, int32."""
    return keras.ops.cast(keras.ops.argmax(scores, axis=-1), "int32")


def per_row(x: Any, idx: Any) -> Any:
    """`x[i, idx[i]]` for each row `i` of a `(batch, n, ...)` tensor."""
    idx = keras.ops.expand_dims(idx, 1)
    rank = len(x.shape)
    if rank > 2:  # one index per row, broadcast over the trailing axes
        idx = keras.ops.reshape(idx, (-1,) + (1,) * (rank - 1))
        idx = keras.ops.broadcast_to(idx, (keras.ops.shape(x)[0], 1, *keras.ops.shape(x)[2:]))
    picked = keras.ops.take_along_axis(x, idx, axis=1)
    return keras.ops.squeeze(picked, axis=1)
