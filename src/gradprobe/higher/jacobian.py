"""`gp.jacobian`: per-example Jacobians between two layers' activations."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from gradprobe import backends
from gradprobe.core import _functional_form, _sequence, _validate
from gradprobe.core.inputs import prepare_inputs
from gradprobe.core.keys import input_keys
from gradprobe.core.selectors import LayerTree
from gradprobe.core.tape import Tape
from gradprobe.errors import GradprobeError


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

    >>> model = keras.Sequential([keras.Input((8,)),
    ...                           keras.layers.Dense(64, activation="relu", name="dense_1"),
    ...                           keras.layers.Dense(10, name="dense_2")])
    >>> x = np.ones((2, 8), "float32")
    >>> J = gp.jacobian(model, x, of="dense_2", wrt="dense_1")
    >>> tuple(J.shape)     # (batch, 10, 64)
    (2, 10, 64)
    """
    _validate.backend_supported("gp.jacobian", backends.FUNCTIONAL)
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
    if backends.is_functional():
        return _functional_jacobian(model, inputs, of, wrt, training, max_bytes)
    x = prepare_inputs(model, inputs)
    if wrt == "inputs":
        _integer_inputs(model, x)
    watch = [of] if wrt == "inputs" else [of, wrt]
    if wrt == "inputs":
        watch.append("inputs")
    with Tape(model, watch=watch, persistent=True) as tape, keras.StatelessScope():
        model(x, training=training)
    target = tape.activation(of)
    source = tape.activation(wrt)
    t_shape = backends.static_shape(target)
    s_shape = backends.static_shape(source)
    _check_size(of, wrt, t_shape, s_shape, target.dtype.size, max_bytes)
    if backends.get().gradient(tape._tape, target, [source])[0] is None:
        swapped = backends.get().gradient(tape._tape, source, [target])[0] is not None
        _raise_not_connected(of, wrt, swapped)
    return backends.get().batch_jacobian(tape._tape, target, source)


def _check_size(of: Any, wrt: Any, t_shape: tuple, s_shape: tuple, itemsize: int,
                max_bytes: int) -> None:
    if t_shape[0] != s_shape[0]:
        raise GradprobeError(
            f"{of!r} and {wrt!r} have different batch sizes ({t_shape[0]} and {s_shape[0]}).")
    size = t_shape[0] * math.prod(t_shape[1:]) * math.prod(s_shape[1:]) * itemsize
    if size > max_bytes:
        raise GradprobeError(
            f"The Jacobian of {of!r} (per-example shape {t_shape[1:]}) with respect to "
            f"{wrt!r} ({s_shape[1:]}) for {t_shape[0]} examples needs {size:,} bytes "
            f"({size / 2**30:.2f} GiB), more than max_bytes={max_bytes:,}. Use fewer "
            "examples, a smaller layer, or raise max_bytes.")


def _raise_not_connected(of: Any, wrt: Any, swapped: bool) -> None:
    hint = (" The arguments look swapped: `of` is the later layer, `wrt` the earlier one."
            if swapped else "")
    raise GradprobeError(
        f"Expected `of` to depend on `wrt`: the activation of {of!r} is not computed from "
        f"{wrt!r}, so its Jacobian would be all zeros.{hint} "
        f"Received: of={of!r}, wrt={wrt!r}")


def _no_target(outputs: Any) -> Any:
    """The target of the forward pass `gp.jacobian` reads activations from (unused:
    a module-level function, so that the cached request is found again)."""
    return keras.ops.sum(keras.ops.convert_to_tensor(0.0))


def _integer_inputs(model: Any, x: Any) -> None:
    """Refuses a Jacobian with respect to integer inputs (token ids), naming the
    embedding layer they feed, as `gp.gradients(wrt="inputs")` does."""
    keys = input_keys(x)
    leaves = keras.tree.flatten(x)
    bad = [k for k, leaf in zip(keys, leaves) if not backends.get().is_floating(leaf)]
    if bad:
        key, hint = _sequence.integer_input_hint(model, keys, bad)
        _validate.differentiable_input(key, leaves[keys.index(key)], hint)


def _functional_jacobian(model: Any, inputs: Any, of: Any, wrt: Any, training: bool,
                         max_bytes: int) -> Any:
    """`gp.jacobian` on JAX and PyTorch: the backend's per-example Jacobian
    (`jax.jacrev` of the batch sum; one backward pass per output element on
    PyTorch) of `of`'s probed activation in `gp.functional`'s forward pass,
    with respect to `wrt`'s probe."""
    tree = LayerTree(model)

    def label(value: Any) -> str:
        return value if isinstance(value, str) else tree.node_of(value).path

    form = _functional_form.build(model, inputs, _no_target, [of, wrt], training=training,
                                  unconnected="zero", live=False, what="gp.jacobian")
    keys = {}
    for name, value in (("of", of), ("wrt", wrt)):
        found = [k for k in form.aliases.get(label(value), []) if form.kinds[k] != "weight"]
        if len(found) != 1:
            raise GradprobeError(
                f"Expected `{name}` to name one activation: {label(value)!r} has "
                f"{len(found)} ({', '.join(map(repr, found)) or 'none'}); pick one call with "
                f"'name@i'. Received: {name}={value!r}")
        keys[name] = found[0]
    of_key, wrt_key = keys["of"], keys["wrt"]
    t_shape = tuple(form.probes[of_key].shape)
    s_shape = tuple(form.probes[wrt_key].shape)
    itemsize = np.dtype(keras.backend.standardize_dtype(form.probes[of_key].dtype)).itemsize
    _check_size(of, wrt, t_shape, s_shape, itemsize, max_bytes)
    bk = backends.get()

    def make_value(request: Any, prep: Any, source: str, value_key: str) -> Any:
        objective = _functional_form.objective_fn(request, prep)

        def value(probe: Any, probes: dict, variables: dict, trainable: list,
                  non_trainable: list, x: Any, args: dict) -> Any:
            diff = {"probes": dict(probes, **{source: probe}), "vars": variables}
            return objective(diff, trainable, non_trainable, x, args)[1]["values"][value_key]

        return value

    rest = (form.probes, form.variables, *form.values(), form.inputs, form._args)

    def depends(source: str, value_key: str) -> bool:
        def make(request: Any, prep: Any) -> bool:
            value = make_value(request, prep, source, value_key)
            flags = bk.connected(lambda d, *r: (keras.ops.sum(value(d["p"], *r)), {}),
                                 {"p": form.probes[source]}, *rest)
            return bool(flags["p"])

        return form.cached(("depends", source, value_key), make)

    if not depends(wrt_key, of_key):
        _raise_not_connected(of, wrt, depends(of_key, wrt_key))

    def make_jacobian(request: Any, prep: Any) -> Any:
        value = make_value(request, prep, wrt_key, of_key)
        return bk.jit(lambda probe, *r: bk.batch_jacobian(value, probe, *r))

    return form.cached(("jacobian", wrt_key, of_key), make_jacobian)(form.probes[wrt_key], *rest)
