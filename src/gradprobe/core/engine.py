"""`gp.gradients`: gradients of a target with respect to layers, weights or inputs."""

from __future__ import annotations

import dataclasses
import functools
import inspect
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

from gradprobe import backends
from gradprobe.backends import _keras_private
from gradprobe.backends import tensorflow_backend as backend
from gradprobe.core import _sequence, _validate, capture
from gradprobe.core.result import Gradients
from gradprobe.core.selectors import (
    ActivationSource,
    InputSource,
    LayerTree,
    WeightSource,
    resolve,
)
from gradprobe.core.targets import (
    Target,
    check_output_choice,
    evaluate,
    make_target,
    output_names,
    pattern_unconnected,
)
from gradprobe.errors import GradprobeError

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

    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv2d"),
    ...     keras.layers.Flatten(),
    ...     keras.layers.Dense(10, name="dense"),
    ... ])
    >>> x = np.random.default_rng(0).random((2, 8, 8, 1), dtype="float32")
    >>> g = gp.gradients(model, x, target=3, wrt=["conv2d", "dense.kernel"])
    >>> tuple(g["conv2d"].shape)      # same as the conv2d activation
    (2, 6, 6, 4)
    >>> g.summary()
    <BLANKLINE>
    ...gradients by source...
    """
    _validate.model(model)
    options = (output, training, unconnected, compile, differentiable, per_example)
    repeat = _repeat_key(inputs, target, wrt, options)
    resolved = _repeated(model, repeat)
    if resolved is not None:
        tgt, per_example = resolved
        return run(model, inputs, tgt, wrt, output=output, training=training,
                   unconnected=unconnected, compile=compile, differentiable=differentiable,
                   per_example=per_example)
    _validate.choice("unconnected", unconnected, ("raise", "zero"), "what to do with a source "
                     "the target does not depend on")
    _validate.choice("compile", compile, ("auto", True, False))
    for name, value in (("training", training), ("differentiable", differentiable)):
        _validate.flag(name, value)
    _validate.backend_supported("gp.gradients", backends.FUNCTIONAL)
    if backends.is_functional():  # JAX: the functional capture (gradprobe.core._functional)
        from gradprobe.core import _functional  # imports this module: no top-level import

        return _functional.gradients(model, inputs, target, wrt, output=output,
                                     training=training, unconnected=unconnected,
                                     compile=compile, differentiable=differentiable,
                                     per_example=per_example)
    x = prepare_inputs(model, inputs)
    ensure_built(model, x)
    tgt = make_target(target, batch_size(x))
    from gradprobe.higher.per_example import check_method  # it imports this module

    per_example = check_method(per_example)
    _remember(model, repeat, x is inputs, tgt, per_example)
    return run(model, x, tgt, wrt, output=output, training=bool(training),
               unconnected=unconnected, compile=compile, differentiable=differentiable,
               per_example=per_example)


# -------------------------------------------------------------- repeated requests
# The interactive loop asks the same question of new inputs: the same model, layer
# name, class and options, and an eager tensor of the same dtype and shape. Everything
# `gp.gradients` checks and resolves before running depends on nothing else, so an
# identical earlier call that got that far is remembered, and the call goes straight
# to `run` (which still looks up the plan, checks the model's structure and the input
# dtypes). It saves about a third of gradprobe's Python per call (0.1-0.2 ms between
# the calls of a compiled model). Other requests (objects, lists, callables, arrays,
# graph tensors) always take the full path.
_repeats: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OrderedDict
_REPEATS_KEPT = 16
_PLAIN_OPTION_TYPES = (bool, str, int, type(None))


def _repeat_key(inputs: Any, target: Any, wrt: Any, options: tuple) -> tuple | None:
    """The key of a request of the simple kind (a str selector, an int class, plain
    options, one eager TensorFlow tensor), or `None`. Option types are part of the
    key, so that `True` and `1` (which compare equal) never share an entry."""
    if type(wrt) is not str or type(target) is not int or backends.is_functional():
        return None
    if not all(type(o) in _PLAIN_OPTION_TYPES for o in options):
        return None
    if not backend.is_eager_tensor(inputs) or not inputs.dtype.is_floating:
        return None  # (integer inputs, token ids, are checked against the vocabulary each call)
    return (wrt, target, tuple((type(o), o) for o in options), inputs.dtype,
            tuple(inputs.shape))


def _repeated(model: Any, key: tuple | None) -> tuple | None:
    """`(target, per_example)` that an identical earlier call resolved, or `None`."""
    if key is None:
        return None
    with _lock:
        per_model = _repeats.get(model)
        return per_model.get(key) if per_model is not None else None


def _remember(model: Any, key: tuple | None, unchanged: bool, tgt: Target,
              per_example: Any) -> None:
    if key is None or not unchanged:  # (inputs that preparation changed: not repeatable)
        return
    with _lock:
        per_model = _repeats.get(model)
        if per_model is None:
            per_model = _repeats[model] = OrderedDict()
        per_model[key] = (tgt, per_example)
        while len(per_model) > _REPEATS_KEPT:
            per_model.popitem(last=False)


def run(model: Any, x: Any, tgt: Target, wrt: Any, *, output: Any, training: bool,
        unconnected: str = "raise", compile: bool | str = "auto", differentiable: bool = True,
        per_example: bool | str = False, replacement: Any = None) -> Gradients:
    """`gp.gradients` for a request already resolved, on every backend: inputs
    prepared, model built, target made and arguments validated (`resolve_request` or
    the public function did it). With `replacement`, `gradients_at`: the
    activation of the one layer `wrt` names is replaced by it."""
    if backends.is_functional():
        from gradprobe.core import _functional  # imports this module: no top-level import

        return _functional.run(model, x, tgt, wrt, output=output, training=training,
                               unconnected=unconnected, compile=compile,
                               differentiable=differentiable, per_example=per_example,
                               replacement=replacement)
    replace = replacement is not None
    entry = _entry(model, wrt, tgt, output, training, unconnected, per_example, replace)
    _check_input_dtypes(model, x, entry.plan)
    args = dict(tgt.args, replacement=backend.to_tensor(replacement)) if replace else tgt.args
    tensors, meta = _execute(model, x, args, entry, compile)
    return result_of(tensors, meta, tgt, entry.plan, differentiable, backend.stop_gradient)


def result_of(tensors: dict, meta: dict, tgt: Target, plan: capture.Plan,
              differentiable: bool, stop_gradient: Callable[[Any], Any]) -> Gradients:
    """The `Gradients` of a capture's run (`tensors`, `meta`) on any backend: the
    target checked against what the run saw, the gradients made constants unless
    `differentiable`, and the per-example annotations."""
    from gradprobe.higher.per_example import annotate  # it imports this module

    tgt.check(meta["target"])
    tgt.check_outputs(tensors["outputs"], meta["target"])
    grads = tensors["grads"]
    if not differentiable:
        grads = stop_gradient(grads)
    result = Gradients(grads, meta, tensors["values"], tensors["outputs"], tensors["target"],
                       {v.key: v.var for v in plan.vars})
    return annotate(result, meta)


# ------------------------------------------------------------ resolved requests
@dataclass(frozen=True)
class Request:
    """A request resolved once (`resolve_request`): the model, its inputs prepared on
    this backend, the target made once, `output` and `training`.

    Attribution methods resolve one per public call and send every chunk of
    modified inputs through `gradients(..., rows=...)`, with a view of the same
    target (`Target.take`): nothing is validated, prepared or resolved again.
    """

    model: Any
    x: Any
    target: Target
    output: Any = None
    training: bool = False

    def fixed(self) -> Request:
        """This request with a `"predicted"` target fixed to each example's class
        on its own inputs (one forward pass), so that modified copies of an
        example keep that example's class."""
        if not self.target.predicts:
            return self
        ev = evaluate(self.model, self.x, self.target, output=self.output,
                      training=self.training)
        return dataclasses.replace(self, target=self.target.fixed(ev.selected))

    def gradients(self, wrt: Any, *, x: Any = None, rows: Any = None,
                  unconnected: str = "raise", replacement: Any = None) -> Gradients:
        """`gp.gradients(model, x, target, wrt)` for this request, on `x` (default:
        its own inputs), the target taken at `rows` (one example index per row
        of `x`; default: the whole batch); with `replacement`, `gradients_at`."""
        tgt = self.target if rows is None else self.target.take(rows)
        return run(self.model, self.x if x is None else x, tgt, wrt, output=self.output,
                   training=self.training, unconnected=unconnected, replacement=replacement)


