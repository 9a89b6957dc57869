"""`gp.intervene`: run a model with chosen layer activations replaced.

The replacement happens inside the model's own forward pass, at the selected
layer calls (`core/_patch.py` routes the calls; nothing of the model changes),
so it works for every kind of model the capture handles: Sequential,
Functional, subclassed, nested, and shared layers (`"name@i"` for one call).
With `target=` and `wrt=`, the gradients are those of `gp.gradients` computed
on the intervened forward pass.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras import ops

from gradprobe.causal import _sites
from gradprobe.causal._sites import Hooks, Site
from gradprobe.core import _validate, dispatch
from gradprobe.core.inputs import batch_size, prepare_inputs
from gradprobe.core.result import Gradients
from gradprobe.core.targets import evaluate, make_target
from gradprobe.errors import GradprobeError

_MODES = ("zero", "mean")


@dataclass
class Intervention:
    """The result of `gp.intervene`.

    Attributes:
        outputs: The model's outputs under the intervention.
        target: The target's value under the intervention (per example where
            the target is per example), or `None` without `target=`.
        gradients: A `gp.Gradients` of the target with respect to `wrt` under the
            intervention, or `None` without `wrt=`.
        replaced: Selector -> the call indices of its layer that were replaced
            (`[0]` for a layer called once; `[0, 1]` for a shared layer selected
            by name; `[1]` for `"name@1"`).
    """

    outputs: Any
    target: Any = None
    gradients: Gradients | None = None
    replaced: dict[str, list[int]] = field(default_factory=dict)


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return value
    if callable(value):
        return "function"
    return "value"


class _Action:
    """What `set[selector]` does to one call's output."""

    def __init__(self, site: Site, selector: str, value: Any):
        self.site, self.selector, self.value = site, selector, value
        self.kind = _describe(value)
        self.tensor = None
        if self.kind == "value":
            self.shape = tuple(value.shape)

    @property
    def name(self) -> str:
        return f"set[{self.selector!r}]"

    def __call__(self, layer: Any, index: int, outputs: Any) -> Any:
        out = _sites.single_output(self.site, outputs, self.name)
        shape = tuple(out.shape)
        if self.kind == "zero":
            new = ops.zeros_like(out)
        elif self.kind == "mean":
            mean = ops.stop_gradient(ops.mean(out, axis=0, keepdims=True))
            new = ops.broadcast_to(mean, shape)
        elif self.kind == "function":
            new = self.value(out)
            got = tuple(getattr(new, "shape", np.shape(new)))
            if got != shape:
                raise GradprobeError(
                    f"Expected the function given as {self.name} to return a tensor of the "
                    f"layer's output shape {shape} (layer {self.site.path!r}, call {index}). "
                    f"Received: a result of shape {got}.")
            new = ops.cast(new, out.dtype)
        else:
            try:
                np.broadcast_shapes(self.shape, shape)
                ok = len(self.shape) <= len(shape) and \
                    np.broadcast_shapes(self.shape, shape) == shape
            except ValueError:
                ok = False
            if not ok:
                raise GradprobeError(
                    f"Expected {self.name} to be broadcastable to the output of layer "
                    f"{self.site.path!r} (call {index}), shape {shape}. Received: a value of "
                    f"shape {self.shape}.")
            new = ops.broadcast_to(ops.cast(self.value, out.dtype), shape)
        if isinstance(outputs, (list, tuple, dict)):
            return keras.tree.pack_sequence_as(outputs, [new])
        return new


def _check_value(selector: str, value: Any) -> Any:
    name = f"set[{selector!r}]"
    expected = ("'zero', 'mean', a function of the activation, or an array or tensor "
                "broadcastable to the activation's shape.")
    if isinstance(value, str):
        if value not in _MODES:
            raise _validate.fail(name, value, expected)
        return value
    if callable(value) and not hasattr(value, "shape"):
        return value
    if value is None or isinstance(value, (bool, dict, set, frozenset)):
        raise _validate.fail(name, value, expected)
    try:
        arr = value if hasattr(value, "shape") and hasattr(value, "dtype") else np.asarray(value)
    except Exception:
        raise _validate.fail(name, value, expected) from None
    try:
        dtype = keras.backend.standardize_dtype(arr.dtype)
        numeric = keras.backend.is_float_dtype(dtype) or "int" in dtype
    except Exception:
        numeric = False
    if not numeric:
        raise _validate.fail(name, value, expected)
    return arr


def _selector_text(key: Any) -> str:
    if isinstance(key, str):
        return key
    return getattr(key, "name", repr(key))


def plan(model: Any, set_: Any) -> tuple[Hooks, list[tuple[Site, _Action]]]:
    """The hooks of `set=`: one action per selected site (a pattern selects every
    matching leaf layer, each with the same value)."""
    if not isinstance(set_, Mapping) or not set_:
        raise _validate.fail("set", set_, "a non-empty dict from a layer selector (a name, "
                             "'name@i', a pattern or a layer) to 'zero', 'mean', a function "
                             "or a value, e.g. set={'dense': 'zero'}.")
    hooks = Hooks()
    planned = []
    for key, value in set_.items():
        selector = _selector_text(key)
        checked = _check_value(selector, value)
        if not isinstance(key, (str, keras.layers.Layer)):
            raise _validate.fail("set", set_, "a dict whose keys are layer selectors (names, "
                                 f"'name@i', patterns) or layers; got the key {key!r}.")
        for site in _sites.resolve_sites(model, key, f"set[{selector!r}]"):
            action = _Action(site, selector, checked)
            hooks.add(site.layer, site.call, action)
            planned.append((site, action))
    return hooks, planned


