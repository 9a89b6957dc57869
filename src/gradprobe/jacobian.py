"""`gp.jacobian`: per-example Jacobians between two layers' activations."""

from __future__ import annotations

import math
from typing import Any

import keras

from gradprobe import _validate
from gradprobe.backends import tensorflow as backend
from gradprobe.engine import ensure_built, prepare_inputs
from gradprobe.errors import GradprobeError
from gradprobe.selectors import LayerTree
from gradprobe.tape import Tape


def jacobian(model: keras.Model, inputs: Any, of: Any, wrt: Any = "inputs", *,
             training: bool = False, max_bytes: int = 2**30) -> Any:
    """The per-example Jacobian of one layer's activation with respect to an
    earlier layer's activation (or the input), vectorised over the batch.

    Examples must be independent (no batch statistics in training mode): row `i`
    is the derivative of example `i`'s activation with respect to example `i`'s.

    Args:
        model: A Keras model.
        inputs: Whatever `model(...)` accepts.
        of: The later layer (`"name"`, `"name@i"`, or a layer object).
        wrt: The earlier layer, or `"inputs"` (a single-input model).
        training: Passed to the model.
        max_bytes: Refuse (with the memory it would need) a Jacobian larger than this.

    Returns:
        A tensor shaped `(batch, *of_shape, *wrt_shape)` (shapes without the batch axis).

    Example:

    >>> J = gp.jacobian(model, x, of="dense_2", wrt="dense_1")   # (batch, 10, 64)
    """
    _validate.backend_supported("gp.jacobian")
    _validate.model(model)
    _validate.flag("training", training)
    max_bytes = _validate.count("max_bytes", max_bytes, "the largest Jacobian to build, in "
                                "bytes", maximum=2**62)
    known = None
    for name, value in (("of", of), ("wrt", wrt)):
        if not isinstance(value, (str, keras.layers.Layer)):
            raise _validate.fail(name, value, "a layer name (or 'name@i'), a layer object"
                                 + (" or 'inputs'." if name == "wrt" else "."))
        if isinstance(value, keras.layers.Layer):
            known = known if known is not None else LayerTree(model).by_id
            _validate.part_of_model(value, model, name, known=id(value) in known)
    x = prepare_inputs(model, inputs)
    ensure_built(model, x)
    watch = [of] if wrt == "inputs" else [of, wrt]
    if wrt == "inputs":
        watch.append("inputs")
    with Tape(model, watch=watch, persistent=True) as tape, keras.StatelessScope():
        model(x, training=training)
    target = tape.activation(of)
    source = tape.activation(wrt)
    t_shape = backend.static_shape(target)
    s_shape = backend.static_shape(source)
    if t_shape[0] != s_shape[0]:
        raise GradprobeError(
            f"{of!r} and {wrt!r} have different batch sizes ({t_shape[0]} and {s_shape[0]}).")
    size = t_shape[0] * math.prod(t_shape[1:]) * math.prod(s_shape[1:]) * target.dtype.size
    if size > max_bytes:
        raise GradprobeError(
            f"The Jacobian of {of!r} (per-example shape {t_shape[1:]}) with respect to "
            f"{wrt!r} ({s_shape[1:]}) for {t_shape[0]} examples needs {size:,} bytes "
            f"({size / 2**30:.2f} GiB), more than max_bytes={max_bytes:,}. Use fewer "
            "examples, a smaller layer, or raise max_bytes.")
    if backend.gradient(tape._tape, target, [source])[0] is None:
        swapped = backend.gradient(tape._tape, source, [target])[0] is not None
        hint = (" The arguments look swapped: `of` is the later layer, `wrt` the earlier one."
                if swapped else "")
        raise GradprobeError(
            f"Expected `of` to depend on `wrt`: the activation of {of!r} is not computed from "
            f"{wrt!r}, so its Jacobian would be all zeros.{hint} "
            f"Received: of={of!r}, wrt={wrt!r}")
    return backend.batch_jacobian(tape._tape, target, source)
