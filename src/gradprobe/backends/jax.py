"""JAX's primitives for the functional capture (see `gradprobe.backends`).

With `gradprobe.backends.jax_distribution` (placement under `keras.distribution`),
the only gradprobe module that imports `jax`. Private Keras access: the Keras
mask of a JAX array (which cannot carry attributes) lives in a Keras-internal
table, read and written with `keras.src.backend.common.masking` (see `add_probe`).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
from jax.extend import core as jcore

from gradprobe.backends import _keras_ops, _loss_scale, jax_distribution

NAME = "jax"
CAPTURE = "functional"  # gp.gradients runs the functional capture
TAPE = None  # JAX has no tape: gp.Tape is refused (gp.functional instead)
DIFFERENTIABLE_GRADIENTS = True  # gp.gradients is differentiable under the caller's jax.grad

_traces = itertools.count()
trace_count = 0  # how many times functions compiled by `jit` were traced


def value_and_grad(fn: Any) -> Any:
    """`(diff, *rest) -> ((objective, aux), grads)` for `fn(diff, *rest) -> (objective, aux)`."""
    return jax.value_and_grad(fn, argnums=0, has_aux=True)


def scaled_value_and_grad(fn: Any) -> Any:
    """`value_and_grad` for a forward pass that computes in float16: the gradients
    are loss-scaled and returned in float32 (`gradprobe.backends._loss_scale`).

    One forward pass (`jax.vjp`) and two backward passes of its pullback: at
    scale 1, to measure the largest gradient, then at the chosen power of two.
    Under `jax.vmap` the scale is chosen per mapped example."""

    def run(diff: Any, *rest: Any) -> tuple[tuple[Any, Any], Any]:
        objective, pullback, aux = jax.vjp(lambda d: fn(d, *rest), diff, has_aux=True)
        ones = jnp.ones_like(objective)
        (first,) = pullback(ones)
        leaves, treedef = jax.tree.flatten(first)
        scale = _loss_scale.scale_for(leaves)
        if scale is None:  # (no source, or only empty ones)
            return (objective, aux), first
        (second,) = pullback(_loss_scale.seed(objective, scale))
        grads = _loss_scale.unscale(leaves, jax.tree.leaves(second), scale)
        return (objective, aux), jax.tree.unflatten(treedef, grads)

    return run


PER_EXAMPLE = True  # `vmap` and `jacobian` below: per-example gradients are supported
PER_EXAMPLE_METHOD = "vmap"  # the single-example passes are mapped with `jax.vmap`


def vmap(fn: Any, in_axes: tuple) -> Any:
    """`jax.vmap(fn, in_axes)`: `fn` mapped over the leading axis of the
    arguments whose axis is 0 (`None`: the same value for every example)."""
    return jax.vmap(fn, in_axes=in_axes)


def jacobian(fn: Any) -> Any:
    """For `fn(diff, *rest) -> (value, aux)` with `value` shaped `(batch,)`: a
    function `(diff, *rest) -> (jacobian, aux)`, each leaf of `jacobian` shaped
    `(batch, *leaf_shape)` (`jax.jacrev`: one backward pass per example, batched)."""
    return jax.jacrev(fn, argnums=0, has_aux=True)


def jit(fn: Any) -> Any:
    """`jax.jit(fn)`, counting its traces in `trace_count` (for tests: a cache
    hit runs no Python, so the count only grows when JAX traces again)."""

    def counted(*args: Any) -> Any:
        global trace_count
        trace_count = next(_traces) + 1
        return fn(*args)

    return jax.jit(counted)


def eval_shape(fn: Any, *args: Any) -> Any:
    """`fn` run on shapes and dtypes only (no computation)."""
    return jax.eval_shape(fn, *args)


def abstract(x: Any) -> Any:
    """The shape and dtype of an array, as an argument for `eval_shape`/`connected`."""
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def connected(fn: Any, diff: Any, *rest: Any) -> Any:
    """For each leaf of `diff`: whether the objective of `fn(diff, *rest)`
    depends on it, structurally.

    The forward-mode derivative of the objective is traced (on abstract values,
    nothing is computed); JAX propagates symbolic zeros, so a source the
    objective does not depend on (not on the path, behind a `stop_gradient`, or
    only through integer operations such as an arg-max) contributes no equation
    to the output tangent. Which tangent inputs the output tangent reaches is
    read from the jaxpr, descending into the sub-jaxprs of call-like equations
    (`jit`, `custom_jvp`...), and otherwise (loops, branches, every primitive)
    counting every input of an equation as used by each of its outputs (which
    errs towards "connected", as TensorFlow's tape does).
    """
    leaves, treedef = jax.tree.flatten(diff)
    if not leaves:
        return diff

    def tangent_out(primals: Any, tangents: Any, *others: Any) -> Any:
        _, t = jax.jvp(lambda d: fn(d, *others)[0], (primals,), (tangents,))
        return t

    args = (diff, diff, *rest)
    abstract_args = jax.tree.map(abstract, args)
    closed = jax.make_jaxpr(tangent_out)(*abstract_args)
    jaxpr = closed.jaxpr
    n = len(leaves)  # invars: the n primals, the n tangents, then `rest`
    needed = _needed_inputs(jaxpr, [True] * len(jaxpr.outvars))
    return jax.tree.unflatten(treedef, [needed[n + i] for i in range(n)])


def _is_var(v: Any) -> bool:
    return isinstance(v, jcore.Var) and not isinstance(v, jcore.Literal)


def _needed_inputs(jaxpr: Any, wanted_out: list[bool]) -> list[bool]:
    """Which `jaxpr.invars` the outputs flagged in `wanted_out` depend on."""
    needed: set = {v for v, w in zip(jaxpr.outvars, wanted_out) if w and _is_var(v)}
    for eqn in reversed(jaxpr.eqns):
        outs = [_is_var(o) and o in needed for o in eqn.outvars]
        if not any(outs):
            continue
        inner = _one_to_one(eqn)
        if inner is not None:
            ins = _needed_inputs(inner, outs)
            needed.update(v for v, use in zip(eqn.invars, ins) if use and _is_var(v))
        else:
            needed.update(v for v in eqn.invars if _is_var(v))
    return [v in needed for v in jaxpr.invars]


# Call-like primitives: their sub-jaxpr runs once, its inputs and outputs are the
# equation's own. (Not loops: a scan or while body runs many times, and an input
# can reach an output only through the carry of a later step.)
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}


def _one_to_one(eqn: Any) -> Any:
    """The sub-jaxpr of a call-like equation (`jit`, `custom_jvp_call`...) whose
    inputs and outputs are the equation's own, else `None`."""
    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
        if isinstance(sub, jcore.Jaxpr) and len(sub.invars) == len(eqn.invars) \
                and len(sub.outvars) == len(eqn.outvars):
            return sub
    return None


def value_of(variable: Any) -> Any:
    """A Keras variable's current value."""
    return variable.value


def zeros(shape: tuple, dtype: Any) -> Any:
    return jnp.zeros(shape, dtype)


def add_probe(x: Any, probe: Any) -> Any:
    """`x + probe`, with `x`'s Keras mask carried over to the result."""
    # Keras keeps the mask of a JAX array (which takes no attributes) in a table
    # keyed by the array's id (keras.src.backend.common.tensor_attributes).
    from gradprobe.backends._keras_private import get_keras_mask, set_keras_mask

    y = x + probe
    mask = get_keras_mask(x)
    if mask is not None:
        set_keras_mask(y, mask)
    return y


def stop_gradient(tree: Any) -> Any:
    return jax.tree.map(jax.lax.stop_gradient, tree)


def to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x)


