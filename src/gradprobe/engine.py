"""`gp.gradients`: gradients of a target with respect to layers, weights or inputs."""

from __future__ import annotations

import functools
import json
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from gradprobe import backend, capture
from gradprobe.errors import GradprobeError, quoted
from gradprobe.result import Gradients
from gradprobe.selectors import (
    ActivationSource,
    InputSource,
    LayerTree,
    WeightSource,
    resolve,
)
from gradprobe.targets import make_target, output_names

__all__ = ["gradients", "clear_cache"]

_CACHE_SIZE = 16
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def gradients(
    model: keras.Model,
    inputs: Any,
    target: Any,
    wrt: Any,
    *,
    output: str | int | None = None,
    training: bool = False,
    unconnected: str = "raise",
    compile: bool | str = "auto",
    differentiable: bool = True,
    per_example: bool | str = False,
) -> Gradients:
    """Gradients of a scalar target with respect to layers, weights or inputs.

    The model runs its own forward pass once (no probe model, no rewritten
    `call`): each requested layer's output gets a zero probe added as the layer
    produces it, and one backward pass gives every requested gradient. Works on
    Sequential, Functional and subclassed models, nested models, layers nested
    in custom layers, shared layers (one result per call), multi-input and
    multi-output models. The model is left exactly as it was.

    Args:
        model: A Keras 3 model.
        inputs: Whatever `model(...)` accepts: an array, a tensor, or a
            list/tuple/dict for multi-input models.
        target: The objective, summed over the batch when it is per example:
            an `int` class index (`outputs[:, k]`); a sequence of ints, one class
            per example; `"predicted"` (each example's arg-max class);
            `gp.loss(loss_fn, y_true, sample_weight=None)`; or a callable
            `f(outputs)` returning a scalar or one value per example.
        wrt: One selector or a list: a layer name or path (its activation),
            `"name@i"` (one call of a shared layer), `"name.kernel"` or any
            variable name, `"name.weights"`, `"inputs"`, glob patterns (`"conv*"`,
            `"*"`, `"*.kernel"`), a layer object or a variable object.
        output: For a multi-output model, the output the target is computed
            from, by name or index. A layer name that is not a model output
            computes the target on that layer's activation instead.
        training: Passed to the model (`False`: inference behaviour). Moving
            statistics and random-seed state are not updated either way.
        unconnected: `"raise"` (default) when the target does not depend on a
            source, or `"zero"` to return zeros for it.
        compile: `"auto"` (default) runs a cached `tf.function`, falling back to
            eager execution (with a warning) when the model cannot be traced;
            `True` always compiles; `False` runs eagerly.
        differentiable: When called under an outer `tf.GradientTape`, keep the
            returned gradients differentiable (`True`) or treat them as constants.
        per_example: Return, for weight sources, one gradient per example (a
            leading batch axis). Needs a per-example target. `True` uses the
            fastest correct method (`tf.vectorized_map` over single-example
            passes, or the Jacobian of the per-example targets as the fallback);
            `"vectorized_map"` or `"jacobian"` force one. The result's
            `per_example_method` (key -> method) and `per_example_fallbacks`
            (key -> why the Jacobian was used) report the choice. For norms
            only, `gp.per_example_norms` is much cheaper.

    Returns:
        A `Gradients` mapping from key to gradient (same shape as the source),
        with `.activations`, `.target`, `.outputs`, `.stats()`, `.summary()` and
        `.diagnose()`.

    Example:

    >>> g = gp.gradients(model, x, target=3, wrt=["conv2d", "dense.kernel"])
    >>> g["conv2d"].shape      # same as the conv2d activation
    >>> g.summary()
    """
    if unconnected not in ("raise", "zero"):
        raise GradprobeError(f"unconnected must be 'raise' or 'zero'; got {unconnected!r}.")
    if compile not in ("auto", True, False):
        raise GradprobeError(f"compile must be 'auto', True or False; got {compile!r}.")
    if not isinstance(model, keras.layers.Layer):
        raise GradprobeError(
            f"gp.gradients needs a Keras 3 model (keras.Model); got {type(model).__name__}. "
            "tf_keras (Keras 2) models are not supported."
        )
    x = prepare_inputs(model, inputs)
    ensure_built(model, x)
    tgt = make_target(target, batch_size(x))
    from gradprobe.per_example import annotate, check_method  # it imports this module

    per_example = check_method(per_example)
    entry = _entry(model, wrt, tgt, output, bool(training), unconnected, per_example)
    _check_input_dtypes(model, x, entry.plan)

    tensors, meta = _execute(model, x, tgt.args, entry, compile)
    tgt.check(meta["target"])
    grads = tensors["grads"]
    if not differentiable:
        grads = backend.stop_gradient(grads)
    result = Gradients(grads, meta, tensors["values"], tensors["outputs"], tensors["target"],
                       {v.key: v.var for v in entry.plan.vars})
    return annotate(result, meta)


