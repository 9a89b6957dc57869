"""TensorFlow's primitives: the only module of gradprobe that imports TensorFlow.

It implements `gradprobe.backends.interface.Backend` and `TapeBackend`. The tape
capture (`gradprobe.core.capture.tape`) needs only a
handful of primitives: a tape that records operations, a way to watch a fresh
"probe" tensor, the gradient call, compilation, and a test for "are we in the
same trace as the capture started in". The JAX and PyTorch backends
(`gradprobe.backends.jax`, `gradprobe.backends.torch`) provide the functional
capture's primitives (`gradprobe.core.capture.functional`). Besides those, this module holds
the few TensorFlow-specific pieces other modules dispatch to: the row gather and
arg-max that `tf.vectorized_map` converts (`per_row`, `argmax_int32`) and the
recognition of TensorFlow's sparse and ragged tensors (`composite_kind`).
"""

from __future__ import annotations

import itertools
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradprobe.backends import _keras_private

NAME = "tensorflow"
CAPTURE = "tape"  # gp.gradients runs the tape capture (gradprobe.core.capture.tape)
TAPE = "graph"  # gp.Tape is a tf.GradientTape
PER_EXAMPLE_METHOD = "vectorized_map"
DIFFERENTIABLE_GRADIENTS = True  # gp.gradients under the caller's tf.GradientTape

# This module holds TensorFlow's primitives and is imported on every Keras
# backend (TensorFlow must be installed: other modules still use it). On another
# backend its functions are never reached from a supported entry point:
# `gp.gradients` dispatches to `gradprobe.backends` and every other public
# function refuses the backend first (`_validate.backend_supported`).


def new_tape(persistent: bool = False, watch_accessed_variables: bool = False) -> Any:
    """A tape; by default it records only what is explicitly watched."""
    return tf.GradientTape(persistent=persistent,
                           watch_accessed_variables=watch_accessed_variables)


def watchable(source: Any) -> Any:
    """The object a tape watches for `source` (a Keras variable wraps a tf.Variable).

    A variable created under a `tf.distribute` strategy (a `MirroredVariable`)
    has no handle of its own in the strategy's cross-replica context (a
    `gp.gradients` call inside `with strategy.scope():`): there it is read
    through its copy on the current device (or its primary copy), so the tape
    watches that copy (`_get_on_device_or_primary`, private TensorFlow API:
    what `MirroredVariable`'s cross-replica reads use, TF 2.16-2.21). In a
    replica context (`strategy.run`, `fit`'s step) it is watched as it is.
    """
    if isinstance(source, keras.Variable):
        source = source.value
        if isinstance(source, tf.distribute.DistributedValues) and \
                tf.distribute.in_cross_replica_context():
            source = source._get_on_device_or_primary()
    return source


def watch(tape: tf.GradientTape, source: Any) -> None:
    tape.watch(watchable(source))


def is_floating(x: Any) -> bool:
    """True for a floating-point tensor, the only kind a gradient can flow through."""
    return isinstance(x, (tf.Tensor, tf.Variable)) and x.dtype.is_floating


def dtype_name(x: Any) -> str:
    dtype = getattr(x, "dtype", None)
    return getattr(dtype, "name", str(dtype))