def is_array(x: Any) -> bool:
    return isinstance(x, jax.Array)


def is_concrete(x: Any) -> bool:
    """An array with values (not a tracer of jax.jit or jax.grad)."""
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def is_floating(x: Any) -> bool:
    return is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)


# JAX's control-flow entry points, by (file, function): a layer called from one
# runs in a traced loop or branch body.
_CONTROL_FLOW = {
    ("loops.py", "scan"), ("loops.py", "while_loop"), ("loops.py", "fori_loop"),
    ("loops.py", "map"), ("loops.py", "associative_scan"),
    ("conditionals.py", "cond"), ("conditionals.py", "switch"),
}


def control_flow(origin: Any) -> str | None:
    """The JAX control-flow function the calling code runs inside, below the
    frames of `origin`; `None` if none."""
    return origin.control_flow(_CONTROL_FLOW, os.path.join("jax", "_src", "lax", "control_flow"))


_TRACE_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                 jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError,
                 jax.errors.NonConcreteBooleanIndexError)


def trace_error(e: BaseException) -> str | None:
    """The name of the JAX tracing error behind `e` (a model call that needs
    concrete values: a Python branch or a NumPy conversion), else `None`."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, _TRACE_ERRORS):
            return type(e).__name__
        e = e.__cause__ or e.__context__
    return None


def version() -> str:
    return jax.__version__


# ------------------------------------------- higher order (gp.hvp, gp.jacobian, ...)
def grad(fn: Any, diff: Any, *rest: Any) -> Any:
    """The gradient of the scalar `fn(diff, *rest)` with respect to `diff`,
    itself differentiable (by an enclosing `jax.grad`, `jax.jvp`...)."""
    return jax.grad(fn)(diff, *rest)


def hvp(fn: Any, primal: Any, tangent: Any, *rest: Any) -> Any:
    """The Hessian-vector product of the scalar `fn(primal, *rest)`: forward over
    reverse, `jax.jvp` of `jax.grad` (shaped like `primal`)."""
    return jax.jvp(lambda p: jax.grad(fn)(p, *rest), (primal,), (tangent,))[1]


def batch_jacobian(fn: Any, source: Any, *rest: Any) -> Any:
    """For `fn(source, *rest)` shaped `(batch, *out)` with examples independent:
    the per-example Jacobian, shaped `(batch, *out, *source.shape[1:])`
    (`jax.jacrev` of the sum over the batch, which keeps each example's block)."""
    value = jax.eval_shape(lambda s: fn(s, *rest), source)
    out_rank = len(value.shape) - 1
    j = jax.jacrev(lambda s: jnp.sum(fn(s, *rest), axis=0))(source)  # (*out, batch, *src)
    return jnp.moveaxis(j, out_rank, 0)


# ------------------------- keras.distribution (DataParallel, ModelParallel): see jax_distribution
place_inputs = jax_distribution.place_inputs  # the batch laid out as Keras' trainer lays it out
constrain_gradients = jax_distribution.constrain_gradients  # weight gradients: variables' sharding
replicated = jax_distribution.replicated  # (per-example vmap: see jax_distribution)
reduced_stats = jax_distribution.reduced_stats  # statistics of a sharded array, on its devices
unit_activity = jax_distribution.unit_activity  # per-unit "any non-zero", on its devices


# ------------------------------------------------------------ targets
argmax_int32 = _keras_ops.argmax_int32
per_row = _keras_ops.per_row


def in_graph() -> bool:
    """Never: a `jax.jit` tracer is told apart per value (`is_concrete`)."""
    return False


def target_argument(value: Any) -> Any:
    """A target argument as `jax.jit` takes it: a NumPy array as it is (converting it
    first costs an extra dispatch per call); a tensor stays as it is."""
    if isinstance(value, np.ndarray) or keras.ops.is_tensor(value):
        return value
    return np.asarray(value)


def target_arguments_shareable() -> bool:
    return True