# ------------------------------------------------------------------- planning
def to_specs(tree: LayerTree, sources: list) -> tuple[list, list, list]:
    """Splits resolved sources into activation, variable and input specs."""
    acts, vars_, inputs = [], [], []
    for s in sources:
        if isinstance(s, ActivationSource):
            acts.append(capture.ActSpec(s.node.layer, s.node.path, s.node.kind, s.call,
                                        s.requested, s.explicit))
        elif isinstance(s, WeightSource):
            owner = s.node.layer if s.node is not None and s.node is not tree.root else None
            vars_.append(capture.VarSpec(s.var, s.key, owner, s.requested, s.explicit))
        elif isinstance(s, InputSource):
            inputs.append(capture.InputSpec(s.index, s.requested))
    return acts, vars_, inputs


def make_plan(model: Any, tree: LayerTree, sources: list, tgt: Any, output: Any,
              training: bool, unconnected: str) -> capture.Plan:
    acts, vars_, inputs = to_specs(tree, sources)
    names = output_names(model)
    output_layer = None
    if isinstance(output, str) and output not in names:
        try:
            node = tree.find(output)
        except GradprobeError:
            node = None
        if node is not None and node is not tree.root and not node.is_input:
            output_layer = node.layer
    return capture.Plan(acts, vars_, inputs, tgt, output, output_layer, names,
                        bool(training), unconnected)


@dataclass
class _Entry:
    """A resolved request for one model, and its compiled function once built."""

    fingerprint: tuple
    plan: capture.Plan
    fn: Any = None
    eager_only: bool = False


def gradients_at(model: keras.Model, inputs: Any, target: Any, layer: Any, values: Any, *,
                 output: Any = None, training: bool = False) -> Gradients:
    """Gradients with respect to `layer`'s activation when that activation is
    replaced by `values` in the forward pass (the layers before it still run on
    `inputs`, whose batch must match `values`). Used by layer Integrated Gradients.
    """
    x = prepare_inputs(model, inputs)
    ensure_built(model, x)
    tgt = make_target(target, batch_size(x))
    entry = _entry(model, layer, tgt, output, bool(training), "raise", replace=True)
    args = dict(tgt.args, replacement=backend.to_tensor(values))
    tensors, meta = _execute(model, x, args, entry, "auto")
    tgt.check(meta["target"])
    return Gradients(tensors["grads"], meta, tensors["values"], tensors["outputs"],
                     tensors["target"])


def _entry(model: Any, wrt: Any, tgt: Any, output: Any, training: bool,
           unconnected: str, per_example: bool | str = False,
           replace: bool = False) -> _Entry:
    """The cached plan for this request, or a new one (layer lookup is skipped on
    repeated calls, so that small models do not pay for it on every call)."""

    def build() -> capture.Plan:
        tree = LayerTree(model)
        plan = make_plan(model, tree, resolve(tree, wrt), tgt, output, training, unconnected)
        plan.per_example = per_example
        if replace:
            if len(plan.acts) != 1 or plan.vars or plan.inputs or plan.acts[0].call is not None:
                raise GradprobeError(
                    f"Only one layer's activation (every call) can be replaced; got wrt={wrt!r}.")
            plan.replace = plan.acts[0].layer
        return plan

    return cached_entry(model, wrt, (tgt.cache_key, output, training, unconnected, per_example,
                                     replace), build)


def cached_entry(model: Any, wrt: Any, options: tuple,
                 build: Callable[[], capture.Plan]) -> _Entry:
    """The cache entry for (`wrt`, `options`) on `model`, built by `build()` when
    missing or when the model's layers changed. Each model keeps the
    `_CACHE_SIZE` most recently used entries."""
    key = _hashable(wrt)
    fingerprint = _fingerprint(model)
    if key is not None:
        key = (key, *options)
        with _lock:
            per_model = _cache.get(model)
            entry = per_model.get(key) if per_model is not None else None
            if entry is not None and entry.fingerprint == fingerprint:
                per_model.move_to_end(key)
                return entry
    entry = _Entry(fingerprint, build())
    if key is not None:
        with _lock:
            per_model = _cache.get(model)
            if per_model is None:
                per_model = _cache[model] = OrderedDict()
            per_model[key] = entry
            while len(per_model) > _CACHE_SIZE:
                per_model.popitem(last=False)
    return entry


def _hashable(wrt: Any) -> tuple | None:
    items = wrt if isinstance(wrt, (list, tuple)) else [wrt]
    key = []
    for item in items:
        if isinstance(item, str):
            key.append(item)
        elif isinstance(item, (keras.layers.Layer, keras.Variable)):
            key.append(("object", id(item)))
        else:
            return None
    return (type(wrt).__name__, tuple(key))