def probe(tape: tf.GradientTape, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns `(y, p)`: `y` is what the rest of the forward pass consumes and the
    gradient with respect to `p` is the gradient with respect to this very use
    of `x`, separate from every other call of the same layer.

    Conceptually `y = x + p` with `p` a watched zero tensor (how the JAX and
    PyTorch backends will do it). A TensorFlow tape can watch an intermediate
    tensor directly, so here `y = p = tf.identity(x)`: a fresh tensor, watched,
    with the same gradient and without materialising zeros.
    """
    y = tf.identity(x)
    tape.watch(y)
    p = y
    mask = _keras_private.get_keras_mask(x)
    if mask is not None:
        _keras_private.set_keras_mask(y, mask)
    return y, p


def gradient(tape: tf.GradientTape, target: tf.Tensor, sources: list[Any]) -> list[Any]:
    """Gradients of `target` for each source; `None` where it does not depend on one."""
    if not sources:
        return []
    grads = tape.gradient(target, [watchable(s) for s in sources])
    return [densify(g) for g in grads]


_HEADROOM = 2.0 ** 14  # the largest source gradient is scaled to about this (float16 max 65504)


def is_float16(x: Any) -> bool:
    return getattr(getattr(x, "dtype", None), "name", None) == "float16"


def scaled_gradient(tape: tf.GradientTape, target: tf.Tensor, sources: list[Any]) -> list[Any]:
    """Gradients through float16 computations, with loss scaling, in float32.

    A float16 backward pass flushes gradients below ~6e-8 to zero. As Keras'
    `LossScaleOptimizer` does, the backward pass is seeded with a power-of-two
    scale and the result unscaled in float32; the scale is chosen, not guessed:
    a first pass at scale 1 measures the largest source gradient, the second
    runs at the power of two that brings it to about 2**14 (between 2**-14 and
    2**15, so the seed itself is a float16 number; 2**15 when every gradient
    is zero at scale 1, as when all of them underflow), and a source whose scaled
    gradient is not finite keeps its unscaled one. Needs a persistent tape.
    Works eagerly and in a trace (no Python branch on values).
    """
    if not sources:
        return []
    watched = [watchable(s) for s in sources]
    first = [densify(g) for g in tape.gradient(target, watched)]
    first = [None if g is None else tf.cast(g, tf.float32) for g in first]
    present = [g for g in first if g is not None]
    if not present:
        return first
    peak = tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(g)) for g in present]))
    peak = tf.where(tf.math.is_finite(peak), peak, 2.0 ** 16)
    # (every gradient zero at scale 1 may be every gradient underflowed: the largest scale)
    peak = tf.where(peak > 0, peak, _HEADROOM * 2.0 ** -15)
    exponent = tf.clip_by_value(tf.floor(tf.math.log(_HEADROOM / peak) / np.log(2.0)),
                                -14.0, 15.0)
    scale = tf.pow(2.0, exponent)
    seed = tf.cast(tf.ones_like(target) * tf.cast(scale, target.dtype), target.dtype)
    second = [densify(g) for g in tape.gradient(target, watched, output_gradients=seed)]
    out = []
    for g1, g2 in zip(first, second):
        if g1 is None or g2 is None:
            out.append(g1)
            continue
        g2 = tf.cast(g2, tf.float32) / scale
        out.append(tf.where(tf.reduce_all(tf.math.is_finite(g2)), g2, g1))
    return out


def to_float32(x: Any) -> Any:
    """`x` in float32 when it is a float16 or bfloat16 tensor, else unchanged."""
    if isinstance(x, (tf.Tensor, tf.Variable)) and x.dtype in (tf.float16, tf.bfloat16):
        return tf.cast(x, tf.float32)
    return x


def densify(g: Any) -> Any:
    """A dense tensor for a sparse gradient (Embedding), `None` stays `None`."""
    return tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g


def batch_jacobian(tape: Any, target: Any, source: Any) -> tf.Tensor:
    """`(batch, *target_shape, *source_shape)` Jacobian, vectorised over the batch."""
    j = tape.batch_jacobian(target, source)
    return tf.zeros([*target.shape, *source.shape[1:]], target.dtype) if j is None else j


def jacobian(tape: Any, target: Any, source: Any) -> Any:
    """Jacobian of a vector target with respect to one source (vectorised)."""
    return tape.jacobian(target, watchable(source),
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)


def cast_like(value: Any, like: Any) -> Any:
    """`value` as a tensor of `like`'s dtype (shapes must already agree)."""
    value = tf.convert_to_tensor(value)
    if tuple(value.shape) != tuple(like.shape) and like.shape.is_fully_defined():
        raise ValueError(f"replacement shape {tuple(value.shape)} != activation shape "
                         f"{tuple(like.shape)}")
    return tf.cast(value, like.dtype)


def zeros_like(x: Any) -> tf.Tensor:
    return tf.zeros_like(watchable(x))


def stop_gradient(x: Any) -> Any:
    return tf.nest.map_structure(tf.stop_gradient, x)


def capture_context() -> Any:
    """A token for the trace the capture runs in (`None` when eager)."""
    return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


def in_capture_context(token: Any) -> bool:
    """True when a layer call happens in the capture's own trace.

    Calls on symbolic tensors (Keras building a model), inside a scratch graph,
    or in the body of a control-flow loop run elsewhere and are not captured.
    """
    if _keras_private.in_symbolic_scope():
        return False
    if token is None:
        return tf.executing_eagerly()
    return not tf.executing_eagerly() and tf.compat.v1.get_default_graph() is token


@tf.autograph.experimental.do_not_convert
def name_scope(name: str) -> Any:
    """A name scope for the model call inside a trace: Keras opens a scope named
    after the model, which TensorFlow refuses as a *root* scope when the name
    starts with an underscore (a subclass `_Net` is named `"__net"`)."""
    return tf.name_scope(name)


# TensorFlow's control-flow entry points (Keras' `ops.fori_loop`, `while_loop`,
# `scan`, `map`, `cond`... call them): a layer called from inside one runs in a
# loop or branch body, whose tensors cannot be probed from outside it.
_CONTROL_FLOW = {
    ("while_loop.py", "while_loop"), ("while_loop.py", "while_loop_v2"),
    ("functional_ops.py", "scan"), ("functional_ops.py", "foldl"),
    ("functional_ops.py", "foldr"), ("map_fn.py", "map_fn"), ("cond.py", "cond"),
    ("cond.py", "cond_for_tf_v2"), ("control_flow_switch_case.py", "switch_case"),
}


def control_flow(origin: Any) -> str | None:
    """The TensorFlow control-flow function (`"while_loop"`, `"scan"`, ...) the
    current code runs inside, below the capture's `origin`; `None` if none."""
    return origin.control_flow(_CONTROL_FLOW, "tensorflow")


def executing_eagerly() -> bool:
    return tf.executing_eagerly()


_compiled_count = itertools.count()


def compile_function(fn: Any) -> Any:
    """A compiled (traced, cached) version of `fn`.

    Each compiled function gets a code object of its own: TensorFlow keeps its
    "N out of the last N calls triggered tf.function retracing" statistics per
    code object (`Function._get_key_for_call_stats`), so functions created from
    one closure would share them, and ten requests traced once each would be
    reported as retracing.
    """
    if isinstance(fn, types.FunctionType):
        name = f"{fn.__name__}_{next(_compiled_count)}"
        code = fn.__code__.replace(co_name=name, co_qualname=name)
        fresh = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        fresh.__kwdefaults__ = fn.__kwdefaults__
        fn = fresh
    # reduce_retracing: after a second input shape, TensorFlow traces a shape with
    # the differing dimensions unknown, so requests that differ only in batch size
    # share one trace from then on (two traces in all, not one per batch size).
    # autograph=False: as Keras 3's own compiled train/predict steps
    # (`do_not_convert`), the model's Python runs as written. AutoGraph would
    # otherwise convert, source to AST and back, every function of gradprobe and
    # of the model that the trace enters: most of the first-call time
    # (about 19 s of a profiled 27 s on ResNet50), for nothing a Keras model needs.
    return tf.function(fn, reduce_retracing=True, autograph=False)


def is_tensor(x: Any) -> bool:
    if isinstance(x, (tf.Tensor, tf.Variable)):  # the common case, without the slower
        return True                              # Protocol check inside `tf.is_tensor`
    if isinstance(x, np.ndarray):
        return False
    return tf.is_tensor(x)


def is_eager_tensor(x: Any) -> bool:
    """A dense tensor with a value (an `EagerTensor`: not a graph's tensor, a variable,
    a sparse or a ragged tensor)."""
    return isinstance(x, tf.Tensor) and hasattr(x, "numpy")


# Small constant arguments (class indices, positions, labels) of compiled calls,
# by value: converting the same 32 class indices again on every call costs more
# than the rest of gradprobe's own Python per call (about 0.5 ms between the
# calls of a compiled model, against 0.1 ms on its own).
_CONSTANTS: OrderedDict = OrderedDict()
_CONSTANTS_LOCK = threading.Lock()
_CONSTANT_MAX_BYTES = 8192
_CONSTANTS_KEPT = 64


def constant(value: np.ndarray) -> Any:
    """`value` as a tensor, the same (immutable) eager tensor for equal small
    arrays; inside a graph, and for large arrays, a new one."""
    if value.nbytes > _CONSTANT_MAX_BYTES or not tf.executing_eagerly():
        return tf.convert_to_tensor(value)
    key = (value.dtype.str, value.shape, value.tobytes())
    with _CONSTANTS_LOCK:
        tensor = _CONSTANTS.get(key)
        if tensor is not None:
            _CONSTANTS.move_to_end(key)
            return tensor
    tensor = tf.convert_to_tensor(value)
    with _CONSTANTS_LOCK:
        _CONSTANTS[key] = tensor
        while len(_CONSTANTS) > _CONSTANTS_KEPT:
            _CONSTANTS.popitem(last=False)
    return tensor


def to_tensor(x: Any, dtype: Any = None) -> Any:
    if isinstance(x, keras.Variable):
        x = x.value
    if dtype is not None:
        return tf.cast(x, dtype) if tf.is_tensor(x) else tf.convert_to_tensor(x, dtype=dtype)
    return tf.convert_to_tensor(x)


def constant_string(s: str) -> tf.Tensor:
    return tf.constant(s)


def decode_string(t: Any) -> str:
    return t.numpy().decode("utf-8")


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, keras.Variable):
        x = x.value
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)


