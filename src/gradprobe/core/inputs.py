"""The inputs of a request: `prepare_inputs` (the one preparation: the model
validated, arrays converted to the backend's tensors in the model's input
dtypes, the inputs checked, the model built), the batch size, and the check that
requested input sources are floating point."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import keras
import numpy as np

from gradprobe import backends
from gradprobe.core import _sequence, _validate
from gradprobe.core.call_errors import call_error
from gradprobe.core.keys import input_keys
from gradprobe.errors import GradprobeError


def prepare_inputs(model: Any, inputs: Any) -> Any:
    """`inputs` as the model's call takes them on this backend: the model validated,
    arrays converted to tensors (floating arrays in the model's input dtype; tensors
    kept as they are, traced ones included), the inputs checked against the model,
    and the model built (by one call, outside any capture) if it was not."""
    _validate.model(model)
    bk = backends.get()
    if bk.CAPTURE == "functional":
        x = _functional_tensors(model, inputs)
    else:
        x = _tape_tensors(bk, model, inputs)
    ensure_built(model, x)
    return x


def _tape_tensors(backend: Any, model: Any, inputs: Any) -> Any:
    """Arrays as tensors of the tape backend (TensorFlow; tensors are kept as they are)."""
    _validate.inputs(inputs)
    specs = getattr(model, "inputs", None) or []
    spec_dtypes = [getattr(s, "dtype", None) for s in specs]

    leaves = [inputs] if backend.is_tensor(inputs) else keras.tree.flatten(inputs)
    leaves = [leaf if backend.is_tensor(leaf) else np.asarray(leaf) for leaf in leaves]
    _validate.model_inputs(model, inputs, leaves, [getattr(d, "name", d) for d in spec_dtypes],
                           lookups=_sequence.input_lookups)
    converted = []
    for i, leaf in enumerate(leaves):
        if backend.is_tensor(leaf):
            converted.append(leaf)
            continue
        arr = leaf
        if arr.dtype == object:
            raise GradprobeError(
                f"Input {i} is an object array; pass numeric arrays or tensors.")
        dtype = None
        if np.issubdtype(arr.dtype, np.floating):
            dtype = spec_dtypes[i] if len(spec_dtypes) == len(leaves) and spec_dtypes[i] else \
                getattr(model, "compute_dtype", None)
        converted.append(backend.to_tensor(arr, dtype))
    _validate.batch(converted, [getattr(d, "name", d) for d in spec_dtypes],
                    exact_count=not isinstance(inputs, dict))
    if len(leaves) == 1 and not isinstance(inputs, (list, tuple, dict)):
        return converted[0]
    return keras.tree.pack_sequence_as(inputs, converted)


def _functional_tensors(model: Any, inputs: Any) -> Any:
    """Arrays as backend tensors on JAX and PyTorch (backend tensors are kept as they
    are, traced ones included: a call under the caller's own `jax.grad`)."""
    if not (keras.ops.is_tensor(inputs) and _dtype(inputs) in _REAL):
        # Validated through a stand-in of each backend tensor with its shape and dtype
        # (np.empty allocates no pages), since a traced value cannot become an array.
        _validate.inputs(keras.tree.map_structure(
            lambda leaf: np.empty(tuple(leaf.shape), np.dtype(_dtype(leaf)))
            if keras.ops.is_tensor(leaf) else leaf, inputs))
    specs = getattr(model, "inputs", None) or []
    spec_dtypes = [getattr(s, "dtype", None) for s in specs]
    leaves = keras.tree.flatten(inputs)
    leaves = [leaf if keras.ops.is_tensor(leaf) else np.asarray(leaf) for leaf in leaves]
    keys = input_keys(inputs)
    for key, leaf in zip(keys, leaves):
        _validate.text_input(_validate.leaf_name("inputs", key), leaf)
    _validate.model_inputs(model, inputs, leaves, [getattr(d, "name", d) for d in spec_dtypes],
                           lookups=_sequence.input_lookups)
    converted = []
    for i, leaf in enumerate(leaves):
        if keras.ops.is_tensor(leaf):
            converted.append(leaf)
            continue
        arr = leaf
        if arr.dtype == object:
            raise GradprobeError(f"Input {i} is an object array; pass numeric arrays or tensors.")
        dtype = None
        if np.issubdtype(arr.dtype, np.floating):
            dtype = spec_dtypes[i] if len(spec_dtypes) == len(leaves) and spec_dtypes[i] else \
                getattr(model, "compute_dtype", None)
        converted.append(keras.ops.convert_to_tensor(arr, dtype))
    _validate.batch([stand_in(leaf) for leaf in converted],
                    [getattr(d, "name", d) for d in spec_dtypes],
                    exact_count=not isinstance(inputs, dict))
    if len(leaves) == 1 and not isinstance(inputs, (list, tuple, dict)):
        x = converted[0]
    else:
        x = keras.tree.pack_sequence_as(inputs, converted)
    return placed_inputs(backends.get(), x, {})[0]


def placed_inputs(bk: Any, x: Any, args: dict) -> tuple[Any, dict]:
    """Under a `keras.distribution` (JAX), the inputs and the target's batch-shaped
    arguments laid out as Keras' trainer lays out a batch (`bk.place_inputs`);
    unchanged otherwise."""
    place = getattr(bk, "place_inputs", None)
    return (x, args) if place is None else place(x, args)


_REAL = {"float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
         "uint8", "uint16", "uint32", "uint64", "bool"}


def _dtype(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def stand_in(leaf: Any) -> Any:
    """A backend tensor's shape and dtype name, for the checks of `_validate`
    (written for TensorFlow dtypes, which take dtype names)."""
    return SimpleNamespace(shape=tuple(leaf.shape), dtype=_dtype(leaf))


def is_floating_tensor(x: Any) -> bool:
    return keras.ops.is_tensor(x) and keras.backend.is_float_dtype(_dtype(x))


def batch_size(x: Any) -> int:
    leaves = keras.tree.flatten(x)
    shape = backends.static_shape(leaves[0]) if leaves else ()
    if not shape or shape[0] is None:
        raise GradprobeError(
            f"Cannot tell the batch size of inputs of shape {shape}: inputs need a leading "
            "batch axis.")
    return int(shape[0])


def ensure_built(model: Any, x: Any) -> None:
    """Builds an unbuilt model by calling it once, outside any capture."""
    if getattr(model, "built", False):
        return
    try:
        model(x, training=False)
    except Exception as e:
        raise call_error(model, x, e) from e


def check_input_dtypes(model: Any, x: Any, plan: Any) -> None:
    """Refuses an input source (of `plan`, a `Plan`) that is not floating (token ids,
    masks), with a hint naming the layer to take instead."""
    if not plan.inputs:
        return
    if backends.is_functional():
        is_floating, shown = is_floating_tensor, stand_in
    else:
        is_floating, shown = backends.get().is_floating, _itself
    keys = input_keys(x)
    wanted = {k for spec in plan.inputs for k in keys
              if spec.index is None or k == f"inputs:{spec.index}"
              or (k == "inputs" and spec.index == 0)}
    leaves = dict(zip(keys, keras.tree.flatten(x)))
    bad = [k for k in keys if k in wanted and not is_floating(leaves[k])]
    if bad:
        key, hint = _sequence.integer_input_hint(model, keys, bad)
        _validate.differentiable_input(key, shown(leaves[key]), hint)


def _itself(leaf: Any) -> Any:
    return leaf
