"""Layer calls selected for an intervention, and the hook that reaches them.

A *site* is one selected layer and, optionally, one of its calls (`"name@i"`).
`Hooks` holds, per layer, what to do with each call's output; installed with
`installed(model, hooks)`, it goes through `core/_patch.py` (the only module that
touches user objects): `wrapped_calls` for the selected layers, and
`wrapped_inputs` on the model so that each forward pass numbers the calls from
0 again (JAX and PyTorch run the forward pass several times per gradient: once
on abstract values to learn its shape, once to find connected sources, once for
real). Calls Keras makes on symbolic tensors while building a model are not
counted and not changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras

from gradprobe.core import _patch
from gradprobe.core.selectors import ActivationSource, LayerNode, LayerTree, resolve
from gradprobe.errors import GradprobeError

# (layer, call index, output tensor) -> the tensor the rest of the forward pass gets
Action = Callable[[Any, int, Any], Any]


@dataclass(frozen=True)
class Site:
    """One selected layer (every call, `call=None`) or one call of it."""

    node: LayerNode
    call: int | None
    requested: str  # the selector as the user wrote it (for messages)

    @property
    def layer(self) -> Any:
        return self.node.layer

    @property
    def path(self) -> str:
        return self.node.path


def resolve_sites(model: Any, selectors: Any, name: str) -> list[Site]:
    """The activation sites that `selectors` (one selector or a list, as in
    `wrt=`: names, paths, `name@i`, patterns, layer objects) select; weights and
    inputs are refused, naming the argument `name`."""
    tree = LayerTree(model)
    try:
        sources = resolve(tree, selectors)
    except GradprobeError as e:
        raise GradprobeError(f"{name}: {e}") from None
    sites = []
    for s in sources:
        if not isinstance(s, ActivationSource):
            raise GradprobeError(
                f"Expected `{name}` to select layer activations (layer names, 'name@i', "
                f"patterns such as 'block*'); {s.requested!r} selects "
                f"{'a weight' if hasattr(s, 'var') else 'the model inputs'}, which an "
                f"intervention cannot replace. Received: {name}={selectors!r}")
        sites.append(Site(s.node, s.call, s.requested))
    return sites


def _symbolic(outputs: Any) -> bool:
    return any(isinstance(t, keras.KerasTensor) for t in keras.tree.flatten(outputs))


class Hooks:
    """What happens to the outputs of the hooked layers' calls in one forward pass.

    `actions[id(layer)]` is a list of `(call or None, action)`: each action whose
    call is `None` or equals the call's index (0, 1, ... in this forward pass)
    maps the output, in order. `counts` holds how often each layer ran in the
    last forward pass; `applied` the `(layer id, call)` pairs an action reached.
    """

    def __init__(self) -> None:
        self.layers: dict[int, Any] = {}
        self.actions: dict[int, list[tuple[int | None, Action]]] = {}
        self.counts: dict[int, int] = {}
        self.seen: dict[int, int] = {}  # the largest count of any forward pass
        self.applied: set[tuple[int, int]] = set()
        # The first error of an action: raised once the forward pass is over, not
        # through the layer's `__call__` (Keras would wrap its message).
        self.error: GradprobeError | None = None

    def add(self, layer: Any, call: int | None, action: Action) -> None:
        self.layers[id(layer)] = layer
        self.actions.setdefault(id(layer), []).append((call, action))

    def start(self, inputs: Any) -> Any:
        """A forward pass begins: calls are numbered from 0 again."""
        self.counts = {}
        return inputs

    def hook(self, layer: Any, outputs: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if _symbolic(outputs):
            return outputs
        lid = id(layer)
        index = self.counts.get(lid, 0)
        self.counts[lid] = index + 1
        self.seen[lid] = max(self.seen.get(lid, 0), index + 1)
        for call, action in self.actions.get(lid, ()):
            if call is None or call == index:
                try:
                    outputs = action(layer, index, outputs)
                except GradprobeError as e:
                    self.error = self.error or e
                    return outputs
                self.applied.add((lid, index))
        return outputs


@contextlib.contextmanager
def installed(model: Any, hooks: Hooks) -> Iterator[Hooks]:
    """Within the block, the forward passes of this thread run with `hooks`."""
    try:
        with _patch.wrapped_inputs(model, hooks.start), \
                _patch.wrapped_calls(list(hooks.layers.values()), hooks.hook):
            yield hooks
    except Exception as e:
        if hooks.error is not None and e is not hooks.error:
            raise hooks.error from None
        raise
    if hooks.error is not None:
        raise hooks.error


def single_output(site: Site, outputs: Any, what: str) -> Any:
    """The one tensor a selected layer returned (an intervention replaces a
    single-tensor output; a layer returning a tuple or dict is refused)."""
    leaves = keras.tree.flatten(outputs)
    if len(leaves) != 1:
        raise GradprobeError(
            f"{what}: layer {site.path!r} returns {len(leaves)} tensors "
            f"({type(outputs).__name__}); only a layer that returns one tensor can be "
            "replaced. Select one of its sublayers, or the layer that consumes its output.")
    return leaves[0]


def check_calls(sites: list[Site], hooks: Hooks, what: Callable[[Site], str]) -> None:
    """Every site was reached: its layer ran in the forward pass, as often as a
    `name@i` selector needs."""
    for site in sites:
        ran = hooks.seen.get(id(site.layer), 0)
        if ran == 0:
            raise GradprobeError(
                f"{what(site)}: layer {site.path!r} did not run in the forward pass "
                "(the model's call does not use it for these inputs), so nothing was "
                "replaced. Select a layer that the forward pass calls.")
        if site.call is not None and site.call >= ran:
            raise GradprobeError(
                f"{what(site)}: layer {site.path!r} ran {ran} time(s) in the forward pass, "
                f"so it has no call {site.call} (calls are numbered from 0: "
                f"{', '.join(f'{site.path}@{i}' for i in range(ran))}).")
