"""The pieces of the functional strategy's compiled step (JAX, PyTorch): the
stateless scope the forward pass reads its variables from, the loss-scaled and
float32 forms of a step, the sharding rules under a `keras.distribution`, and
the input signature a compiled step is kept for."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from gradprobe.core.capture.assembly import SourceEntry, requested_inputs
from gradprobe.core.keys import input_keys
from gradprobe.core.plan import Plan
from gradprobe.errors import GradprobeError

LOW_PRECISION = ("float16", "bfloat16")


def value_and_grad(bk: Any, loss_scaled: bool) -> Any:
    """The backend's `value_and_grad`, loss-scaled for a model that computes in
    float16 (`gradprobe.backends._loss_scale`, TensorFlow's rule)."""
    return bk.scaled_value_and_grad if loss_scaled else bk.value_and_grad


def in_float32(step: Any) -> Any:
    """`step` with every gradient and every activation (and input) value in float32
    where it is float16 or bfloat16, as on TensorFlow (`tape.run`): statistics,
    diagnosis and attribution sums downstream are then computed in float32."""

    def run(trainable: list, non_trainable: list, x: Any, args: dict) -> tuple[Any, Any]:
        aux, grads = step(trainable, non_trainable, x, args)
        grads = {part: {k: to_float32(g) for k, g in leaves.items()}
                 for part, leaves in grads.items()}
        aux = dict(aux, values={k: to_float32(v) for k, v in aux["values"].items()})
        return aux, grads

    return run


def to_float32(x: Any) -> Any:
    low = keras.backend.standardize_dtype(x.dtype) in LOW_PRECISION
    return keras.ops.cast(x, "float32") if low else x


def constrained(bk: Any, step: Any, owners: dict) -> Any:
    """`step` with its weight gradients constrained to their variables' sharding
    (`bk.constrain_gradients`, JAX: a sharded kernel's gradient stays sharded like
    it); `step` itself on a backend without it."""
    constrain = getattr(bk, "constrain_gradients", None)
    if constrain is None or not owners:
        return step

    def constrained_step(*args: Any) -> tuple[Any, Any]:
        aux, grads = step(*args)
        return aux, dict(grads, vars=constrain(grads["vars"], owners))

    return constrained_step


def unsharded(bk: Any, tree: Any) -> Any:
    """`tree` replicated on the mesh of the current `keras.distribution` (JAX), for
    the single-example passes mapped over the batch (their inputs and their
    results): XLA's SPMD partitioner computes wrong per-example Conv kernel
    gradients (the `batch_group_count` convolution of `vmap` over the kernel
    gradient) when the mapped batch is sharded, or when the mapped result is
    constrained to be (JAX 0.10.2, host CPU devices: every shard but the first
    is wrong). Unchanged on other backends and without a distribution."""
    replicate = getattr(bk, "replicated", None)
    return tree if replicate is None else replicate(tree)


def refuse_float16(model: Any, plan: Plan, name: str,
                    what: str = "gp.functional") -> None:
    """`what` (a pure-function form: `gp.functional`, `gp.hvp`, `gp.jacobian`,
    `gp.gradient_penalty`) has no loss scaling: refused for float16/bfloat16 models."""
    layers = [model, *plan.probe_layers, *plan.order_layers]
    dtypes = {getattr(layer, "compute_dtype", None) for layer in layers}
    low = sorted(d for d in dtypes if d in ("float16", "bfloat16"))
    if low:
        raise GradprobeError(
            f"Model {model.name!r} computes in {low[0]}; {what} does not support "
            f"float16/bfloat16 models on the {name} backend yet (no loss scaling in a "
            "pure-function form: small gradients would silently flush to zero). "
            "gp.gradients and the attribution functions do (loss-scaled, float32 "
            "results); otherwise use a float32 model.")


def input_entries(x: Any, plan: Plan) -> tuple[list, list[tuple[str, str]]]:
    """Entries and (selector, key) aliases for the requested inputs (as the tape
    strategy's `_probe_inputs` makes them)."""
    if not plan.inputs:
        return [], []
    wanted, aliases = requested_inputs(x, plan)
    entries = [SourceEntry(k, "input", ("input", k), None, -1, wanted[k],
                           "the target does not depend on this input")
               for k in input_keys(x) if k in wanted]
    return entries, aliases


def trainable_flags(model: Any, trainable: list, non_trainable: list) -> tuple:
    """What decides how Keras splits `model`'s variables into trainable and not."""
    return (model.trainable, len(trainable), *(v.trainable for v in trainable),
            *(v.trainable for v in non_trainable))


def stateless_scope(variables: list, values: list, requested: list) -> keras.StatelessScope:
    """A `keras.StatelessScope` in which `variables` read `values` (`None`: a
    requested variable, whose value comes from `requested`).

    The requested variables' values (from the caller, through the differentiated
    argument) go through the scope's `state_mapping`, which checks and casts
    them. The other values are the variables' own (`backends.*.value_of`, one
    per call), of the right shape and dtype by construction: they are put in
    with the scope's `add_update`, which records a value without converting
    it (the conversion costs 10 us per variable on PyTorch, 3.4 ms per call on
    ResNet50)."""
    scope = keras.StatelessScope(state_mapping=requested)
    for variable, value in zip(variables, values):
        if value is not None:
            scope.add_update((variable, value))
    return scope


def tree_abstract(bk: Any, tree: Any) -> Any:
    return keras.tree.map_structure(bk.abstract, tree)


def input_signature(x: Any, args: dict) -> tuple:
    """What a compiled step depends on besides values: structure, shapes, dtypes."""
    def describe(tree: Any) -> tuple:
        if keras.ops.is_tensor(tree):
            return (tuple(tree.shape), str(tree.dtype))
        if type(tree) is dict and all(_is_plain_array(v) for v in tree.values()):
            # (a target's arguments: a dict of arrays, described without keras.tree)
            return ("dict", tuple((k, tuple(v.shape), str(v.dtype))
                                  for k, v in sorted(tree.items())))
        leaves = keras.tree.flatten(tree)
        return (str(keras.tree.map_structure(lambda _: 0, tree)),
                tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves))

    return describe(x), describe(args)


def _is_plain_array(x: Any) -> bool:
    """A backend tensor or a NumPy array (not a nested structure)."""
    return isinstance(x, np.ndarray) or keras.ops.is_tensor(x)
