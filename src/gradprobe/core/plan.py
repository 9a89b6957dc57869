"""The plan of a request: what one forward and backward pass needs (the sources
as specs, the target, the output, the options), made once per request and kept
in the cache (`planned`), with no reference to the root model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradprobe.core.cache import CacheEntry, cached_entry
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
    output_names,
    pattern_unconnected,
)
from gradprobe.errors import GradprobeError


@dataclass(frozen=True)
class ActivationSpec:
    """A requested layer activation: the layer, its path, `call` (one call of a shared
    layer, or None: every call), the selector that named it, and whether it was
    named explicitly (not by a pattern)."""

    layer: Any
    path: str
    kind: str
    call: int | None
    requested: str
    explicit: bool


@dataclass(frozen=True)
class VariableSpec:
    """A requested variable, its result key and the layer that owns it."""

    var: Any
    key: str
    owner: Any  # the layer that owns the variable, or None
    requested: str
    explicit: bool


@dataclass(frozen=True)
class InputSpec:
    """A requested model input (`index` None: every input)."""

    index: int | str | None
    requested: str


@dataclass
class Plan:
    """Everything a forward/backward pass needs, with no reference to the root
    model (so a cache of compiled plans does not keep models alive)."""

    acts: list[ActivationSpec]
    vars: list[VariableSpec]
    inputs: list[InputSpec]
    target: Target
    output: Any = None
    output_layer: Any = None
    output_names: list[str] = field(default_factory=list)
    training: bool = False
    unconnected: str = "raise"
    per_example: bool | str = False  # True or a method name: see capture.per_example
    replace: Any = None  # a layer whose output is replaced by args["replacement"] ...
    replace_call: int | None = None  # ... in this one of its calls (None: its only call)
    norm_method: str = "auto"  # gp.per_example_norms: "auto", "ghost" or "vectorized"

    @property
    def probe_layers(self) -> list[Any]:
        layers = [a.layer for a in self.acts]
        if self.output_layer is not None:
            layers.append(self.output_layer)
        if self.replace is not None:
            layers.append(self.replace)
        return layers

    @property
    def order_layers(self) -> list[Any]:
        return [v.owner for v in self.vars if v.owner is not None]


def to_specs(tree: LayerTree, sources: list) -> tuple[list, list, list]:
    """Splits resolved sources into activation, variable and input specs."""
    acts, vars_, inputs = [], [], []
    for s in sources:
        if isinstance(s, ActivationSource):
            acts.append(ActivationSpec(s.node.layer, s.node.path, s.node.kind, s.call,
                                        s.requested, s.explicit))
        elif isinstance(s, WeightSource):
            owner = s.node.layer if s.node is not None and s.node is not tree.root else None
            vars_.append(VariableSpec(s.var, s.key, owner, s.requested, s.explicit))
        elif isinstance(s, InputSource):
            inputs.append(InputSpec(s.index, s.requested))
    return acts, vars_, inputs


def make_plan(model: Any, tree: LayerTree, sources: list, tgt: Any, output: Any,
              training: bool, unconnected: str) -> Plan:
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
    return Plan(acts, vars_, inputs, tgt, output, output_layer, names,
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


def planned(model: Any, wrt: Any, tgt: Any, output: Any, training: bool,
           unconnected: str, per_example: bool | str = False,
           replace: bool = False) -> CacheEntry:
    """The cache entry of this request's plan, made if missing (layer lookup is skipped on
    repeated calls, so that small models do not pay for it on every call)."""

    def build() -> Plan:
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