def static_shape(x: Any) -> tuple:
    return tuple(x.shape.as_list()) if hasattr(x.shape, "as_list") else tuple(x.shape)


def version() -> str:
    """The backend's version, for reports."""
    return tf.__version__


# ------------------------------------------------ pieces other modules dispatch to
def per_row(x: Any, idx: Any) -> tf.Tensor:
    """`x[i, idx[i]]` for every row `i`: `tf.gather(x, idx, axis=1, batch_dims=1)`,
    written as a plain gather on the first two axes merged, whose gradient traces
    about 2x faster than the batched gather's chain of reshapes and that
    `tf.vectorized_map` still converts (a `gather_nd`, faster yet, would not:
    pfor has no converter for its gradient, `ScatterNd`)."""
    shape = tf.shape(x)
    rows = tf.range(shape[0], dtype=idx.dtype) * tf.cast(shape[1], idx.dtype)
    return tf.gather(tf.reshape(x, tf.concat([[-1], shape[2:]], axis=0)), rows + idx)


def in_graph() -> bool:
    """True while a `tf.function` graph is built (its tensors have no values)."""
    return not tf.executing_eagerly()


def target_argument(value: Any) -> Any:
    """A target argument as the compiled gradient function takes it: a tensor (a
    `tf.function` would trace again for each new NumPy value); small NumPy arrays
    cached by value (see `constant`); a tensor stays as it is."""
    if isinstance(value, np.ndarray):
        return constant(value)
    if keras.ops.is_tensor(value):
        return value
    return keras.ops.convert_to_tensor(value)


