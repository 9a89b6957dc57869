"""The only place gradprobe modifies user objects, always undone.

To observe (and probe) a layer's outputs as the model itself produces them,
gradprobe puts a *dispatcher* in the layer instance's `__dict__["call"]`
(bypassing Keras attribute tracking). The dispatcher is shared and
reference-counted:

* it is installed by the first request that needs the layer and removed (the
  user's own instance-level `call`, if there was one, put back) when the last
  such request ends, whatever order concurrent requests end in;
* each call is routed to the hooks registered *by the calling thread* (a
  `tf.function` traces in the thread that calls it, so a compiled capture is
  routed the same way), in registration order, or straight to the original
  `call` when that thread registered none: a thread that calls the model
  directly while another thread computes gradients runs the model's own
  behaviour and is never recorded by the other thread's request.

All bookkeeping happens under one lock; a call only reads an immutable tuple.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

Hook = Callable[[Any, Any, tuple, dict], Any]
InputHook = Callable[[Any], Any]
_MISSING = object()
_ALL = "all"
_CURRENT = "current"

_lock = threading.Lock()
_slots: dict[int, _Slot] = {}  # id(layer) -> its installed dispatcher
_sequence = itertools.count()


@dataclass(frozen=True, eq=False)
class _Registration:
    thread: int | None  # the registering thread's ident, or None for every thread
    kind: str  # "output" (a Hook on the call's result) or "input" (an InputHook)
    hook: Callable
    order: int


class _Slot:
    """One layer's dispatcher: the original `call` and the live registrations."""

    def __init__(self, layer: Any):
        self.layer = layer
        self.previous = layer.__dict__.get("call", _MISSING)
        self.original = layer.call  # the user's instance `call`, or the bound method
        self.registrations: tuple[_Registration, ...] = ()
        self.count = 0
        original, registrations_of = self.original, self._active

        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            active = registrations_of()
            if not active:
                return original(*args, **kwargs)
            fn = original
            for reg in active:
                fn = _apply(layer, fn, reg)
            return fn(*args, **kwargs)

        self.dispatcher = call

    def _active(self) -> list[_Registration]:
        regs = self.registrations  # an immutable snapshot
        if not regs:
            return []
        ident = threading.get_ident()
        mine = [r for r in regs if r.thread is None or r.thread == ident]
        if len(mine) < len(regs) and not any(r.thread == ident for r in regs) \
                and _is_replica_thread():
            return list(regs)
        return mine


def _is_replica_thread() -> bool:
    """True in a thread that `tf.distribute.MirroredStrategy` runs a replica in, on
    behalf of the (blocked) thread that called `strategy.run` / `fit`: its calls
    belong to that thread's requests. Relies on TensorFlow's thread class name
    (`mirrored_run._MirroredReplicaThread`); no private import."""
    return type(threading.current_thread()).__name__ == "_MirroredReplicaThread"


def _apply(layer: Any, fn: Callable, reg: _Registration) -> Callable:
    if reg.kind == "input":
        def with_input(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            return fn(reg.hook(inputs), *args, **kwargs)

        return with_input

    def with_output(*args: Any, **kwargs: Any) -> Any:
        return reg.hook(layer, fn(*args, **kwargs), args, kwargs)

    return with_output


def _register(objects: Iterable[Any], kind: str, hook: Callable,
              threads: str) -> list[tuple[_Slot, _Registration]]:
    if threads not in (_CURRENT, _ALL):
        raise ValueError(f"threads must be 'current' or 'all'; got {threads!r}")
    thread = None if threads == _ALL else threading.get_ident()
    done: list[tuple[_Slot, _Registration]] = []
    seen: set[int] = set()
    with _lock:
        try:
            for obj in objects:
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
                slot = _slots.get(id(obj))
                if slot is None:
                    slot = _Slot(obj)
                    obj.__dict__["call"] = slot.dispatcher
                    _slots[id(obj)] = slot
                reg = _Registration(thread, kind, hook, next(_sequence))
                slot.count += 1
                slot.registrations = (*slot.registrations, reg)
                done.append((slot, reg))
        except BaseException:
            _unregister_locked(done)
            raise
    return done


def _unregister(done: list[tuple[_Slot, _Registration]]) -> None:
    with _lock:
        _unregister_locked(done)


def _unregister_locked(done: list[tuple[_Slot, _Registration]]) -> None:
    for slot, reg in reversed(done):
        slot.registrations = tuple(r for r in slot.registrations if r is not reg)
        slot.count -= 1
        if slot.count:
            continue
        layer = slot.layer
        if _slots.get(id(layer)) is slot:
            del _slots[id(layer)]
        if layer.__dict__.get("call") is slot.dispatcher:
            if slot.previous is _MISSING:
                layer.__dict__.pop("call", None)
            else:
                layer.__dict__["call"] = slot.previous
        # else: someone replaced our dispatcher meanwhile; theirs stays.


@contextlib.contextmanager
def wrapped_calls(layers: Iterable[Any], hook: Hook, *,
                  threads: str = _CURRENT) -> Iterator[None]:
    """Within the block, `layer.call(*args, **kwargs)` returns
    `hook(layer, original_output, args, kwargs)` for calls made by this thread.

    Args:
        layers: Layer instances to hook (duplicates are hooked once).
        hook: Called with the layer, what its own `call` returned and the call's
            arguments; its return value is what the rest of the forward pass receives.
        threads: `"current"` (default): only calls made by the thread that
            entered the block are hooked (a `tf.function` traced by it included);
            `"all"`: calls from every thread (for a training loop whose replicas
            run in threads of their own, as under `tf.distribute.MirroredStrategy`).
    """
    done = _register(layers, "output", hook, threads)
    try:
        yield
    finally:
        _unregister(done)


@contextlib.contextmanager
def wrapped_inputs(model: Any, hook: InputHook, *,
                   threads: str = _CURRENT) -> Iterator[None]:
    """Within the block, `model.call(inputs, ...)` receives `hook(inputs)`
    instead, for calls made by this thread (see `wrapped_calls`)."""
    done = _register([model], "input", hook, threads)
    try:
        yield
    finally:
        _unregister(done)


def active_wrappers() -> int:
    """How many objects carry a gradprobe dispatcher right now (for tests)."""
    with _lock:
        return len(_slots)


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
