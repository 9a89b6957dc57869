"""`gp.gradients` on JAX and PyTorch: the capture as a function of its sources.

The forward pass is a function of its differentiable sources,

    forward(diff, trainable_values, non_trainable_values, inputs, args) -> (objective, aux)

where `diff = {"probes": {key: zeros}, "vars": {key: value}}`: the model's own
call runs statelessly (as `model.stateless_call`: every variable's value
comes from the arguments, state updates are discarded) with a hook (`_patch.wrapped_calls`, as on TensorFlow)
that adds `probes[key]` to each requested layer output as the layer produces it
(`key` names the layer and, for a layer called several times, the call), the
requested variables' values replace theirs, and input probes are added to the
inputs. The backend differentiates `forward` once with respect to `diff`
(`jax.value_and_grad`, compiled with `jax.jit` and cached per request and input
signature; on PyTorch the probes are `view_as` views made as the layers run and
one `torch.autograd.grad`, eagerly: see `gradprobe.backends.torch`).

Before the first run for a given input signature, two passes on abstract values
(nothing is computed on JAX; PyTorch runs them for real) learn what the TensorFlow capture learns while it runs:
a discovery pass records which layers ran, in which order, how often, with
which output shapes and dtypes, which of them produced the selected output and
which ran inside backend control flow (a `lax.scan` body: never probed, since a
probe there would be summed over the steps); then a dependency pass finds the
sources the objective does not depend on at all (`unconnected`). The result
has the same keys, order, kinds, aliases and diagnostics as on TensorFlow
(`assembly.collect_entries` builds the entries for both).

With `per_example=True` the weight gradients come from single-example passes
of the same forward pass mapped over the batch (`jax.vmap` on JAX, a loop on
PyTorch), or from the Jacobian of the batched pass's per-example targets where
examples interact (see `functional_per_example`).

A model that computes in float16 (`assembly.uses_float16`, as on TensorFlow) is
differentiated with loss scaling (the backend's `scaled_value_and_grad`, the rule
in `gradprobe.backends._loss_scale`), and float16/bfloat16 gradients and values
come back in float32 (`functional_steps.in_float32`).

Only `keras.ops`, `keras.tree`, NumPy and `gradprobe.backends` are used here.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import keras

from gradprobe import backends
from gradprobe.core import _patch
from gradprobe.core.call_errors import call_error, compile_error, last_line
from gradprobe.core.capture import functional_per_example
from gradprobe.core.capture.assembly import (
    aliases_of,
    collect_entries,
    per_example_values,
    raise_unconnected,
    uses_float16,
)
from gradprobe.core.capture.functional_steps import (
    LOW_PRECISION,
    constrained,
    in_float32,
    input_entries,
    input_signature,
    stateless_scope,
    trainable_flags,
    tree_abstract,
    value_and_grad,
)
from gradprobe.core.capture.recorder import FunctionalRecorder
from gradprobe.core.keys import input_keys
from gradprobe.core.plan import Plan
from gradprobe.core.targets import evaluate
from gradprobe.errors import GradprobeError

SIGNATURES = 8  # input signatures kept per cached request
lock = threading.Lock()


def request_of(entry: Any, model: Any) -> FunctionalRequest:
    """The `FunctionalRequest` of a cached request (`entry`, a `CacheEntry`), made
    on first use."""
    with lock:
        request = entry.fn
    if not isinstance(request, FunctionalRequest):
        with lock:
            if not isinstance(entry.fn, FunctionalRequest):
                entry.fn = FunctionalRequest(model, entry.plan)
            request = entry.fn
    return request


def run_request(entry: Any, model: Any, x: Any, args: dict, compile: bool | str
                ) -> tuple[dict, dict]:
    """`(tensors, meta)` of one run of a cached request on a functional backend."""
    return request_of(entry, model).run(model, x, args, compile)


def trace_count() -> int:
    """How many times the backend traced a compiled gradient function (for tests)."""
    return backends.get().trace_count


def low_precision(prep: Prepared, variables: list) -> bool:
    """Whether a result of this signature could come out in float16 or bfloat16
    (a probed activation or input, or a requested variable, of such a dtype)."""
    dtypes = [d for _, d in prep.probe_specs.values()]
    dtypes += [variables[pos].dtype for pos in prep.var_keys.values()]
    return any(keras.backend.standardize_dtype(d) in LOW_PRECISION for d in dtypes)


@dataclass
class Prepared:
    """What one input signature of a request needs: the probe table, the ordered
    entries, the static part of `meta`, and the compiled step."""

    table: dict
    probe_specs: dict[str, tuple[tuple, Any]]
    entries: list
    var_keys: dict[str, int]  # key -> position in the flat variable list
    meta: dict
    unconnected: list[str]
    step: Any = None
    loss_scaled: bool = False  # the model computes in float16: gradients are loss-scaled
    eager_only: bool = False
    compiled: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The layers a run hooks: those with a probed call, the `output=` layer and
    # the replaced layer (discovery hooks every requested layer and weight owner,
    # to learn the order; a run needs none of that).
    run_layers: list = field(default_factory=list)


class FunctionalRequest:
    """The compiled gradient function of one cached request (`CacheEntry.fn`):
    one `Prepared` per input signature. Holds the model weakly (the engine's
    cache must not keep models alive)."""

    def __init__(self, model: Any, plan: Plan):
        self.model_ref = weakref.ref(model)
        self.plan = plan
        self.prepared: dict[Any, Prepared] = {}
        self.lock = threading.Lock()
        self._variable_lists: tuple | None = None  # see `variables`

    def variables(self, model: Any) -> tuple[list, list]:
        """`(model.trainable_variables, model.non_trainable_variables)`, as Keras
        gives them, kept between calls (see `_variable_split`)."""
        return self._variable_split(model)[1:]

    def _variable_split(self, model: Any) -> tuple[tuple, list, list]:
        """`(flags, trainable, non_trainable)`: Keras' two lists of `model`'s
        variables and what decides the split (`_trainable_flags`).

        Kept between calls: Keras walks every layer for each list (0.4 ms each
        on ResNet50, several times per call). The engine makes a new request
        when layers or weights are added (`cache.fingerprint`); what can change
        within a request is which variables are trainable (`layer.trainable =
        False`), so the lists are kept with those flags and asked from Keras
        again when a flag changed. The flags are part of a prepared signature's
        key (`key`): the positions of the requested variables in the lists
        (`Prepared.var_keys`) move when the split does."""
        kept = self._variable_lists
        if kept is not None and kept[0] == trainable_flags(model, kept[1], kept[2]):
            return kept
        trainable = list(model.trainable_variables)
        non_trainable = list(model.non_trainable_variables)
        kept = (trainable_flags(model, trainable, non_trainable), trainable, non_trainable)
        self._variable_lists = kept
        return kept

    def key(self, model: Any, x: Any, args: dict) -> tuple:
        """The key of the `Prepared` for these inputs and target arguments: the
        input signature and the split of the model's variables."""
        return self._variable_split(model)[0], input_signature(x, args)

    # -- the pure forward pass ------------------------------------------------
    def forward(self, prep: Prepared | None, diff: dict, trainable: list, non_trainable: list,
                x: Any, args: dict, recorder: FunctionalRecorder) -> tuple[Any, dict]:
        model, plan = self.model_ref(), self.plan
        model_trainable, model_non_trainable = self.variables(model)
        variables = model_trainable + model_non_trainable
        values = list(trainable) + list(non_trainable)
        requested: list = []
        if prep is not None:
            for key, pos in prep.var_keys.items():
                values[pos] = None
                requested.append((variables[pos], diff["vars"][key]))
            x = self._probe_inputs(x, diff["probes"], recorder)
            layers = prep.run_layers
        else:
            layers = plan.probe_layers + plan.order_layers
        if plan.replace is not None:
            recorder.replace = (id(plan.replace), plan.replace_call, args["replacement"])

        def call(model: Any, x: Any, training: bool) -> Any:
            try:
                # `model.stateless_call` without its `call(x, training=...)`: the model's
                # own `__call__` passes `training` only to a `call` that takes it, and
                # sets it for the layers inside. Updated state (moving statistics, seed
                # generators) stays in the scope, which is discarded.
                with _patch.wrapped_calls(layers, recorder.hook), \
                        stateless_scope(variables, values, requested):
                    return model(x, training=training)
            except GradprobeError:
                raise
            except Exception as e:
                traced = recorder.bk.trace_error(e)
                if traced is not None:
                    raise GradprobeError(
                        f"Model {model.name!r} cannot be traced by {recorder.bk.NAME} "
                        f"({traced}): its call needs concrete values (a Python `if` on a "
                        "tensor, or a conversion to NumPy). gradprobe traces the model on "
                        "this backend even with compile=False, to learn which layers run and "
                        "which sources the target depends on. Use keras.ops.cond / "
                        "keras.ops.where for branches on values, or the TensorFlow "
                        "backend.") from e
                raise call_error(model, x, e) from e
            finally:
                recorder.close()

        outputs, selected, value, objective, target_meta = evaluate(
            model, x, plan.target, args, output=plan.output, training=plan.training, call=call,
            names=plan.output_names, layer_value=lambda: recorder.output_layer_value(plan))
        recorder.target_meta = target_meta
        if recorder.table is None:  # discovery: which layers produced the selected output
            wanted = {id(t) for t in keras.tree.flatten(selected)}
            recorder.producers = {lid for lid, ids in recorder.returned
                                  if any(i in wanted for i in ids)}
        aux = {"values": recorder.values, "outputs": outputs, "target": value}
        return objective, aux

    def _probe_inputs(self, x: Any, probes: dict, recorder: FunctionalRecorder) -> Any:
        keys = input_keys(x)
        flat = keras.tree.flatten(x)
        new = []
        for k, leaf in zip(keys, flat):
            if k in probes:
                leaf = recorder.bk.add_probe(leaf, probes[k])
                recorder.values[k] = leaf
            new.append(leaf)
        if len(flat) == 1 and not isinstance(x, (list, tuple, dict)):
            return new[0]
        return keras.tree.pack_sequence_as(x, new)

    # -- preparing a signature -----------------------------------------------
    def _prepare(self, bk: Any, model: Any, x: Any, args: dict) -> Prepared:
        plan = self.plan
        model_trainable, model_non_trainable = self.variables(model)
        variables = model_trainable + model_non_trainable
        trainable = [bk.abstract(bk.value_of(v)) for v in model_trainable]
        non_trainable = [bk.abstract(bk.value_of(v)) for v in model_non_trainable]
        ax, aargs = tree_abstract(bk, x), tree_abstract(bk, args)
        probe_ids = {id(layer) for layer in plan.probe_layers}

        found = FunctionalRecorder(bk, probe_ids)

        def discover(trainable: list, non_trainable: list, x: Any, args: dict) -> Any:
            return self.forward(None, {}, trainable, non_trainable, x, args, found)[1]["target"]

        target_shape = bk.eval_shape(discover, trainable, non_trainable, ax, aargs)
        if plan.per_example:
            per_example_values(target_shape, "per_example=True")
        entries, skipped, extra_aliases = collect_entries(found, plan)
        inputs_found, input_aliases = input_entries(x, plan)
        entries = sorted(inputs_found + entries,
                         key=lambda e: (e.clock, e.kind != "activation"))
        table, probe_specs, var_keys = {}, {}, {}
        positions = {id(v): i for i, v in enumerate(variables)}
        for e in entries:
            if e.kind == "activation":
                lid, index, j = e.source
                table[(lid, index, j)] = e.key
                leaf = next(c for c in found.calls
                            if c.layer_id == lid and c.index == index).leaves[j][0]
                probe_specs[e.key] = (leaf.shape, leaf.dtype)
            elif e.kind == "input":
                leaf = dict(zip(input_keys(x), keras.tree.flatten(x)))[e.key]
                probe_specs[e.key] = (tuple(leaf.shape), leaf.dtype)
            else:
                pos = positions.get(id(e.source))
                if pos is None:
                    raise GradprobeError(
                        f"Variable {e.key!r} is not one of model {model.name!r}'s variables "
                        "(model.trainable_variables + model.non_trainable_variables), so the "
                        "functional capture cannot differentiate it.")
                var_keys[e.key] = pos
        aliases = aliases_of([(e.requested, e.key) for e in entries] + input_aliases
                             + extra_aliases)
        meta = {
            "order": [e.key for e in entries],
            "kinds": {e.key: e.kind for e in entries},
            "aliases": aliases,
            "unconnected": [],
            "skipped": skipped,
            "target": found.target_meta,
            "output_keys": [e.key for e in entries if e.layer_id in found.producers],
        }
        prep = Prepared(table, probe_specs, entries, var_keys, meta, [])
        probed = {lid for lid, _, _ in table}
        prep.run_layers = [layer for layer in plan.probe_layers if id(layer) in probed
                           or layer is plan.output_layer or layer is plan.replace]

        diff = {"probes": {k: bk.zeros(s, d) for k, (s, d) in probe_specs.items()},
                "vars": {k: bk.value_of(variables[pos]) for k, pos in var_keys.items()}}

        def objective(diff: dict, trainable: list, non_trainable: list, x: Any,
                      args: dict) -> tuple[Any, dict]:
            recorder = FunctionalRecorder(bk, probe_ids, table, diff["probes"])
            return self.forward(prep, diff, trainable, non_trainable, x, args, recorder)

        flags = bk.connected(objective, diff, trainable, non_trainable, ax, aargs)
        missing = [e for e in entries
                   if not (flags["vars"][e.key] if e.kind == "weight" else flags["probes"][e.key])]
        if missing and plan.unconnected == "raise":
            raise_unconnected(missing, plan)
        prep.unconnected = [e.key for e in missing]
        prep.meta["unconnected"] = prep.unconnected

        prep.loss_scaled = uses_float16(model, plan)
        grad_fn = value_and_grad(bk, prep.loss_scaled)(objective)

        def step(trainable: list, non_trainable: list, x: Any, args: dict) -> tuple[Any, Any]:
            # (the requested variables' values are taken from the lists here, inside
            # the compiled function, rather than passed twice)
            variables = list(trainable) + list(non_trainable)
            var_values = {k: variables[pos] for k, pos in var_keys.items()}
            probes = {k: bk.zeros(s, d) for k, (s, d) in probe_specs.items()}
            (_, aux), grads = grad_fn({"probes": probes, "vars": var_values}, trainable,
                                      non_trainable, x, args)
            return aux, grads

        prep.step = step
        if plan.per_example:
            functional_per_example.per_example_step(self, bk, model, prep, probe_ids, step,
                                                    (trainable, non_trainable, ax, aargs))
        prep.step = constrained(bk, prep.step, {k: variables[pos] for k, pos in var_keys.items()})
        if low_precision(prep, variables):
            prep.step = in_float32(prep.step)
        return prep

    # -- running ---------------------------------------------------------------
    def prepared_for(self, bk: Any, model: Any, x: Any, args: dict) -> Prepared:
        """The `Prepared` of this input signature, made (discovery and dependency
        passes) the first time; the `SIGNATURES` most recent are kept."""
        signature = self.key(model, x, args)
        with self.lock:
            prep = self.prepared.get(signature)
        if prep is None:
            prep = self._prepare(bk, model, x, args)
            with self.lock:
                self.prepared[signature] = prep
                while len(self.prepared) > SIGNATURES:
                    self.prepared.pop(next(iter(self.prepared)))
        return prep

    def run(self, model: Any, x: Any, args: dict, compile: bool | str) -> tuple[dict, dict]:
        bk = backends.get()
        prep = self.prepared_for(bk, model, x, args)
        model_trainable, model_non_trainable = self.variables(model)
        trainable = [bk.value_of(v) for v in model_trainable]
        non_trainable = [bk.value_of(v) for v in model_non_trainable]
        call_args = (trainable, non_trainable, x, args)
        if compile is False or (compile == "auto" and prep.eager_only):
            aux, grads = prep.step(*call_args)
        else:
            with prep.lock:
                if prep.compiled is None:
                    prep.compiled = bk.jit(prep.step)
            try:
                aux, grads = prep.compiled(*call_args)
            except GradprobeError:
                raise
            except Exception as e:
                if compile is True:
                    raise compile_error(model, e, f"{bk.NAME}.jit") from e
                aux, grads = prep.step(*call_args)
                prep.eager_only = True
                warnings.warn(
                    f"gradprobe: model {model.name!r} could not be compiled with {bk.NAME}.jit "
                    f"({type(e).__name__}: {last_line(e)}); running eagerly from now "
                    "on. Pass compile=False to silence this.", RuntimeWarning, stacklevel=4)
        out_grads = {}
        for e in prep.entries:
            g = grads["vars"][e.key] if e.kind == "weight" else grads["probes"][e.key]
            out_grads[e.key] = g
        tensors = {"grads": out_grads, "values": dict(aux["values"]),
                   "outputs": aux["outputs"], "target": aux["target"]}
        meta = {k: (list(v) if isinstance(v, list) else
                    {a: list(b) for a, b in v.items()} if k == "aliases" else
                    dict(v) if isinstance(v, dict) else v)
                for k, v in prep.meta.items()}
        return tensors, meta
