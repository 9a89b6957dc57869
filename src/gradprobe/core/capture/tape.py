"""The tape strategy of the capture (TensorFlow): one forward pass of the model
itself under a `tf.GradientTape`, a zero probe added to every output of the
requested layers as the layer produces it (`TapeRecorder`), then one backward pass.

`run` works the same eagerly and while a `tf.function` traces it; everything
it learns about the model (keys, order, which sources are connected) it returns
as a plain dict, so that a compiled caller (`Compiled`) can ship it out of the
trace.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from typing import Any

import keras

from gradprobe import backends
from gradprobe.core import _patch
from gradprobe.core.call_errors import call_error
from gradprobe.core.capture.assembly import (
    SourceEntry,
    aliases_of,
    collect_entries,
    raise_unconnected,
    requested_inputs,
    uses_float16,
)
from gradprobe.core.capture.recorder import TapeRecorder
from gradprobe.core.keys import input_keys
from gradprobe.core.plan import Plan
from gradprobe.core.targets import evaluate
from gradprobe.errors import GradprobeError


def run(model: Any, inputs: Any, args: dict[str, Any], plan: Plan,
        wrap_errors: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """One forward and one backward pass; returns `(tensors, meta)`.

    `tensors` holds `grads` and `values` (dicts keyed by source key), `outputs`
    and `target`; `meta` holds `order`, `kinds`, `aliases`, `unconnected`,
    `skipped` and `target` (facts for `Target.check`).
    """
    bk = backends.get()  # (the tape backend: CAPTURE == "tape")
    float16 = uses_float16(model, plan)
    tape = bk.new_tape(persistent=float16)
    recorder = TapeRecorder(tape, {id(layer) for layer in plan.probe_layers})
    if plan.replace is not None:
        recorder.replace = (id(plan.replace), plan.replace_call, args["replacement"])
    # The recorder holds the caller's frames while the forward pass runs (to tell
    # control-flow bodies apart); closed on every exit, or those frames (and the
    # tensors in their locals: this call's whole result) would form a reference
    # cycle that only the garbage collector frees, gigabytes later on a big model.
    try:
        with tape:
            for v in plan.vars:
                bk.watch(tape, v.var)
            inputs, input_entries, input_aliases = _probe_inputs(tape, inputs, plan)

            def call(model: Any, inputs: Any, training: bool) -> Any:
                with _patch.wrapped_calls(plan.probe_layers + plan.order_layers,
                                          recorder.hook):
                    return call_model(model, inputs, training, wrap_errors)

            ev = evaluate(model, inputs, plan.target, args, output=plan.output,
                          training=plan.training, call=call, names=plan.output_names,
                          layer_value=lambda: output_layer_value(recorder, plan))
            outputs, selected, value, objective = ev.outputs, ev.selected, ev.value, \
                ev.objective
    finally:
        recorder.close()

    entries, skipped, extra_aliases = collect_entries(recorder, plan)
    producers = recorder.producers(selected)
    entries = sorted(input_entries + entries, key=lambda e: (e.clock, e.kind != "activation"))
    if float16:
        grads = bk.scaled_gradient(tape, objective, [e.source for e in entries])
    else:
        grads = bk.gradient(tape, objective, [e.source for e in entries])
    # Gradients (and the activations beside them) of float16 and bfloat16 sources
    # are returned in float32, so that statistics and sums downstream are too.
    grads = [None if g is None else bk.to_float32(g) for g in grads]

    unconnected = [e for e, g in zip(entries, grads) if g is None]
    if unconnected and plan.unconnected == "raise":
        raise_unconnected(unconnected, plan)
    grads = [bk.to_float32(bk.zeros_like(e.source))
             if g is None else g
             for e, g in zip(entries, grads)]

    aliases = aliases_of([(e.requested, e.key) for e in entries] + input_aliases
                         + extra_aliases)
    tensors = {
        "grads": {e.key: g for e, g in zip(entries, grads)},
        "values": {e.key: bk.to_float32(e.value) for e in entries
                   if e.value is not None},
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


def _probe_inputs(tape: Any, inputs: Any, plan: Plan
                  ) -> tuple[Any, list[SourceEntry], list[tuple[str, str]]]:
    if not plan.inputs:
        return inputs, [], []
    wanted, aliases = requested_inputs(inputs, plan)
    flat = keras.tree.flatten(inputs)
    new, entries = [], []
    for k, leaf in zip(input_keys(inputs), flat):
        if k in wanted:
            value, probe = backends.get().probe(tape, leaf)
            entries.append(SourceEntry(k, "input", probe, value, -1, wanted[k],
                                       "the target does not depend on this input"))
            new.append(value)
        else:
            new.append(leaf)
    if len(flat) == 1 and not isinstance(inputs, (list, tuple, dict)):
        return new[0], entries, aliases
    return keras.tree.pack_sequence_as(inputs, new), entries, aliases


def call_model(model: Any, inputs: Any, training: bool, wrap_errors: bool) -> Any:
    try:
        with keras.StatelessScope(), backends.get().name_scope("gradprobe"):
            return model(inputs, training=training)
    except GradprobeError:
        raise
    except Exception as e:
        if not wrap_errors:
            raise
        raise call_error(model, inputs, e) from e


def output_layer_value(recorder: TapeRecorder, plan: Plan) -> Any:
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

    def __init__(self, model: Any, plan: Plan, run: Callable):
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
            return [*keras.tree.flatten(tensors), backends.get().constant_string(text)]

        return self._fns.setdefault(names, (backends.get().compile_function(traced), traces))

    def __call__(self, x: Any, args: dict) -> tuple[Any, dict]:
        fn, traces = self._function(tuple(args))
        flat = fn(x, *args.values())
        if len(traces) == 1:  # (traces run in the call, before this line)
            meta, structure = next(iter(traces.values()))
        else:
            meta, structure = traces[backends.get().decode_string(flat[-1])]
        return keras.tree.pack_sequence_as(structure, flat[:-1]), meta

    def experimental_get_tracing_count(self) -> int:
        """How many times the request was traced (`tf.function`'s count)."""
        return sum(fn.experimental_get_tracing_count() for fn, _ in list(self._fns.values()))


def compiled(model: Any, plan: Plan, run: Callable) -> Compiled:
    """The compiled function of one request (see `Compiled`)."""
    return Compiled(model, plan, run)
