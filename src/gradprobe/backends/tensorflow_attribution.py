"""TensorFlow's compiled helpers for the streamed attribution methods
(`gradprobe.attribution._common.stream`: Integrated Gradients and SmoothGrad), and the
tape that `gp.grad_cam_layer` asks on TensorFlow (`grad_cam_records`).

On TensorFlow each chunk of modified inputs is built and summed by these
`tf.function`s (one trace per chunk shape, no eager per-op overhead); on JAX
and PyTorch `gradprobe.attribution._common` computes the same rows with `keras.ops`.
Imported only when the Keras backend is TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf


def wide_dtype(dtype: Any) -> tf.DType:
    """Sums of gradients are kept in float32 at least (float64 stays float64)."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


def _column(x: Any) -> Any:
    """The shape `[-1, 1, ..., 1]` that broadcasts one value per row over `x`
    (dynamic: these functions are traced with relaxed shapes)."""
    return tf.concat([[-1], tf.ones([tf.rank(x) - 1], tf.int32)], axis=0)


@tf.function(reduce_retracing=True)
def interpolate(x: Any, base: Any, idx: Any, alpha: Any) -> Any:
    """Rows `(1 - alpha) * base[idx] + alpha * x[idx]` (exactly `x` at alpha 1
    and `base` at 0), computed in float32 or wider and returned in `x`'s dtype."""
    wide = wide_dtype(x.dtype)
    xs = tf.cast(tf.gather(x, idx), wide)
    bs = tf.cast(tf.gather(base, idx), wide)
    a = tf.reshape(tf.cast(alpha, wide), _column(x))
    return tf.cast((1 - a) * bs + a * xs, x.dtype)


@tf.function(reduce_retracing=True)
def noisy(x: Any, scale: Any, idx: Any, rows: Any, seed: Any) -> Any:
    """Rows `x[idx] + scale[idx] * eps`, where the noise `eps` of row `r` is
    `tf.random.stateless_normal(x.shape[1:], seed=(seed, r))`: the same for a
    row whatever the chunking."""
    wide = wide_dtype(x.dtype)

    def one(r: Any) -> Any:
        return tf.random.stateless_normal(tf.shape(x)[1:], tf.stack([seed, r]), dtype=wide)

    eps = tf.map_fn(one, rows, fn_output_signature=tf.TensorSpec(None, wide))
    xs = tf.cast(tf.gather(x, idx), wide)
    return tf.cast(xs + tf.cast(tf.gather(scale, idx), wide) * eps, x.dtype)


@tf.function(reduce_retracing=True)
def accumulate(acc: Any, g: Any, idx: Any, w: Any) -> Any:
    """`acc[idx[j]] += w[j] * g[j]` for every row `j` (in `acc`'s dtype)."""
    wg = tf.cast(g, acc.dtype) * tf.reshape(tf.cast(w, acc.dtype), _column(g))
    return tf.tensor_scatter_nd_add(acc, idx[:, None], wg)


def keep(so_far: Any, values: Any, idx: Any, at: Any, n: int) -> Any:
    """`so_far` (per-example values; zeros when `None`) with `values[at]` written at
    examples `idx[at]`."""
    if so_far is None:
        so_far = tf.zeros([n], values.dtype)
    return tf.tensor_scatter_nd_update(so_far, tf.constant(idx[at])[:, None],
                                       tf.gather(values, tf.constant(at)))


def constant(value: Any) -> Any:
    return tf.constant(value)


def gather(x: Any, idx: Any) -> Any:
    return tf.gather(x, idx)


def executing_eagerly() -> bool:
    return tf.executing_eagerly()


def _is_floating(x: Any) -> bool:
    return isinstance(x, (tf.Tensor, tf.Variable)) and x.dtype.is_floating


def grad_cam_records(model: Any, x: Any, output: Any,
                     everything: Any) -> tuple[list, Callable[[int], bool]]:
    """`gp.grad_cam_layer`'s records on TensorFlow: `(records, depends)`,
    `records` the (node, key, output) of each call of a leaf layer with one
    floating output, in forward order, and `depends(i)` whether the selected
    output depends on record `i` (`everything`: a target that sums any output),
    asked of a persistent tape (a backward pass only over the layers after that
    record)."""
    from gradprobe.core import _patch
    from gradprobe.core.selectors import LayerTree
    from gradprobe.core.targets import evaluate, output_names
    from gradprobe.errors import GradprobeError

    if not tf.executing_eagerly():
        raise GradprobeError("gp.grad_cam_layer runs eagerly; call it outside tf.function.")
    tree = LayerTree(model)
    nodes = {id(n.layer): n for n in tree.leaves()}
    output_node = None
    if isinstance(output, str) and output not in output_names(model):
        output_node = tree.find(output)
        nodes.setdefault(id(output_node.layer), output_node)
    records: list[tuple[Any, int, Any]] = []  # (node, call index, the one output leaf)
    counts: dict[int, int] = {}

    def hook(layer: Any, out: Any, args: tuple, kwargs: dict) -> Any:
        leaves = keras.tree.flatten(out)
        index = counts.get(id(layer), 0)
        counts[id(layer)] = index + 1
        if len(leaves) == 1 and _is_floating(leaves[0]) and hasattr(leaves[0], "numpy"):
            tape.watch(leaves[0])
            records.append((nodes[id(layer)], index, leaves[0]))
        return out

    def call(model: Any, x: Any, training: bool) -> Any:
        with _patch.wrapped_calls([n.layer for n in nodes.values()], hook), \
                keras.StatelessScope():
            return model(x, training=training)

    def layer_value() -> Any:
        if output_node is None:
            return None
        return next((t for n, _, t in records if n is output_node), None)

    with tf.GradientTape(persistent=True) as tape:
        objective = evaluate(model, x, everything, output=output, call=call,
                             layer_value=layer_value).objective

    def key(node: Any, index: int) -> str:
        return f"{node.path}@{index}" if counts[id(node.layer)] > 1 else node.path

    def depends(i: int) -> bool:
        return tape.gradient(objective, records[i][2]) is not None

    return [(n, key(n, c), t) for n, c, t in records], depends