def prepare(model: Any, inputs: Any) -> Any:
    """The inputs prepared as `gp.gradients` prepares them on this backend (the
    model validated, and built if it was not)."""
    _validate.model(model)
    if backends.is_functional():
        from gradprobe.core import _functional  # imports this module: no top-level import

        x = _functional.prepare_inputs(model, inputs)
    else:
        x = prepare_inputs(model, inputs)
    ensure_built(model, x)
    return x


def resolve_request(model: Any, inputs: Any, target: Any, *, output: Any = None,
                    training: bool = False) -> Request:
    """A `Request`: the inputs prepared, the model built, the target made
    (`make_target`, the one time for a public call) and `training` checked."""
    _validate.flag("training", training)
    _validate.backend_supported("gp.gradients", backends.FUNCTIONAL)
    x = prepare(model, inputs)
    return Request(model, x, make_target(target, batch_size(x)), output, bool(training))


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
    check_output_choice(model, output, tgt)
    unconnected = pattern_unconnected(model, output, sources, unconnected)
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


def alias_sources(tree: LayerTree, wrt: Any, sources: list) -> list:
    """Sources that a later selector of `wrt` names again (`["inner/d1", "d1"]`),
    under that selector: `resolve` keeps the first; the capture computes each
    source once and records the other selector as an alias of its key."""
    if not isinstance(wrt, (list, tuple)) or len(wrt) < 2:
        return []
    claimed = {s.spec: s.requested for s in sources}
    extra, seen = [], set()
    for item in wrt:
        for s in resolve(tree, item):
            if claimed.get(s.spec, s.requested) != s.requested and \
                    (s.spec, s.requested) not in seen:
                seen.add((s.spec, s.requested))
                extra.append(s)
    return extra


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
    `inputs`, whose batch must match `values`). Used by layer Integrated Gradients;
    on every backend.
    """
    return resolve_request(model, inputs, target, output=output,
                           training=training).gradients(layer, replacement=values)


def _entry(model: Any, wrt: Any, tgt: Any, output: Any, training: bool,
           unconnected: str, per_example: bool | str = False,
           replace: bool = False) -> _Entry:
    """The cached plan for this request, or a new one (layer lookup is skipped on
    repeated calls, so that small models do not pay for it on every call)."""

    def build() -> capture.Plan:
        tree = LayerTree(model)
        sources = resolve(tree, wrt)
        plan = make_plan(model, tree, sources + alias_sources(tree, wrt, sources), tgt, output,
                         training, unconnected)
        plan.per_example = per_example
        if replace:
            if len(plan.acts) != 1 or plan.vars or plan.inputs:
                raise GradprobeError(
                    f"Only one layer's activation (its only call, or one call 'name@i') can "
                    f"be replaced; got layer={wrt!r}.")
            plan.replace = plan.acts[0].layer
            plan.replace_call = plan.acts[0].call
        return plan

    return cached_entry(model, wrt, (tgt.cache_key, output, training, unconnected, per_example,
                                     replace), build)


def cached_entry(model: Any, wrt: Any, options: tuple,
                 build: Callable[[], capture.Plan]) -> _Entry:
    """The cache entry for (`wrt`, `options`) on `model`, built by `build()` when
    missing or when the model's layers changed. Each model keeps the
    `_CACHE_SIZE` most recently used entries.

    The cache never keeps a model alive: it is keyed by the model weakly, and
    neither its keys nor its entries hold the request's objects (a target
    callable, a bound method, a loss object, layers, variables) strongly, since
    any of them may reference the model. Keys hold them by weak reference, and
    the cached plan's target calls its function through a weak proxy (the
    caller holds the function for as long as the call runs).
    """
    key = _hashable(wrt)
    fingerprint = _fingerprint(model)
    if key is not None:
        key = _weak_key((key, *options))
    if key is not None:
        with _lock:
            per_model = _cache.get(model)
            entry = per_model.get(key) if per_model is not None else None
            if entry is not None and entry.fingerprint == fingerprint:
                per_model.move_to_end(key)
                return entry
    plan = build()
    plan.target = _weak_target(plan.target)
    entry = _Entry(fingerprint, plan)
    if key is not None:
        with _lock:
            per_model = _cache.get(model)
            if per_model is None:
                per_model = _cache[model] = OrderedDict()
            for stale in [k for k in per_model if not _alive(k)]:
                del per_model[stale]
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
            key.append(("object", _WeakRef(item)))
        else:
            return None
    return (type(wrt).__name__, tuple(key))


class _WeakRef:
    """A hashable identity key that holds its object weakly (a bound method by
    its instance and function); a key whose object died equals nothing."""

    __slots__ = ("_ref", "_hash", "_method")

    def __init__(self, obj: Any):
        self._method = inspect.ismethod(obj)
        if self._method:
            self._ref = weakref.WeakMethod(obj)
            self._hash = hash((id(obj.__self__), id(obj.__func__)))
        else:
            self._ref = weakref.ref(obj)
            self._hash = id(obj)

    def alive(self) -> bool:
        return self._ref() is not None

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _WeakRef) or other._method != self._method:
            return False
        a, b = self._ref(), other._ref()
        if a is None or b is None:
            return False
        return a == b if self._method else a is b


_PLAIN = (str, bytes, int, float, complex, bool, type(None), np.generic)
_PLAIN_TYPES = frozenset(_PLAIN[:-1])


def _weak_key(key: Any) -> Any:
    """`key` with every object that is not a plain value held weakly."""
    if type(key) is tuple and all(type(k) in _PLAIN_TYPES for k in key):
        return key  # (the usual options: strings, flags, None)
    if isinstance(key, (*_PLAIN, _WeakRef, type)):
        return key
    if isinstance(key, (tuple, list)):
        return tuple(_weak_key(k) for k in key)
    if isinstance(key, frozenset):
        return frozenset(_weak_key(k) for k in key)
    try:
        return _WeakRef(key)
    except TypeError:  # cannot be weakly referenced (a builtin): it holds no model
        return key


def _alive(key: Any) -> bool:
    if isinstance(key, _WeakRef):
        return key.alive()
    if isinstance(key, (tuple, frozenset)):
        return all(_alive(k) for k in key)
    return True


def _weak_target(target: Any) -> Any:
    """A copy of a resolved target whose user function (a callable or a loss
    object, which may reference the model) is held weakly, for the cache."""
    target = target.for_cache()  # (the arguments arrive with each call)
    fn = getattr(target, "fn", None)
    if fn is not None:
        target.fn = _weak_callable(fn)
    target.cache_key = _weak_key(target.cache_key)
    return target


def _weak_callable(fn: Any) -> Any:
    if inspect.ismethod(fn):
        ref = weakref.WeakMethod(fn)

        def call(*args: Any, **kwargs: Any) -> Any:  # no functools.wraps: no __wrapped__
            return _referent(ref)(*args, **kwargs)

        return call
    try:
        return weakref.proxy(fn)  # isinstance(proxy, keras.losses.Loss) still holds
    except TypeError:
        return fn


def _referent(ref: Any) -> Any:
    obj = ref()
    if obj is None:  # pragma: no cover - the caller holds the function while it runs
        raise GradprobeError("The target function of a cached request no longer exists.")
    return obj


def _fingerprint(model: Any) -> tuple:
    """Changes when layers or weights are added to the model (or to a layer in it)."""
    return _keras_private.structure(model)


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
    depth = _keras_private.name_scope_depth()
    try:
        tensors, meta = fn(x, args)
    except Exception as e:
        # A failed trace can leave a Keras name scope open: close it, or every
        # variable the user creates afterwards would be named under it.
        _keras_private.close_name_scopes_above(depth)
        if isinstance(e, GradprobeError):
            raise
        if compile is True:
            raise compile_error(model, e, "tf.function") from e
        tensors, meta = capture.run(model, x, args, plan, wrap_errors=True)
        entry.eager_only = True
        warnings.warn(
            f"gradprobe: model {model.name!r} could not be compiled with tf.function "
            f"({type(e).__name__}: {_last_line(e)}); running eagerly from now on. "
            "Pass compile=False to silence this.",
            RuntimeWarning, stacklevel=3)
    return tensors, meta


def compile_error(model: Any, e: BaseException, tool: str) -> GradprobeError:
    """The error of `compile=True` when `model` cannot be traced by `tool`: what failed,
    and the two ways to run it (the eager fallback of 'auto', or eager on request)."""
    return GradprobeError(
        f"Model {getattr(model, 'name', model)!r} could not be compiled with {tool} "
        f"({type(e).__name__}: {_last_line(e)}). Received: compile=True. Pass "
        "compile='auto' (the default: falls back to eager with a warning) or compile=False "
        "to run it eagerly, or make its call traceable (no NumPy conversion or Python "
        "control flow on tensor values).")


def _last_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else ""


class Compiled:
    """A compiled `run(model, x, args, plan) -> (tensors, meta)`: calling it
    returns `(tensors, meta)` as `run` does.

    `meta` (keys, order, aliases...) is plain Python, known once the trace has
    run: every trace records it here, so a call needs no host round-trip and no
    decoding for it. It also leaves the trace as a JSON string tensor, decoded
    only when two traces of one request (two input shapes) disagree on it. The
    returned `meta` is shared between calls: read it, never modify it.

    The compiled function takes the arguments' values positionally and returns
    a flat list (one function per set of argument names; the nesting is put back
    here, from what the trace recorded): `tf.function` binds and canonicalises a
    dict argument and a nested result in Python on every call, about 0.1 ms more
    than positional tensors between the calls of a small model.
    """

    def __init__(self, model: Any, plan: capture.Plan, run: Callable):
        self._model_ref = weakref.ref(model)  # the cache must not keep models alive
        self._plan, self._run = plan, run
        # argument names -> (the compiled function, {JSON text: (meta, result structure)})
        self._fns: dict[tuple, tuple[Any, dict]] = {}

    def _function(self, names: tuple) -> tuple[Any, dict]:
        found = self._fns.get(names)
        if found is not None:
            return found
        model_ref, plan, run = self._model_ref, self._plan, self._run
        traces: dict[str, tuple[dict, Any]] = {}

        def traced(x: Any, *values: Any) -> list:
            tensors, meta = run(model_ref(), x, dict(zip(names, values)), plan)
            text = json.dumps(meta)
            traces.setdefault(text, (json.loads(text), keras.tree.map_structure(
                lambda _: 0, tensors)))
            return [*keras.tree.flatten(tensors), backend.constant_string(text)]

        return self._fns.setdefault(names, (backend.compile_function(traced), traces))

    def __call__(self, x: Any, args: dict) -> tuple[Any, dict]:
        fn, traces = self._function(tuple(args))
        flat = fn(x, *args.values())
        if len(traces) == 1:  # (traces run in the call, before this line)
            meta, structure = next(iter(traces.values()))
        else:
            meta, structure = traces[backend.decode_string(flat[-1])]
        return keras.tree.pack_sequence_as(structure, flat[:-1]), meta

    def experimental_get_tracing_count(self) -> int:
        """How many times the request was traced (`tf.function`'s count)."""
        return sum(fn.experimental_get_tracing_count() for fn, _ in list(self._fns.values()))


def compiled(model: Any, plan: capture.Plan, run: Callable) -> Compiled:
    """The compiled function of one request (see `Compiled`)."""
    return Compiled(model, plan, run)


def clear_cache() -> None:
    """Forgets every compiled gradient function (they are rebuilt on demand)."""
    with _lock:
        _cache.clear()
        _repeats.clear()


# --------------------------------------------------------------------- inputs
def prepare_inputs(model: Any, inputs: Any) -> Any:
    """Converts arrays to tensors; floating arrays take the model's input dtype."""
    _validate.model(model)
    _validate.inputs(inputs)
    specs = getattr(model, "inputs", None) or []
    spec_dtypes = [getattr(s, "dtype", None) for s in specs]

    leaves = [inputs] if backend.is_tensor(inputs) else keras.tree.flatten(inputs)
    leaves = [leaf if backend.is_tensor(leaf) else np.asarray(leaf) for leaf in leaves]
    _validate.model_inputs(model, inputs, leaves,
                           [getattr(d, "name", d) for d in spec_dtypes])
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
        raise capture.call_error(model, x, e) from e


def _check_input_dtypes(model: Any, x: Any, plan: capture.Plan,
                        is_floating: Callable[[Any], bool] | None = None,
                        shown: Callable[[Any], Any] = lambda leaf: leaf) -> None:
    """Refuses an input source that is not floating (token ids, masks), with a
    hint naming the layer to take instead. `is_floating` (TensorFlow's by default)
    and `shown` (what the error is given for the leaf) are the backend's."""
    if not plan.inputs:
        return
    if is_floating is None:
        is_floating = backend.is_floating
    keys = capture.input_keys(x)
    wanted = {k for spec in plan.inputs for k in keys
              if spec.index is None or k == f"inputs:{spec.index}"
              or (k == "inputs" and spec.index == 0)}
    leaves = dict(zip(keys, keras.tree.flatten(x)))
    bad = [k for k in keys if k in wanted and not is_floating(leaves[k])]
    if bad:
        key, hint = _sequence.integer_input_hint(model, keys, bad)
        _validate.differentiable_input(key, shown(leaves[key]), hint)
