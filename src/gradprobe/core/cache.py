"""The cache of resolved requests: per model (held weakly), the plan of each
request and its compiled function (`cached_entry`), and the fast path of a
repeated simple request (`repeated` / `remember`). Neither keeps a model alive."""

from __future__ import annotations

import inspect
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from gradprobe import backends
from gradprobe.backends import _keras_private
from gradprobe.errors import GradprobeError

CACHE_SIZE = 16
entries_by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
lock = threading.Lock()


@dataclass
class CacheEntry:
    """A resolved request for one model (its `plan`, any object with a `target`),
    and its compiled function once built."""

    fingerprint: tuple
    plan: Any
    fn: Any = None
    eager_only: bool = False


def cached_entry(model: Any, wrt: Any, options: tuple,
                 build: Callable[[], Any]) -> CacheEntry:
    """The cache entry for (`wrt`, `options`) on `model`, built by `build()` when
    missing or when the model's layers changed. Each model keeps the
    `CACHE_SIZE` most recently used entries.

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
        with lock:
            per_model = entries_by_model.get(model)
            entry = per_model.get(key) if per_model is not None else None
            if entry is not None and entry.fingerprint == fingerprint:
                per_model.move_to_end(key)
                return entry
    plan = build()
    plan.target = _weak_target(plan.target)
    entry = CacheEntry(fingerprint, plan)
    if key is not None:
        with lock:
            per_model = entries_by_model.get(model)
            if per_model is None:
                per_model = entries_by_model[model] = OrderedDict()
            for stale in [k for k in per_model if not alive(k)]:
                del per_model[stale]
            per_model[key] = entry
            while len(per_model) > CACHE_SIZE:
                per_model.popitem(last=False)
    return entry


def _hashable(wrt: Any) -> tuple | None:
    items = wrt if isinstance(wrt, (list, tuple)) else [wrt]
    key = []
    for item in items:
        if isinstance(item, str):
            key.append(item)
        elif isinstance(item, (keras.layers.Layer, keras.Variable)):
            key.append(("object", WeakKey(item)))
        else:
            return None
    return (type(wrt).__name__, tuple(key))


class WeakKey:
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
        if not isinstance(other, WeakKey) or other._method != self._method:
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
    if isinstance(key, (*_PLAIN, WeakKey, type)):
        return key
    if isinstance(key, (tuple, list)):
        return tuple(_weak_key(k) for k in key)
    if isinstance(key, frozenset):
        return frozenset(_weak_key(k) for k in key)
    try:
        return WeakKey(key)
    except TypeError:  # cannot be weakly referenced (a builtin): it holds no model
        return key


def alive(key: Any) -> bool:
    if isinstance(key, WeakKey):
        return key.alive()
    if isinstance(key, (tuple, frozenset)):
        return all(alive(k) for k in key)
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


# -------------------------------------------------------------- repeated requests
# The interactive loop asks the same question of new inputs: the same model, layer
# name, class and options, and an eager tensor of the same dtype and shape. Everything
# `gp.gradients` checks and resolves before running depends on nothing else, so an
# identical earlier call that got that far is remembered, and the call goes straight
# to `dispatch.run` (which still looks up the plan, checks the model's structure and the input
# dtypes). It saves about a third of gradprobe's Python per call (0.1-0.2 ms between
# the calls of a compiled model). Other requests (objects, lists, callables, arrays,
# graph tensors) always take the full path.
_repeats: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OrderedDict
_REPEATS_KEPT = 16
_PLAIN_OPTION_TYPES = (bool, str, int, type(None))


def repeat_key(inputs: Any, target: Any, wrt: Any, options: tuple) -> tuple | None:
    """The key of a request of the simple kind (a str selector, an int class, plain
    options, one eager TensorFlow tensor), or `None`. Option types are part of the
    key, so that `True` and `1` (which compare equal) never share an entry."""
    if type(wrt) is not str or type(target) is not int or backends.is_functional():
        return None
    if not all(type(o) in _PLAIN_OPTION_TYPES for o in options):
        return None
    if not backends.get().is_eager_tensor(inputs) or not inputs.dtype.is_floating:
        return None  # (integer inputs, token ids, are checked against the vocabulary each call)
    return (wrt, target, tuple((type(o), o) for o in options), inputs.dtype,
            tuple(inputs.shape))


def repeated(model: Any, key: tuple | None) -> tuple | None:
    """`(target, per_example)` that an identical earlier call resolved, or `None`."""
    if key is None:
        return None
    with lock:
        per_model = _repeats.get(model)
        return per_model.get(key) if per_model is not None else None


def remember(model: Any, key: tuple | None, unchanged: bool, tgt: Any,
              per_example: Any) -> None:
    if key is None or not unchanged:  # (inputs that preparation changed: not repeatable)
        return
    with lock:
        per_model = _repeats.get(model)
        if per_model is None:
            per_model = _repeats[model] = OrderedDict()
        per_model[key] = (tgt, per_example)
        while len(per_model) > _REPEATS_KEPT:
            per_model.popitem(last=False)


def clear() -> None:
    """Forgets every compiled gradient function (they are rebuilt on demand)."""
    with lock:
        entries_by_model.clear()
        _repeats.clear()
