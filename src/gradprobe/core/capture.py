"""The capture mechanism: one forward pass of the model itself, with a zero
probe added to every output of the requested layers, then one backward pass.

`run` works the same eagerly and while a `tf.function` traces it; everything
it learns about the model (keys, order, which sources are connected) it returns
as a plain dict, so that a compiled caller can ship it out of the trace.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import keras

from gradprobe import backends
from gradprobe.backends import _keras_private
from gradprobe.backends import tensorflow_backend as backend
from gradprobe.core import _patch
from gradprobe.core.targets import Target, evaluate
from gradprobe.errors import GradprobeError, quoted


@dataclass(frozen=True)
class ActSpec:
    layer: Any
    path: str
    kind: str
    call: int | None
    requested: str
    explicit: bool


@dataclass(frozen=True)
class VarSpec:
    var: Any
    key: str
    owner: Any  # the layer that owns the variable, or None
    requested: str
    explicit: bool


@dataclass(frozen=True)
class InputSpec:
    index: int | str | None
    requested: str


@dataclass
class Plan:
    """Everything a forward/backward pass needs, with no reference to the root
    model (so a cache of compiled plans does not keep models alive)."""

    acts: list[ActSpec]
    vars: list[VarSpec]
    inputs: list[InputSpec]
    target: Target
    output: Any = None
    output_layer: Any = None
    output_names: list[str] = field(default_factory=list)
    training: bool = False
    unconnected: str = "raise"
    per_example: bool | str = False  # True or a method name: see per_example.run
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


@dataclass
class _Call:
    layer_id: int
    index: int
    leaves: list[tuple[Any, Any]]  # (value the model consumed, probe or None)
    clock: int


class Recorder:
    """Collects probed layer outputs while one forward pass runs.

    Layers in `probe_ids` get their outputs probed; layers in `input_ids` also
    have the first argument of each call kept (`inputs_of`), for methods that
    need a layer's input as well as its output gradient.
    """

    def __init__(self, tape: Any, probe_ids: set[int], input_ids: frozenset[int] = frozenset()):
        self.tape = tape
        self.probe_ids = probe_ids
        self.input_ids = input_ids
        self.inputs_of: dict[tuple[int, int], Any] = {}
        self.context = backend.capture_context()
        self.calls: list[_Call] = []
        self.counts: dict[int, int] = {}
        self.first_clock: dict[int, int] = {}
        self.returned: list[tuple[int, list[Any]]] = []  # (layer id, output leaves)
        self.clock = 0
        self.origin = backend.Origin()
        self.in_control_flow: dict[int, str] = {}  # layer id -> the control-flow function
        self.replace_id: int | None = None  # this layer's output is replaced ...
        self.replace_call: int | None = None  # ... in this call (None: its only call) ...
        self.replacement: Any = None  # ... by this tensor

    def hook(self, layer: Any, outputs: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        flow = backend.control_flow(self.origin)
        if flow is not None:
            # A loop or branch body (compiled: another graph; eager: run inline):
            # never captured, in either mode, and reported by `_collect`.
            self.in_control_flow.setdefault(id(layer), flow)
            return outputs
        if not backend.in_capture_context(self.context):
            return outputs
        lid = id(layer)
        index = self.counts.get(lid, 0)
        self.counts[lid] = index + 1
        if lid in self.input_ids:
            self.inputs_of[(lid, index)] = args[0] if args else next(iter((kwargs or {}).values()))
        if lid == self.replace_id:
            if self.replace_call is None and index:
                raise GradprobeError(
                    f"Layer {layer.name!r} is called more than once; its activation cannot be "
                    f"replaced unambiguously. Choose one call: '{layer.name}@0', "
                    f"'{layer.name}@1', ...")
            if self.replace_call is None or index == self.replace_call:
                outputs = backend.cast_like(self.replacement, outputs)
        self.first_clock.setdefault(lid, self.clock)
        clock, self.clock = self.clock, self.clock + 1
        if lid not in self.probe_ids:
            self.returned.append((lid, keras.tree.flatten(outputs)))
            return outputs
        leaves = keras.tree.flatten(outputs)
        recorded, new = [], []
        for leaf in leaves:
            if backend.is_floating(leaf):
                value, probe = backend.probe(self.tape, leaf)
            else:
                value, probe = leaf, None
            recorded.append((value, probe))
            new.append(value)
        self.calls.append(_Call(lid, index, recorded, clock))
        self.returned.append((lid, new))
        if len(leaves) == 1 and not isinstance(outputs, (list, tuple, dict)):
            return new[0]
        return keras.tree.pack_sequence_as(outputs, new)

    def close(self) -> None:
        """Lets go of the frames the recording started from (no call is hooked
        after the recording ends)."""
        self.origin = backend.Origin.empty()

    def calls_of(self, layer: Any) -> list[_Call]:
        return [c for c in self.calls if c.layer_id == id(layer)]

    def producers(self, tensors: Any) -> set[int]:
        """Ids of the layers whose call returned one of `tensors`."""
        wanted = {id(t) for t in keras.tree.flatten(tensors)}
        return {lid for lid, leaves in self.returned if any(id(t) in wanted for t in leaves)}


@dataclass
class _Entry:
    key: str
    kind: str  # "activation" | "weight" | "input"
    source: Any  # the probe, or the variable
    value: Any  # forward value (activations and inputs), else None
    clock: float
    requested: str
    explain: str  # why it might be unconnected
    layer_id: int | None = None


def run(model: Any, inputs: Any, args: dict[str, Any], plan: Plan,
        wrap_errors: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """One forward and one backward pass; returns `(tensors, meta)`.

    `tensors` holds `grads` and `values` (dicts keyed by source key), `outputs`
    and `target`; `meta` holds `order`, `kinds`, `aliases`, `unconnected`,
    `skipped` and `target` (facts for `Target.check`).
    """
    if plan.per_example:
        from gradprobe.higher import per_example  # imports this module: no top-level import

        return per_example.run(model, inputs, args, plan, wrap_errors)
    float16 = _uses_float16(model, plan)
    tape = backend.new_tape(persistent=float16)
    recorder = Recorder(tape, {id(layer) for layer in plan.probe_layers})
    if plan.replace is not None:
        recorder.replace_id, recorder.replacement = id(plan.replace), args["replacement"]
        recorder.replace_call = plan.replace_call
    # The recorder holds the caller's frames while the forward pass runs (to tell
    # control-flow bodies apart); closed on every exit, or those frames (and the
    # tensors in their locals: this call's whole result) would form a reference
    # cycle that only the garbage collector frees, gigabytes later on a big model.
    try:
        with tape:
            for v in plan.vars:
                backend.watch(tape, v.var)
            inputs, input_entries, input_aliases = _probe_inputs(tape, inputs, plan.inputs)

            def call(model: Any, inputs: Any, training: bool) -> Any:
                with _patch.wrapped_calls(plan.probe_layers + plan.order_layers,
                                          recorder.hook):
                    return _call_model(model, inputs, training, wrap_errors)

            ev = evaluate(model, inputs, plan.target, args, output=plan.output,
                          training=plan.training, call=call, names=plan.output_names,
                          layer_value=lambda: _output_layer_value(recorder, plan))
            outputs, selected, value, objective = ev.outputs, ev.selected, ev.value, \
                ev.objective
    finally:
        recorder.close()

    entries, skipped, extra_aliases = _collect(recorder, plan)
    producers = recorder.producers(selected)
    entries = sorted(input_entries + entries, key=lambda e: (e.clock, e.kind != "activation"))
    if float16:
        grads = backend.scaled_gradient(tape, objective, [e.source for e in entries])
    else:
        grads = backend.gradient(tape, objective, [e.source for e in entries])
    # Gradients (and the activations beside them) of float16 and bfloat16 sources
    # are returned in float32, so that statistics and sums downstream are too.
    grads = [None if g is None else backend.to_float32(g) for g in grads]

    unconnected = [e for e, g in zip(entries, grads) if g is None]
    if unconnected and plan.unconnected == "raise":
        _raise_unconnected(unconnected, plan)
    grads = [backend.to_float32(backend.zeros_like(e.source)) if g is None else g
             for e, g in zip(entries, grads)]

    aliases: dict[str, list[str]] = {}
    pairs = [(e.requested, e.key) for e in entries] + input_aliases + extra_aliases
    for requested, key in pairs:  # a source selected twice is found under both selectors
        keys = aliases.setdefault(requested, [])
        if key not in keys:
            keys.append(key)
    tensors = {
        "grads": {e.key: g for e, g in zip(entries, grads)},
        "values": {e.key: backend.to_float32(e.value) for e in entries if e.value is not None},
        "outputs": outputs,
        "target": value,
    }
    meta = {
        "order": [e.key for e in entries],
        "kinds": {e.key: e.kind for e in entries},
        "aliases": aliases,
        "unconnected": [e.key for e in unconnected],
        "skipped": skipped,
        "target": ev.meta,
        "output_keys": [e.key for e in entries if e.layer_id in producers],
    }
    return tensors, meta


def _uses_float16(model: Any, plan: Plan) -> bool:
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


def _probe_inputs(tape: Any, inputs: Any, specs: list[InputSpec]
                  ) -> tuple[Any, list[_Entry], list[tuple[str, str]]]:
    if not specs:
        return inputs, [], []
    keys = input_keys(inputs)
    wanted: dict[str, str] = {}
    aliases: list[tuple[str, str]] = []
    for spec in specs:
        chosen = keys if spec.index is None else [_input_key(keys, spec.index, inputs)]
        for k in chosen:
            wanted.setdefault(k, spec.requested)
            aliases.append((spec.requested, k))
    flat = keras.tree.flatten(inputs)
    new, entries = [], []
    for k, leaf in zip(keys, flat):
        if k in wanted:
            value, probe = backend.probe(tape, leaf)
            entries.append(_Entry(k, "input", probe, value, -1, wanted[k],
                                  "the target does not depend on this input"))
            new.append(value)
        else:
            new.append(leaf)
    if len(flat) == 1 and not isinstance(inputs, (list, tuple, dict)):
        return new[0], entries, aliases
    return keras.tree.pack_sequence_as(inputs, new), entries, aliases


def input_keys(inputs: Any) -> list[str]:
    """Result keys of the input leaves: `"inputs"`, or `"inputs:0"`, `"inputs:name"`."""
    if isinstance(inputs, dict):
        return [f"inputs:{k}" for k in sorted(inputs)]
    flat = keras.tree.flatten(inputs)
    if len(flat) == 1 and not isinstance(inputs, (list, tuple)):
        return ["inputs"]
    return [f"inputs:{i}" for i in range(len(flat))]


def _input_key(keys: list[str], index: int | str, inputs: Any) -> str:
    key = f"inputs:{index}"
    if key in keys:
        return key
    if keys == ["inputs"] and index == 0:
        return "inputs"
    raise GradprobeError(
        f"'inputs:{index}' does not name a model input; the inputs are {quoted(keys)}."
    )


def _call_model(model: Any, inputs: Any, training: bool, wrap_errors: bool) -> Any:
    try:
        with keras.StatelessScope(), backend.name_scope("gradprobe"):
            return model(inputs, training=training)
    except GradprobeError:
        raise
    except Exception as e:
        if not wrap_errors:
            raise
        raise call_error(model, inputs, e) from e


def call_error(model: Any, inputs: Any, e: BaseException) -> GradprobeError:
    """The error for a model whose own call raised `e` on `inputs`: which layer
    raised and its message, and the expected input shape only when the shapes
    given really disagree with it (raise it `from e`)."""
    layer = _raising_layer(e)
    where = (f"layer {layer.name!r} ({type(layer).__name__}) raised"
             if layer is not None and layer is not model else "its call raised")
    text = f"Model {model.name!r} could not be called on the given inputs " \
           f"({describe_inputs(inputs)}): {where} {type(e).__name__}: {_message(e)}"
    mismatch = shape_mismatch(model, inputs)
    if mismatch:
        text += f" {mismatch}"
    return GradprobeError(text)


def _raising_layer(e: BaseException) -> Any:
    """The innermost Keras layer whose `call` was running when `e` was raised."""
    found = None
    tb = e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name in ("call", "tf__call") and isinstance(owner, keras.layers.Layer):
            found = owner
        tb = tb.tb_next
    return found


def shape_mismatch(model: Any, inputs: Any) -> str:
    """A sentence saying how `inputs` disagree with the model's declared inputs,
    or `""` when they agree (or the model declares none)."""
    specs = getattr(model, "inputs", None)
    if not specs:
        return ""
    leaves = keras.tree.flatten(inputs)
    expected = [tuple(s.shape) for s in specs]
    if len(leaves) != len(specs):
        return (f"The model expects {len(specs)} input(s) of shape "
                f"{expected[0] if len(expected) == 1 else expected}; got {len(leaves)}.")
    for i, (leaf, want) in enumerate(zip(leaves, expected)):
        got = backends.static_shape(leaf)
        if len(got) != len(want) or any(w is not None and g is not None and g != w
                                         for g, w in zip(got, want)):
            which = "" if len(leaves) == 1 else f" {i}"
            return f"Input{which} has shape {got}; the model expects input shape {want}."
    return ""


def _output_layer_value(recorder: Recorder, plan: Plan) -> Any:
    if plan.output_layer is None:
        return None
    calls = recorder.calls_of(plan.output_layer)
    if not calls:
        return None
    if len(calls) > 1:
        raise GradprobeError(
            f"output={plan.output!r} names a layer the forward pass calls {len(calls)} times; "
            "the target would be ambiguous. Use a callable target on the model output."
        )
    leaves = [v for v, _ in calls[0].leaves]
    return leaves[0] if len(leaves) == 1 else leaves


def _collect(recorder: Recorder, plan: Plan
             ) -> tuple[list[_Entry], list[str], list[tuple[str, str]]]:
    """Entries for every captured source, what a pattern skipped and why, and
    (selector, key) pairs of sources that an earlier selector already named."""
    entries: list[_Entry] = []
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
                entries.append(_Entry(key, "activation", probe, value, call.clock,
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
        entries.append(_Entry(spec.key, "weight", spec.var, None, clock, spec.requested,
                              explain, None if spec.owner is None else id(spec.owner)))
    return entries, skipped, aliases


def _raise_unconnected(entries: list[_Entry], plan: Plan) -> None:
    listed = "; ".join(f"{e.key!r} ({e.explain})" for e in entries[:12])
    more = f"; ... ({len(entries) - 12} more)" if len(entries) > 12 else ""
    fix = "Remove them from `wrt`"
    if plan.output is not None:
        fix += ", select another output="
    raise GradprobeError(
        f"The target does not depend on {len(entries)} requested source(s): {listed}{more}. "
        f"{fix}, or pass unconnected='zero' to get zero gradients for them."
    )


# ------------------------------------------------------------------ describing
def describe_inputs(inputs: Any) -> str:
    leaves = keras.tree.flatten(inputs)
    parts = [f"shape {backends.static_shape(x)} {backends.dtype_name(x)}" for x in leaves]
    return parts[0] if len(parts) == 1 else "; ".join(parts)


def expected_inputs(model: Any) -> str:
    specs = getattr(model, "inputs", None)
    if specs:
        shapes = [tuple(s.shape) for s in specs]
        return f"input shape {shapes[0] if len(shapes) == 1 else shapes}"
    shapes = _keras_private.build_shapes(model)  # private Keras API, see there
    if shapes:
        return "input shape " + ", ".join(f"{v}" for v in shapes.values())
    return "inputs of the shape it was built with"


def _message(e: BaseException) -> str:
    """The original message; Keras' "Exception encountered when calling ..."
    preamble and argument listing are dropped (the layer is named separately)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # Keras highlights with ANSI codes
    lines = [line.strip() for line in plain.strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Exception encountered when calling"):
        lines = lines[1:]
    kept = []
    for line in lines:
        if line.startswith("Arguments received by"):
            break
        kept.append(line)
    text = " ".join(kept[:6])
    return text if len(text) <= 600 else text[:597] + "..."
