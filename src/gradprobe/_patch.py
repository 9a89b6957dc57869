"""The only place gradprobe modifies user objects, always undone in `finally`.

A layer instance's `call` is wrapped for the duration of one forward pass so
that each of its outputs can be observed (and probed) as the model itself
produces it. The wrapper is stored in the instance `__dict__`, bypassing Keras
attribute tracking, and removed afterwards (or the user's own instance-level
`call`, if there was one, is put back).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Hook = Callable[[Any, Any, tuple, dict], Any]
InputHook = Callable[[Any], Any]
_MISSING = object()


@contextlib.contextmanager
def wrapped_calls(layers: Iterable[Any], hook: Hook) -> Iterator[None]:
    """Within the block, `layer.call(*args, **kwargs)` returns
    `hook(layer, original_output, args, kwargs)`.

    Args:
        layers: Layer instances to wrap (duplicates are wrapped once).
        hook: Called with the layer, what its own `call` returned and the call's
            arguments; its return value is what the rest of the forward pass receives.
    """
    saved: list[tuple[Any, Any]] = []
    seen: set[int] = set()
    try:
        for layer in layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            previous = layer.__dict__.get("call", _MISSING)
            saved.append((layer, previous))
            layer.__dict__["call"] = _wrap(layer, layer.call, hook)
    except BaseException:
        _restore(saved)
        raise
    try:
        yield
    finally:
        _restore(saved)


@contextlib.contextmanager
def wrapped_inputs(model: Any, hook: InputHook) -> Iterator[None]:
    """Within the block, `model.call(inputs, ...)` receives `hook(inputs)` instead."""
    original = model.call
    previous = model.__dict__.get("call", _MISSING)

    @functools.wraps(original)
    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        return original(hook(inputs), *args, **kwargs)

    model.__dict__["call"] = call
    try:
        yield
    finally:
        _restore([(model, previous)])


def _wrap(layer: Any, original: Callable, hook: Hook) -> Callable:
    @functools.wraps(original)
    def call(*args: Any, **kwargs: Any) -> Any:
        return hook(layer, original(*args, **kwargs), args, kwargs)

    return call


def _restore(saved: list[tuple[Any, Any]]) -> None:
    for layer, previous in reversed(saved):
        if previous is _MISSING:
            layer.__dict__.pop("call", None)
        else:
            layer.__dict__["call"] = previous


@contextlib.contextmanager
def wrapped_methods(obj: Any, wrappers: dict[str, Callable[[Callable], Callable]]) -> Iterator[None]:
    """Within the block, `obj.name` is `wrappers[name](original bound method)`."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for name, make in wrappers.items():
            previous = obj.__dict__.get(name, _MISSING)
            original = getattr(obj, name)
            saved.append((obj, name, previous))
            obj.__dict__[name] = functools.wraps(original)(make(original))
        yield
    finally:
        for target, name, previous in reversed(saved):
            if previous is _MISSING:
                target.__dict__.pop(name, None)
            else:
                target.__dict__[name] = previous
