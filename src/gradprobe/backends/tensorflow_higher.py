"""TensorFlow's pieces of the higher-order functions (`gradprobe.higher`): the
forward-over-backward and double-backward Hessian-vector products of `gp.hvp`,
the `tf.vectorized_map` of per-example gradients, and the tensor arithmetic of
the ghost-norm identities of `gp.per_example_norms`.

`gradprobe.higher` decides (which method, which layer is covered, why a fallback
is used) and calls these small functions for what only TensorFlow computes;
what `keras.ops` computes the same way stays there. Imported only when the Keras
backend is TensorFlow (through `gradprobe.higher.tensorflow_higher`, a `Deferred`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from gradprobe.backends import tensorflow as backend


# ------------------------------------------------------------ vectorized_map
def onednn_enabled() -> bool:
    """Whether this process runs TensorFlow's oneDNN kernels (the default on x86-64
    Linux; off with TF_ENABLE_ONEDNN_OPTS=0 set before TensorFlow is imported)."""
    # Private TensorFlow API (tensorflow.python.util._pywrap_util_port.IsMklEnabled),
    # which follows TF_ENABLE_ONEDNN_OPTS. If it is ever gone, assume oneDNN is on
    # (the default): the caller then takes a slower path, never a wrong one.
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return True


# -------------------------------------------------------------------- gp.hvp
def forward_over_backward(variables: list[Any], vectors: list[Any],
                          gradients_of: Callable[[], list[Any]]) -> list[Any]:
    """`H v` with respect to weights: `tf.autodiff.ForwardAccumulator` (tangents
    `vectors` on `variables`) around `gradients_of()`, one backward pass that
    returns the gradients of the target, in the order of `variables`."""
    with tf.autodiff.ForwardAccumulator([backend.watchable(v) for v in variables],
                                        vectors) as acc:
        grads = gradients_of()
    return [acc.jvp(gr, unconnected_gradients=tf.UnconnectedGradients.ZERO) for gr in grads]


def vector_dot(grads: list[Any], vectors: list[Any]) -> Any:
    """`sum_k <grads[k], vectors[k]>`, the scalar whose gradient (taken again by
    the outer tape of a double backward) is `H v`."""
    return tf.add_n([tf.reduce_sum(gr * tf.cast(v, gr.dtype)) for gr, v in zip(grads, vectors)])


# ----------------------------------------------------- per-example gradients
def vectorized_map(fn: Callable[[Any], Any], elems: Any) -> Any:
    """`fn` mapped over the leading axis of `elems` by `tf.vectorized_map`,
    without its silent fallback to a while loop (a conversion error raises)."""
    return tf.vectorized_map(fn, elems, fallback_to_while_loop=False)


# ------------------------------------------------- ghost-norm identities
def pre_activation_gradient(layer: Any, a: Any, dy: Any) -> Any:
    """The gradient at the pre-activation `z` of a Dense, EinsumDense or
    convolution layer from its output gradient `dy`: `z` recomputed from the
    input `a` and the layer's weights, its activation differentiated at it."""
    if isinstance(layer, keras.layers.Dense):
        z = tf.matmul(a, layer.kernel.value)
    elif isinstance(layer, keras.layers.EinsumDense):
        z = tf.einsum(layer.equation, a, layer.kernel.value)
    else:
        z = layer.convolution_op(a, layer.kernel.value)
    if getattr(layer, "bias", None) is not None:
        z = z + layer.bias.value
    with tf.GradientTape() as t:
        t.watch(z)
        out = layer.activation(z)
    return t.gradient(out, z, output_gradients=dy)


def conv_patches(layer: Any, a: Any) -> Any:
    """The input patches of a channels-last Conv1D or Conv2D layer, `(batch,
    positions, patch size)`: the rows the kernel multiplies."""
    if isinstance(layer, keras.layers.Conv1D):
        a = a[:, None]
        k, s, r = (1, *layer.kernel_size), (1, *layer.strides), (1, *layer.dilation_rate)
    else:
        k, s, r = layer.kernel_size, layer.strides, layer.dilation_rate
    p = tf.image.extract_patches(a, sizes=[1, *k, 1], strides=[1, *s, 1], rates=[1, *r, 1],
                                 padding=layer.padding.upper())
    return tf.reshape(p, [tf.shape(a)[0], -1, p.shape[-1]])


def gram_squares(A: Any, G: Any) -> Any:
    """Squared Frobenius norm of `sum_t A[:, t]^T G[:, t]` per example, from the
    two Gram matrices over positions (the "ghost" identity)."""
    gram_a = tf.matmul(A, A, transpose_b=True)
    gram_g = tf.matmul(G, G, transpose_b=True)
    return tf.reduce_sum(gram_a * gram_g, axis=[1, 2])


def outer_squares(A: Any, G: Any) -> Any:
    """Squared Frobenius norm of `sum_t A[:, t]^T G[:, t]` per example, from the
    per-example outer-product sum itself (the "outer" method)."""
    per_example = tf.einsum("btd,bte->bde", A, G)
    return tf.reduce_sum(tf.square(per_example), axis=[1, 2])


def embedding_squares(ids: Any, dy: Any) -> Any:
    """Squared per-example norm of an Embedding layer's weight gradient, from
    its output gradient `dy` and its input `ids` (positions with the same id add
    into the same row)."""
    b = tf.shape(dy)[0]
    G = tf.reshape(dy, [b, -1, dy.shape[-1]])
    ids = tf.reshape(ids, [b, -1])
    same = tf.cast(tf.equal(ids[:, :, None], ids[:, None, :]), G.dtype)
    gram = tf.matmul(G, G, transpose_b=True)
    return tf.reduce_sum(same * gram, axis=[1, 2])


def layer_norm_squares(layer: Any, x: Any, dy: Any) -> dict[int, Any]:
    """{id(variable): squared per-example norm} of the gamma and beta gradients
    of a LayerNormalization layer over the last axis, from its input `x` and
    output gradient `dy`."""
    rank = x.shape.rank
    x = tf.cast(x, dy.dtype)
    mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
    xhat = (x - mean) * tf.math.rsqrt(var + layer.epsilon)
    b = tf.shape(dy)[0]
    reduce = list(range(1, rank - 1))
    out = {}
    if layer.gamma is not None:
        gg = tf.reshape(tf.reduce_sum(xhat * dy, axis=reduce) if reduce else xhat * dy, [b, -1])
        out[id(layer.gamma)] = tf.reduce_sum(tf.square(gg), axis=1)
    if layer.beta is not None:
        gb = tf.reshape(tf.reduce_sum(dy, axis=reduce) if reduce else dy, [b, -1])
        out[id(layer.beta)] = tf.reduce_sum(tf.square(gb), axis=1)
    return out