def _intervened_target(tgt: Any, planned: list[tuple[Site, _Action]]) -> Any:
    """The target with a cache key of its own: the gradient request of an
    intervention never shares a cached plan with a plain `gp.gradients` call (on
    JAX and PyTorch a plan remembers which sources are connected, which a
    replaced activation changes)."""
    marked = copy.copy(tgt)
    structure = tuple((id(site.layer), site.call, a.kind if a.kind != "function" else a.value)
                      for site, a in planned)
    marked.cache_key = ("gradprobe.intervene", structure, tgt.cache_key)
    return marked


def intervene(model: keras.Model, inputs: Any, set: Mapping[Any, Any], *,
              target: Any = None, wrt: Any = None, output: Any = None,
              training: bool = False, unconnected: str = "raise",
              differentiable: bool = True) -> Intervention:
    """Runs the model with chosen layer activations replaced.

    Each selected layer call's output is replaced, inside the model's own forward
    pass, by a value (broadcast to the output's shape), zeros (`"zero"`), its
    mean over the batch (`"mean"`, a constant: no gradient flows through it) or
    what a function of it returns; the layers after it compute on the replacement.
    The model itself is not changed (not even while the call runs: other threads
    calling it see the model's own behaviour), whether the call succeeds or not.

    Args:
        model: A Keras 3 model of any kind.
        inputs: What `model(...)` accepts.
        set: Selector -> replacement. Selectors as in `gp.gradients`' `wrt`: a
            layer name or path (every call of it), `"name@i"` (its `i`-th call),
            a pattern (`"block*"`: every matching leaf layer) or a layer object.
            Replacements: `"zero"`, `"mean"`, a function of the activation
            returning a tensor of its shape, or an array / tensor broadcastable
            to the activation's shape (cast to its dtype).
        target: Optional: a target as in `gp.gradients` (class index,
            `"predicted"`, `gp.at(...)`, `gp.loss(...)`, a function); its value
            under the intervention is returned.
        wrt: Optional, with `target`: sources as in `gp.gradients`; returns the
            gradients of the target under the intervention. The gradient with
            respect to a replaced activation is taken at its replacement; a
            source before a layer replaced by a constant is unconnected (see
            `unconnected`).
        output: As in `gp.gradients`.
        training: Passed to the model (state updates are discarded).
        unconnected: As in `gp.gradients`: `"raise"` or `"zero"`.
        differentiable: As in `gp.gradients`.

    Returns:
        An `Intervention`: `outputs`, `target`, `gradients`, `replaced`.

    Example:

    >>> import keras, numpy as np
    >>> import gradprobe as gp
    >>> model = keras.Sequential([keras.Input((3,)),
    ...                           keras.layers.Dense(4, name="hidden"),
    ...                           keras.layers.Dense(2, name="out")])
    >>> x = np.ones((5, 3), "float32")
    >>> r = gp.intervene(model, x, set={"hidden": "zero"}, target=0, wrt="hidden")
    >>> bool(np.allclose(keras.ops.convert_to_numpy(r.outputs),
    ...                  keras.ops.convert_to_numpy(model.get_layer("out").bias)))
    True
    >>> r.replaced
    {'hidden': [0]}
    """
    _validate.model(model)
    _validate.flag("training", training)
    _validate.flag("differentiable", differentiable)
    _validate.choice("unconnected", unconnected, ("raise", "zero"),
                     "what to do with a source the target does not depend on")
    if wrt is not None and target is None:
        raise _validate.fail("target", target, "a target (e.g. a class index) when `wrt` is "
                             "given: the gradients are those of the target.")
    x = prepare_inputs(model, inputs)  # (builds the model before any hook is installed)
    hooks, planned = plan(model, set)
    sites = [site for site, _ in planned]
    names = {id(site): action.selector for site, action in planned}
    label = {id(s): f"set[{names[id(s)]!r}]" for s in sites}
    g = value = None
    if target is not None:
        tgt = make_target(target, batch_size(x))
    with _sites.installed(model, hooks):
        if wrt is not None:
            # compile=False: the replacement values live in Python (the hooks),
            # so they must not be baked into a cached compiled function.
            g = dispatch.run(model, x, _intervened_target(tgt, planned), wrt, output=output,
                           training=bool(training), unconnected=unconnected, compile=False,
                           differentiable=differentiable)
            outputs, value = g.outputs, g.target
        elif target is not None:
            ev = evaluate(model, x, tgt, output=output, training=bool(training))
            outputs, value = ev.outputs, ev.value
        else:
            with keras.StatelessScope():
                outputs = model(x, training=bool(training))
    _sites.check_calls(sites, hooks, lambda s: label[id(s)])
    replaced: dict[str, list[int]] = {}
    for site, action in planned:
        calls = sorted(i for lid, i in hooks.applied if lid == id(site.layer)
                       and (site.call is None or i == site.call))
        for i in calls:
            if i not in replaced.setdefault(action.selector, []):
                replaced[action.selector].append(i)
    return Intervention(outputs, value, g, replaced)