def _fingerprint(model: Any) -> tuple:
    """Changes when layers or weights are added to the model."""
    return (tuple(id(layer) for layer in model.layers), len(model.weights))


# ------------------------------------------------------------------ execution
def _execute(model: Any, x: Any, args: dict, entry: _Entry,
             compile: bool | str) -> tuple[dict, dict]:
    plan = entry.plan
    if not backend.executing_eagerly() or compile is False:
        # Inside the user's own tf.function (or eager by request): run inline.
        return capture.run(model, x, args, plan, wrap_errors=True)
    if compile == "auto" and entry.eager_only:
        return capture.run(model, x, args, plan, wrap_errors=True)
    if entry.fn is None:
        entry.fn = compiled(model, plan, functools.partial(capture.run, wrap_errors=False))
    fn = entry.fn
    try:
        tensors, meta = fn(x, args)
    except GradprobeError:
        raise
    except Exception as e:
        if compile is True:
            raise
        tensors, meta = capture.run(model, x, args, plan, wrap_errors=True)
        entry.eager_only = True
        warnings.warn(
            f"gradprobe: model {model.name!r} could not be compiled with tf.function "
            f"({type(e).__name__}: {_last_line(e)}); running eagerly from now on. "
            "Pass compile=False to silence this.",
            RuntimeWarning, stacklevel=3)
        return tensors, meta
    return tensors, json.loads(backend.decode_string(meta))


def _last_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def compiled(model: Any, plan: capture.Plan, run: Callable) -> Any:
    """A `tf.function` computing `run(model, x, args, plan) -> (tensors, meta)`,
    with `meta` shipped out of the trace as a JSON string. The model is held
    weakly: the cache must not keep models alive."""
    model_ref = weakref.ref(model)

    def traced(x: Any, args: dict) -> tuple[dict, Any]:
        tensors, meta = run(model_ref(), x, args, plan)
        return tensors, backend.constant_string(json.dumps(meta))

    return backend.compile_function(traced)


def clear_cache() -> None:
    """Forgets every compiled gradient function (they are rebuilt on demand)."""
    with _lock:
        _cache.clear()


# --------------------------------------------------------------------- inputs
def prepare_inputs(model: Any, inputs: Any) -> Any:
    """Converts arrays to tensors; floating arrays take the model's input dtype."""
    if inputs is None:
        raise GradprobeError("inputs is None: pass the batch the model should run on.")
    specs = getattr(model, "inputs", None) or []
    spec_dtypes = [getattr(s, "dtype", None) for s in specs]

    leaves = keras.tree.flatten(inputs)
    converted = []
    for i, leaf in enumerate(leaves):
        if backend.is_tensor(leaf):
            converted.append(leaf)
            continue
        arr = np.asarray(leaf)
        if arr.dtype == object:
            raise GradprobeError(
                f"Input {i} is an object array; pass numeric arrays or tensors.")
        dtype = None
        if np.issubdtype(arr.dtype, np.floating):
            dtype = spec_dtypes[i] if len(spec_dtypes) == len(leaves) and spec_dtypes[i] else \
                getattr(model, "compute_dtype", None)
        converted.append(backend.to_tensor(arr, dtype))
    if len(leaves) == 1 and not isinstance(inputs, (list, tuple, dict)):
        return converted[0]
    return keras.tree.pack_sequence_as(inputs, converted)


def batch_size(x: Any) -> int:
    leaves = keras.tree.flatten(x)
    shape = backend.static_shape(leaves[0]) if leaves else ()
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
        raise GradprobeError(
            f"Model {model.name!r} could not be called on the given inputs "
            f"({capture.describe_inputs(x)}): {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''} "
            f"The model expects {capture.expected_inputs(model)}."
        ) from e


def _check_input_dtypes(model: Any, x: Any, plan: capture.Plan) -> None:
    if not plan.inputs:
        return
    keys = capture.input_keys(x)
    for key, leaf in zip(keys, keras.tree.flatten(x)):
        if backend.is_floating(leaf):
            continue
        tree = LayerTree(model)
        embeddings = [n.path for n in tree.nodes if isinstance(n.layer, keras.layers.Embedding)]
        hint = (f" Differentiate with respect to the embedding layer's output instead: "
                f"wrt={embeddings[0]!r}." if embeddings else
                " Differentiate with respect to the first layer that turns them into floats.")
        raise GradprobeError(
            f"{key!r} has dtype {backend.dtype_name(leaf)}: gradients with respect to "
            f"integer inputs (such as token ids) do not exist.{hint}"
            + (f" Embedding layers: {quoted(embeddings)}." if len(embeddings) > 1 else "")
        )