def target_arguments_shareable() -> bool:
    """Eager tensors may be shared between calls; graph tensors belong to their graph."""
    return tf.executing_eagerly()


def argmax_int32(scores: Any) -> tf.Tensor:
    """Each row's arg-max class, int32 (Keras' `argmax` adds ops that
    `tf.vectorized_map` cannot convert, which would force the Jacobian fallback
    of `per_example=True`)."""
    return tf.argmax(scores, axis=-1, output_type=tf.int32)


def composite_kind(x: Any) -> str | None:
    """`"sparse"` for a TensorFlow sparse tensor, `"ragged"` for a ragged one
    (TensorFlow 1's value classes included), else `None`."""
    if isinstance(x, (tf.SparseTensor, tf.compat.v1.SparseTensorValue)):
        return "sparse"
    if isinstance(x, (tf.RaggedTensor, tf.compat.v1.ragged.RaggedTensorValue)):
        return "ragged"
    return None


# ------------------------------------------------------------ the higher-order functions
# TensorFlow's pieces of `gradprobe.higher` and of the per-example capture: the
# forward-over-backward and double-backward Hessian-vector products of `gp.hvp`,
# the `tf.vectorized_map` of per-example gradients, and the tensor arithmetic of
# the ghost-norm identities of `gp.per_example_norms`. The callers decide (which
# method, which layer is covered, why a fallback is used) and call these small
# functions for what only TensorFlow computes.
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
    with tf.autodiff.ForwardAccumulator([watchable(v) for v in variables],
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
