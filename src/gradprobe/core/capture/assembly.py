"""One assembly of a capture's result, for every strategy: the entries of the
captured sources in the order of the forward pass (`collect_entries`), the error
for sources the target does not depend on, the aliases of sources named twice,
and the `Gradients` built from a run (`result_of`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from gradprobe import backends
from gradprobe.core.keys import input_key, input_keys
from gradprobe.core.plan import Plan
from gradprobe.core.result import Gradients
from gradprobe.errors import GradprobeError, quoted


@dataclass
class SourceEntry:
    """One captured source of a run, as the result reports it."""

    key: str
    kind: str  # "activation" | "weight" | "input"
    source: Any  # the probe, or the variable
    value: Any  # forward value (activations and inputs), else None
    clock: float
    requested: str
    explain: str  # why it might be unconnected
    layer_id: int | None = None


def collect_entries(recorder: Any, plan: Plan
             ) -> tuple[list[SourceEntry], list[str], list[tuple[str, str]]]:
    """Entries for every captured source, what a pattern skipped and why, and
    (selector, key) pairs of sources that an earlier selector already named."""
    entries: list[SourceEntry] = []
    skipped: list[str] = []
    seen: set[str] = set()
    aliases: list[tuple[str, str]] = []
    for spec in plan.acts:
        calls = recorder.calls_of(spec.layer)
        flow = recorder.in_control_flow.get(id(spec.layer))
        if flow is not None:
            # (no call count: a trace runs a loop body once, eager execution each time)
            why = (f"called inside backend control flow ({flow}), whose activations cannot "
                   "be captured")
            if spec.explicit and not calls:
                raise GradprobeError(
                    f"Layer {spec.path!r} ({spec.kind}) is {why}. Select the layer that "
                    "contains the loop (its output), or this layer's weights.")
            skipped.append(f"{spec.path}: {why}")
            if not calls:
                continue
        if not calls:
            if spec.explicit:
                raise GradprobeError(
                    f"Layer {spec.path!r} ({spec.kind}) was never called during the forward "
                    "pass of the model on these inputs, so it has no activation to "
                    "differentiate. Check that the model's call() uses it (a layer stored as "
                    "an attribute but not called has no output)."
                )
            skipped.append(f"{spec.path}: never called in the forward pass")
            continue
        multi = len(calls) > 1
        if spec.call is not None:
            if spec.call >= len(calls):
                choices = [f"{spec.path}@{i}" for i in range(len(calls))]
                raise GradprobeError(
                    f"{spec.requested!r}: layer {spec.path!r} was called {len(calls)} time(s) "
                    f"in the forward pass; choose one of {quoted(choices)}."
                )
            calls = [calls[spec.call]]
        for call in calls:
            base = f"{spec.path}@{call.index}" if multi else spec.path
            floats = [(j, v, p) for j, (v, p) in enumerate(call.leaves) if p is not None]
            if not floats:
                dtypes = ", ".join(backends.dtype_name(v) for v, _ in call.leaves)
                if spec.explicit:
                    raise GradprobeError(
                        f"Layer {spec.path!r} ({spec.kind}) outputs {dtypes}, not floating "
                        "point: no gradient can flow through it. Select a layer with a "
                        "floating-point output (e.g. the Embedding after integer ids)."
                    )
                skipped.append(f"{base}: output dtype {dtypes}")
                continue
            for j, value, probe in floats:
                key = f"{base}:{j}" if len(call.leaves) > 1 else base
                if key in seen:
                    aliases.append((spec.requested, key))
                    continue
                seen.add(key)
                explain = (
                    f"layer is not on the path to output {plan.output!r}"
                    if plan.output is not None
                    else "the target does not depend on this layer's output"
                )
                entries.append(SourceEntry(key, "activation", probe, value, call.clock,
                                      spec.requested, explain, id(spec.layer)))
    for spec in plan.vars:
        if spec.key in seen:
            aliases.append((spec.requested, spec.key))
            continue
        seen.add(spec.key)
        clock = recorder.first_clock.get(id(spec.owner), math.inf)
        if spec.owner is not None and id(spec.owner) not in recorder.first_clock:
            explain = f"its layer {spec.owner.name!r} was never called in the forward pass"
        else:
            explain = "the target does not depend on this variable"
        entries.append(SourceEntry(spec.key, "weight", spec.var, None, clock, spec.requested,
                              explain, None if spec.owner is None else id(spec.owner)))
    return entries, skipped, aliases


def raise_unconnected(entries: list[SourceEntry], plan: Plan) -> None:
    listed = "; ".join(f"{e.key!r} ({e.explain})" for e in entries[:12])
    more = f"; ... ({len(entries) - 12} more)" if len(entries) > 12 else ""
    fix = "Remove them from `wrt`"
    if plan.output is not None:
        fix += ", select another output="
    raise GradprobeError(
        f"The target does not depend on {len(entries)} requested source(s): {listed}{more}. "
        f"{fix}, or pass unconnected='zero' to get zero gradients for them."
    )


def uses_float16(model: Any, plan: Plan) -> bool:
    """Whether the model computes in float16 anywhere the request looks."""
    layers = [model, *plan.probe_layers, *plan.order_layers]
    return any(getattr(layer, "compute_dtype", None) == "float16" for layer in layers)


def per_example_values(value: Any, what: str) -> Any:
    """Checks that a target value has one entry per example."""
    shape = backends.static_shape(value)
    if len(shape) != 1:
        raise GradprobeError(
            f"{what} needs a per-example target (one value per example); this target is "
            f"{'a scalar' if not shape else f'shaped {shape}'}. Use a class index, "
            "'predicted', a loss function or a Loss with reduction=None, or a callable "
            "returning one value per example.")
    return value


def aliases_of(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """selector -> the keys it names, from (selector, key) pairs: a source selected
    twice is found under both selectors."""
    aliases: dict[str, list[str]] = {}
    for requested, key in pairs:
        keys = aliases.setdefault(requested, [])
        if key not in keys:
            keys.append(key)
    return aliases


def requested_inputs(x: Any, plan: Plan) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The input keys `plan` requests (key -> the selector that named it first) and
    the (selector, key) pairs of every selector that named one."""
    keys = input_keys(x)
    wanted: dict[str, str] = {}
    aliases: list[tuple[str, str]] = []
    for spec in plan.inputs:
        chosen = keys if spec.index is None else [input_key(keys, spec.index, x)]
        for k in chosen:
            wanted.setdefault(k, spec.requested)
            aliases.append((spec.requested, k))
    return wanted, aliases


def result_of(tensors: dict, meta: dict, tgt: Any, plan: Plan,
              differentiable: bool, stop_gradient: Callable[[Any], Any]) -> Gradients:
    """The `Gradients` of a capture's run (`tensors`, `meta`) on any backend: the
    target checked against what the run saw, the gradients made constants unless
    `differentiable`, and the per-example annotations."""
    tgt.check(meta["target"])
    tgt.check_outputs(tensors["outputs"], meta["target"])
    grads = tensors["grads"]
    if not differentiable:
        grads = stop_gradient(grads)
    result = Gradients(grads, meta, tensors["values"], tensors["outputs"], tensors["target"],
                       {v.key: v.var for v in plan.vars})
    return annotate(result, meta)


def annotate(result: Any, meta: dict) -> Any:
    """Sets `per_example_method` (key -> method, for the weight keys of a
    `per_example` request; empty otherwise) and `per_example_fallbacks` (key ->
    why the Jacobian was used) on a `Gradients` result."""
    result.per_example_method = MappingProxyType(dict(meta.get("per_example_method", {})))
    result.per_example_fallbacks = MappingProxyType(dict(meta.get("per_example_fallbacks", {})))
    return result
