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
(`capture._collect` builds the entries for both).

With `per_example=True` the weight gradients come from single-example passes
of the same forward pass mapped over the batch (`jax.vmap` on JAX, a loop on
PyTorch), or from the Jacobian of the batched pass's per-example targets where
examples interact (see `_Request._per_example_step`).

A model that computes in float16 (`capture._uses_float16`, as on TensorFlow) is
differentiated with loss scaling (the backend's `scaled_value_and_grad`, the rule
in `gradprobe.backends._loss_scale`), and float16/bfloat16 gradients and values
come back in float32 (`_in_float32`).

Only `keras.ops`, `keras.tree`, NumPy and `gradprobe.backends` are used here.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import keras
import numpy as np

from gradprobe import backends
from gradprobe.core import _patch, _validate, capture, engine
from gradprobe.core.result import Gradients
from gradprobe.core.targets import evaluate, make_target
from gradprobe.errors import GradprobeError

_SIGNATURES = 8  # input signatures kept per cached request


def gradients(model: Any, inputs: Any, target: Any, wrt: Any, *, output: Any,
              training: bool, unconnected: str, compile: bool | str,
              differentiable: bool, per_example: bool | str) -> Gradients:
    """`gp.gradients` on a functional backend (arguments validated by the caller)."""
    per_example = _check_per_example(per_example, backends.get())
    x = prepare_inputs(model, inputs)
    engine.ensure_built(model, x)
    tgt = make_target(target, engine.batch_size(x))
    return run(model, x, tgt, wrt, output=output, training=bool(training),
               unconnected=unconnected, compile=compile, differentiable=differentiable,
               per_example=per_example)


def run(model: Any, x: Any, tgt: Any, wrt: Any, *, output: Any, training: bool,
        unconnected: str, compile: bool | str, differentiable: bool, per_example: bool | str,
        replacement: Any = None) -> Gradients:
    """`engine.run` on a functional backend: a request already resolved (inputs
    prepared, target made); with `replacement`, `gradients_at`."""
    bk = backends.get()
    replace = replacement is not None
    entry = engine._entry(model, wrt, tgt, output, training, unconnected, per_example, replace)
    engine._check_input_dtypes(model, x, entry.plan, _is_floating, _stand_in)
    with _lock:
        request = entry.fn
    if not isinstance(request, _Request):
        with _lock:
            if not isinstance(entry.fn, _Request):
                entry.fn = _Request(model, entry.plan)
            request = entry.fn
    args = tgt.args
    if replace:
        args = dict(args, replacement=keras.ops.convert_to_tensor(replacement))
    x, args = _placed_inputs(bk, x, args)
    tensors, meta = request.run(model, x, args, compile)
    # (empty per_example_method / _fallbacks, as on TF)
    return engine.result_of(tensors, meta, tgt, entry.plan, differentiable, bk.stop_gradient)


_lock = threading.Lock()


def _placed_inputs(bk: Any, x: Any, args: dict) -> tuple[Any, dict]:
    """Under a `keras.distribution` (JAX), the inputs and the target's batch-shaped
    arguments laid out as Keras' trainer lays out a batch (`bk.place_inputs`);
    unchanged otherwise."""
    place = getattr(bk, "place_inputs", None)
    return (x, args) if place is None else place(x, args)


def _constrained(bk: Any, step: Any, owners: dict) -> Any:
    """`step` with its weight gradients constrained to their variables' sharding
    (`bk.constrain_gradients`, JAX: a sharded kernel's gradient stays sharded like
    it); `step` itself on a backend without it."""
    constrain = getattr(bk, "constrain_gradients", None)
    if constrain is None or not owners:
        return step

    def constrained_step(*args: Any) -> tuple[Any, Any]:
        aux, grads = step(*args)
        return aux, dict(grads, vars=constrain(grads["vars"], owners))

    return constrained_step


def _unsharded(bk: Any, tree: Any) -> Any:
    """`tree` replicated on the mesh of the current `keras.distribution` (JAX), for
    the single-example passes mapped over the batch (their inputs and their
    results): XLA's SPMD partitioner computes wrong per-example Conv kernel
    gradients (the `batch_group_count` convolution of `vmap` over the kernel
    gradient) when the mapped batch is sharded, or when the mapped result is
    constrained to be (JAX 0.10.2, host CPU devices: every shard but the first
    is wrong). Unchanged on other backends and without a distribution."""
    replicate = getattr(bk, "replicated", None)
    return tree if replicate is None else replicate(tree)


def _check_per_example(per_example: Any, bk: Any) -> bool | str:
    """The validated `per_example` argument: `False`, `True` (the fastest correct
    method), the backend's single-example method (`"vmap"` on JAX, `"loop"` on
    PyTorch) or `"jacobian"`. TensorFlow's `"vectorized_map"` means the
    single-example method here too, so that code runs on every backend."""
    raw = per_example
    if isinstance(per_example, (bool, np.bool_)):
        per_example = bool(per_example)
    else:
        single = getattr(bk, "PER_EXAMPLE_METHOD", "vmap")
        per_example = _validate.choice(
            "per_example", per_example, (single, "jacobian", "vectorized_map"),
            "or True (the fastest correct method) or False")
        if per_example == "vectorized_map":
            per_example = single
    if per_example is not False and not getattr(bk, "PER_EXAMPLE", False):
        raise GradprobeError(
            f"Expected per_example=False on the {bk.NAME} backend: per-example gradients are "
            f"not supported there yet (they are on TensorFlow and JAX; here, loop over "
            f"single examples with per_example=False). Received: per_example={raw!r}")
    return per_example


def trace_count() -> int:
    """How many times the backend traced a compiled gradient function (for tests)."""
    return backends.get().trace_count


# --------------------------------------------------------------------- inputs
def prepare_inputs(model: Any, inputs: Any) -> Any:
    """Arrays as backend tensors; floating arrays take the model's input dtype
    (as `engine.prepare_inputs` does on TensorFlow). Backend tensors are kept as
    they are, traced ones included (a call under the caller's own `jax.grad`)."""
    if not (keras.ops.is_tensor(inputs) and _dtype(inputs) in _REAL):
        # Validated through a stand-in of each backend tensor with its shape and dtype
        # (np.empty allocates no pages), since a traced value cannot become an array.
        _validate.inputs(keras.tree.map_structure(
            lambda leaf: np.empty(tuple(leaf.shape), np.dtype(_dtype(leaf)))
            if keras.ops.is_tensor(leaf) else leaf, inputs))
    specs = getattr(model, "inputs", None) or []
    spec_dtypes = [getattr(s, "dtype", None) for s in specs]
    leaves = keras.tree.flatten(inputs)
    leaves = [leaf if keras.ops.is_tensor(leaf) else np.asarray(leaf) for leaf in leaves]
    keys = capture.input_keys(inputs)
    for key, leaf in zip(keys, leaves):
        _validate.text_input(_validate.leaf_name("inputs", key), leaf)
    _validate.model_inputs(model, inputs, leaves, [getattr(d, "name", d) for d in spec_dtypes])
    converted = []
    for i, leaf in enumerate(leaves):
        if keras.ops.is_tensor(leaf):
            converted.append(leaf)
            continue
        arr = leaf
        if arr.dtype == object:
            raise GradprobeError(f"Input {i} is an object array; pass numeric arrays or tensors.")
        dtype = None
        if np.issubdtype(arr.dtype, np.floating):
            dtype = spec_dtypes[i] if len(spec_dtypes) == len(leaves) and spec_dtypes[i] else \
                getattr(model, "compute_dtype", None)
        converted.append(keras.ops.convert_to_tensor(arr, dtype))
    _validate.batch([_stand_in(leaf) for leaf in converted],
                    [getattr(d, "name", d) for d in spec_dtypes],
                    exact_count=not isinstance(inputs, dict))
    if len(leaves) == 1 and not isinstance(inputs, (list, tuple, dict)):
        x = converted[0]
    else:
        x = keras.tree.pack_sequence_as(inputs, converted)
    return _placed_inputs(backends.get(), x, {})[0]


_REAL = {"float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
         "uint8", "uint16", "uint32", "uint64", "bool"}


def _dtype(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def _stand_in(leaf: Any) -> Any:
    """A backend tensor's shape and dtype name, for the checks of `_validate`
    (written for TensorFlow dtypes, which take dtype names)."""
    return SimpleNamespace(shape=tuple(leaf.shape), dtype=_dtype(leaf))


def _is_floating(x: Any) -> bool:
    return keras.ops.is_tensor(x) and keras.backend.is_float_dtype(_dtype(x))


def _refuse_float16(model: Any, plan: capture.Plan, name: str,
                    what: str = "gp.functional") -> None:
    """`what` (a pure-function form: `gp.functional`, `gp.hvp`, `gp.jacobian`,
    `gp.gradient_penalty`) has no loss scaling: refused for float16/bfloat16 models."""
    layers = [model, *plan.probe_layers, *plan.order_layers]
    dtypes = {getattr(layer, "compute_dtype", None) for layer in layers}
    low = sorted(d for d in dtypes if d in ("float16", "bfloat16"))
    if low:
        raise GradprobeError(
            f"Model {model.name!r} computes in {low[0]}; {what} does not support "
            f"float16/bfloat16 models on the {name} backend yet (no loss scaling in a "
            "pure-function form: small gradients would silently flush to zero). "
            "gp.gradients and the attribution functions do (loss-scaled, float32 "
            "results); otherwise use a float32 model.")


def _value_and_grad(bk: Any, loss_scaled: bool) -> Any:
    """The backend's `value_and_grad`, loss-scaled for a model that computes in
    float16 (`gradprobe.backends._loss_scale`, TensorFlow's rule)."""
    return bk.scaled_value_and_grad if loss_scaled else bk.value_and_grad


_LOW = ("float16", "bfloat16")


def _low_precision(prep: _Prepared, variables: list) -> bool:
    """Whether a result of this signature could come out in float16 or bfloat16
    (a probed activation or input, or a requested variable, of such a dtype)."""
    dtypes = [d for _, d in prep.probe_specs.values()]
    dtypes += [variables[pos].dtype for pos in prep.var_keys.values()]
    return any(keras.backend.standardize_dtype(d) in _LOW for d in dtypes)


def _in_float32(step: Any) -> Any:
    """`step` with every gradient and every activation (and input) value in float32
    where it is float16 or bfloat16, as on TensorFlow (`capture.run`): statistics,
    diagnosis and attribution sums downstream are then computed in float32."""

    def run(trainable: list, non_trainable: list, x: Any, args: dict) -> tuple[Any, Any]:
        aux, grads = step(trainable, non_trainable, x, args)
        grads = {part: {k: _to_float32(g) for k, g in leaves.items()}
                 for part, leaves in grads.items()}
        aux = dict(aux, values={k: _to_float32(v) for k, v in aux["values"].items()})
        return aux, grads

    return run


def _to_float32(x: Any) -> Any:
    return keras.ops.cast(x, "float32") if _dtype(x) in _LOW else x


# ------------------------------------------------------------------ recording
class _Recorder:
    """Sees every call of the hooked layers during one trace of the forward pass.

    Discovery (`table is None`): records each call (shapes and dtypes of its
    output leaves, its clock) and returns outputs unchanged. Probing: adds
    `probes[key]` to the output leaves the table names and keeps the probed
    values (the activations) under their keys.
    """

    def __init__(self, bk: Any, probe_ids: set[int], table: dict | None = None,
                 probes: dict | None = None):
        self.bk = bk
        self.probe_ids = probe_ids
        self.table = table
        self.probes = probes
        self.origin = backends.Origin()
        self.calls: list[capture._Call] = []
        self.counts: dict[int, int] = {}
        self.first_clock: dict[int, int] = {}
        self.returned: list[tuple[int, list[int]]] = []
        self.leaves_of: dict[int, list[list[Any]]] = {}
        self.in_control_flow: dict[int, str] = {}
        self.values: dict[str, Any] = {}
        self.clock = 0
        self.target_meta: dict = {}
        self.producers: set[int] = set()
        self.replace: tuple | None = None  # (layer id, call or None, values): see gradients_at

    def hook(self, layer: Any, outputs: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        flow = self.bk.control_flow(self.origin)
        if flow is not None:
            # A loop or branch body traced by the backend (lax.scan for RNN cells):
            # never probed; `capture._collect` reports it.
            self.in_control_flow.setdefault(id(layer), flow)
            return outputs
        lid = id(layer)
        index = self.counts.get(lid, 0)
        self.counts[lid] = index + 1
        if self.replace is not None and lid == self.replace[0]:
            outputs = _replaced(layer, index, outputs, *self.replace[1:])
        if self.table is not None:
            return self._probe(lid, index, outputs)
        self.first_clock.setdefault(lid, self.clock)
        clock, self.clock = self.clock, self.clock + 1
        leaves = keras.tree.flatten(outputs)
        if lid not in self.probe_ids:
            self.returned.append((lid, [id(t) for t in leaves]))
            return outputs
        recorded = [(_Abstract(leaf), (lid, index, j) if _is_floating(leaf) else None)
                    for j, leaf in enumerate(leaves)]
        self.calls.append(capture._Call(lid, index, recorded, clock))
        self.returned.append((lid, [id(t) for t in leaves]))
        self.leaves_of.setdefault(lid, []).append(leaves)
        return outputs

    def _probe(self, lid: int, index: int, outputs: Any) -> Any:
        """A run's hook (after discovery): adds the probes the table names to
        this call's output leaves; keeps the leaves of each call (for the
        `output=` layer). Clocks and producers were learnt by discovery."""
        single = self.bk.is_array(outputs)  # (a tensor, or a tracer on JAX)
        leaves = [outputs] if single else keras.tree.flatten(outputs)
        new = []
        for j, leaf in enumerate(leaves):
            key = self.table.get((lid, index, j))
            if key is not None:
                leaf = self.bk.add_probe(leaf, self.probes[key])
                self.values[key] = leaf
            new.append(leaf)
        self.leaves_of.setdefault(lid, []).append(new)
        if single:
            return new[0]
        return keras.tree.pack_sequence_as(outputs, new)

    def calls_of(self, layer: Any) -> list[capture._Call]:
        return [c for c in self.calls if c.layer_id == id(layer)]

    def output_layer_value(self, plan: capture.Plan) -> Any:
        if plan.output_layer is None:
            return None
        calls = self.leaves_of.get(id(plan.output_layer), [])
        if not calls:
            return None
        if len(calls) > 1:
            raise GradprobeError(
                f"output={plan.output!r} names a layer the forward pass calls {len(calls)} "
                "times; the target would be ambiguous. Use a callable target on the model "
                "output.")
        return calls[0][0] if len(calls[0]) == 1 else calls[0]

    def close(self) -> None:
        self.origin.close()


@dataclass(frozen=True)
class _Abstract:
    """The shape and dtype of a traced value (what `capture._collect` reads)."""

    shape: tuple
    dtype: Any

    def __init__(self, leaf: Any):
        object.__setattr__(self, "shape", tuple(leaf.shape))
        object.__setattr__(self, "dtype", getattr(leaf, "dtype", None))


# ------------------------------------------------------------------- request
@dataclass
class _Prepared:
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


class _Request:
    """The compiled gradient function of one cached request (`engine._Entry.fn`):
    one `_Prepared` per input signature. Holds the model weakly (the engine's
    cache must not keep models alive)."""

    def __init__(self, model: Any, plan: capture.Plan):
        self.model_ref = weakref.ref(model)
        self.plan = plan
        self.prepared: dict[Any, _Prepared] = {}
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
        when layers or weights are added (`engine._fingerprint`); what can change
        within a request is which variables are trainable (`layer.trainable =
        False`), so the lists are kept with those flags and asked from Keras
        again when a flag changed. The flags are part of a prepared signature's
        key (`key`): the positions of the requested variables in the lists
        (`_Prepared.var_keys`) move when the split does."""
        kept = self._variable_lists
        if kept is not None and kept[0] == _trainable_flags(model, kept[1], kept[2]):
            return kept
        trainable = list(model.trainable_variables)
        non_trainable = list(model.non_trainable_variables)
        kept = (_trainable_flags(model, trainable, non_trainable), trainable, non_trainable)
        self._variable_lists = kept
        return kept

    def key(self, model: Any, x: Any, args: dict) -> tuple:
        """The key of the `_Prepared` for these inputs and target arguments: the
        input signature and the split of the model's variables."""
        return self._variable_split(model)[0], _signature(x, args)

    # -- the pure forward pass ------------------------------------------------
    def forward(self, prep: _Prepared | None, diff: dict, trainable: list, non_trainable: list,
                x: Any, args: dict, recorder: _Recorder) -> tuple[Any, dict]:
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
                        _scope(variables, values, requested):
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
                raise capture.call_error(model, x, e) from e
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

    def _probe_inputs(self, x: Any, probes: dict, recorder: _Recorder) -> Any:
        keys = capture.input_keys(x)
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
    def _prepare(self, bk: Any, model: Any, x: Any, args: dict) -> _Prepared:
        plan = self.plan
        model_trainable, model_non_trainable = self.variables(model)
        variables = model_trainable + model_non_trainable
        trainable = [bk.abstract(bk.value_of(v)) for v in model_trainable]
        non_trainable = [bk.abstract(bk.value_of(v)) for v in model_non_trainable]
        ax, aargs = _tree_abstract(bk, x), _tree_abstract(bk, args)
        probe_ids = {id(layer) for layer in plan.probe_layers}

        found = _Recorder(bk, probe_ids)

        def discover(trainable: list, non_trainable: list, x: Any, args: dict) -> Any:
            return self.forward(None, {}, trainable, non_trainable, x, args, found)[1]["target"]

        target_shape = bk.eval_shape(discover, trainable, non_trainable, ax, aargs)
        if plan.per_example:
            capture.per_example_values(target_shape, "per_example=True")
        entries, skipped, extra_aliases = capture._collect(found, plan)
        input_entries, input_aliases = _input_entries(x, plan)
        entries = sorted(input_entries + entries,
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
                leaf = dict(zip(capture.input_keys(x), keras.tree.flatten(x)))[e.key]
                probe_specs[e.key] = (tuple(leaf.shape), leaf.dtype)
            else:
                pos = positions.get(id(e.source))
                if pos is None:
                    raise GradprobeError(
                        f"Variable {e.key!r} is not one of model {model.name!r}'s variables "
                        "(model.trainable_variables + model.non_trainable_variables), so the "
                        "functional capture cannot differentiate it.")
                var_keys[e.key] = pos
        aliases: dict[str, list[str]] = {}
        pairs = [(e.requested, e.key) for e in entries] + input_aliases + extra_aliases
        for requested, key in pairs:
            keys = aliases.setdefault(requested, [])
            if key not in keys:
                keys.append(key)
        meta = {
            "order": [e.key for e in entries],
            "kinds": {e.key: e.kind for e in entries},
            "aliases": aliases,
            "unconnected": [],
            "skipped": skipped,
            "target": found.target_meta,
            "output_keys": [e.key for e in entries if e.layer_id in found.producers],
        }
        prep = _Prepared(table, probe_specs, entries, var_keys, meta, [])
        probed = {lid for lid, _, _ in table}
        prep.run_layers = [layer for layer in plan.probe_layers if id(layer) in probed
                           or layer is plan.output_layer or layer is plan.replace]

        diff = {"probes": {k: bk.zeros(s, d) for k, (s, d) in probe_specs.items()},
                "vars": {k: bk.value_of(variables[pos]) for k, pos in var_keys.items()}}

        def objective(diff: dict, trainable: list, non_trainable: list, x: Any,
                      args: dict) -> tuple[Any, dict]:
            recorder = _Recorder(bk, probe_ids, table, diff["probes"])
            return self.forward(prep, diff, trainable, non_trainable, x, args, recorder)

        flags = bk.connected(objective, diff, trainable, non_trainable, ax, aargs)
        missing = [e for e in entries
                   if not (flags["vars"][e.key] if e.kind == "weight" else flags["probes"][e.key])]
        if missing and plan.unconnected == "raise":
            capture._raise_unconnected(missing, plan)
        prep.unconnected = [e.key for e in missing]
        prep.meta["unconnected"] = prep.unconnected

        prep.loss_scaled = capture._uses_float16(model, plan)
        grad_fn = _value_and_grad(bk, prep.loss_scaled)(objective)

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
            self._per_example_step(bk, model, prep, probe_ids, step,
                                   (trainable, non_trainable, ax, aargs))
        prep.step = _constrained(bk, prep.step, {k: variables[pos] for k, pos in var_keys.items()})
        if _low_precision(prep, variables):
            prep.step = _in_float32(prep.step)
        return prep

    def _per_example_step(self, bk: Any, model: Any, prep: _Prepared, probe_ids: set[int],
                          batched: Any, abstract_args: tuple) -> None:
        """Replaces `prep.step` by a step whose weight gradients are per example.

        `"vmap"` (the default on JAX): `jax.vmap` over the examples of one
        single-example pass (each example a batch of one through the same forward
        pass, then one gradient), so every layer runs as in the batch; `"loop"` on
        PyTorch: the same single-example passes one after the other. `"jacobian"`: the Jacobian
        of the per-example target values over one batched pass with respect to
        the weights; used when examples interact (BatchNormalization with
        `training=True`) or a random layer runs in training mode (a mapped pass
        would draw one noise for all examples), as on TensorFlow, and when the
        pass cannot be mapped. Activation and input gradients (and the values,
        outputs and target) come from the batched pass, as with
        `per_example=False`; the compiled step computes both.
        """
        plan = self.plan
        weights = [e.key for e in prep.entries if e.kind == "weight"]
        if not weights:  # activations and inputs only: per example by nature
            prep.meta.update(per_example_method={}, per_example_fallbacks={})
            return
        var_keys = prep.var_keys
        others = bool(plan.acts or plan.inputs)
        requested = plan.per_example if isinstance(plan.per_example, str) else "auto"
        single = bk.PER_EXAMPLE_METHOD

        def forward_plain(diff: dict, trainable: list, non_trainable: list, x: Any,
                          args: dict) -> tuple[Any, dict]:
            # The forward pass with the requested variables from `diff` and no probes.
            recorder = _Recorder(bk, probe_ids, {}, {})
            return self.forward(prep, {"probes": {}, "vars": diff}, trainable, non_trainable,
                                x, args, recorder)

        def var_values(trainable: list, non_trainable: list) -> dict:
            variables = list(trainable) + list(non_trainable)
            return {k: variables[pos] for k, pos in var_keys.items()}

        def combine(per_weight: Any, trainable: list, non_trainable: list, x: Any, args: dict,
                    plain: dict) -> tuple[dict, dict]:
            if others:
                # (under jit, XLA drops the batched weight gradients this also computes)
                aux, grads = batched(trainable, non_trainable, x, args)
                return aux, {"probes": grads["probes"], "vars": per_weight}
            return dict(plain, values={}), {"probes": {}, "vars": per_weight}

        single_grad = _value_and_grad(bk, prep.loss_scaled)(forward_plain)

        def one(trainable: list, non_trainable: list, xi: Any, mapped: dict,
                fixed: dict) -> tuple[dict, Any, Any]:
            xi = keras.tree.map_structure(lambda t: t[None], xi)
            ai = dict({k: v[None] for k, v in mapped.items()}, **fixed)
            (_, aux), grads = single_grad(var_values(trainable, non_trainable), trainable,
                                          non_trainable, xi, ai)
            return grads, aux["outputs"], aux["target"]

        mapped_one = bk.vmap(one, (None, None, 0, 0, None))

        def vmap_step(trainable: list, non_trainable: list, x: Any, args: dict
                      ) -> tuple[dict, dict]:
            mapped = {k: v for k, v in args.items() if len(getattr(v, "shape", ())) > 0}
            fixed = {k: v for k, v in args.items() if k not in mapped}
            grads, outputs, target = _unsharded(bk, mapped_one(
                trainable, non_trainable, *_unsharded(bk, (x, mapped)), fixed))
            plain = {"outputs": keras.tree.map_structure(unstack_one, outputs),
                     "target": keras.ops.reshape(target, (-1,))}
            return combine(grads, trainable, non_trainable, x, args, plain)

        def target_of(diff: dict, trainable: list, non_trainable: list, x: Any,
                      args: dict) -> tuple[Any, dict]:
            _, aux = forward_plain(diff, trainable, non_trainable, x, args)
            return aux["target"], aux

        jacobian = bk.jacobian(target_of)

        def jacobian_step(trainable: list, non_trainable: list, x: Any, args: dict
                          ) -> tuple[dict, dict]:
            grads, aux = jacobian(var_values(trainable, non_trainable), trainable,
                                  non_trainable, x, args)
            return combine(grads, trainable, non_trainable, x, args, aux)

        from gradprobe.higher.per_example import forced_fallback  # imports the engine

        why = forced_fallback(model, plan, requested)
        if not why and single == "vmap":
            try:  # traced on abstract values: nothing is computed
                bk.eval_shape(vmap_step, *abstract_args)
            except Exception as e:
                # The batched pass traced: what fails here is the mapping (a model
                # call error comes wrapped by `capture.call_error`: report its cause).
                cause = e.__cause__ if isinstance(e, GradprobeError) and \
                    e.__cause__ is not None else e
                # (Keras frames the message: "Exception encountered when calling
                # ...", the message, "Arguments received by ...", "• x=...")
                lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()
                         and not ln.strip().startswith(("Exception encountered",
                                                        "Arguments received", "•"))]
                reason = f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"
                if requested == single:
                    raise GradprobeError(
                        f"per_example='vmap': {bk.NAME} could not map the single-example "
                        f"pass over the examples ({reason}). Use per_example=True to "
                        "fall back to the Jacobian of the batched pass.") from e
                why = f"{bk.NAME}.vmap could not map the single-example pass ({reason})"
        if why:
            prep.step = jacobian_step
            prep.meta.update(per_example_method=dict.fromkeys(weights, "jacobian"),
                             per_example_fallbacks=dict.fromkeys(weights, why))
        else:
            prep.step = vmap_step
            prep.meta.update(per_example_method=dict.fromkeys(weights, single),
                             per_example_fallbacks={})

    # -- running ---------------------------------------------------------------
    def run(self, model: Any, x: Any, args: dict, compile: bool | str) -> tuple[dict, dict]:
        bk = backends.get()
        signature = self.key(model, x, args)
        with self.lock:
            prep = self.prepared.get(signature)
        if prep is None:
            prep = self._prepare(bk, model, x, args)
            with self.lock:
                self.prepared[signature] = prep
                while len(self.prepared) > _SIGNATURES:
                    self.prepared.pop(next(iter(self.prepared)))
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
                    raise engine.compile_error(model, e, f"{bk.NAME}.jit") from e
                aux, grads = prep.step(*call_args)
                prep.eager_only = True
                warnings.warn(
                    f"gradprobe: model {model.name!r} could not be compiled with {bk.NAME}.jit "
                    f"({type(e).__name__}: {engine._last_line(e)}); running eagerly from now "
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


def gradients_at(model: Any, inputs: Any, target: Any, layer: Any, values: Any, *,
                 output: Any = None, training: bool = False) -> Gradients:
    """Gradients with respect to `layer`'s activation when that activation is
    replaced by `values` in the forward pass (the layers before it still run on
    `inputs`, whose batch must match `values`), on a functional backend: as
    `engine.gradients_at` on TensorFlow. Used by layer Integrated Gradients.

    The replacement is an argument of the compiled step (`args["replacement"]`),
    so that new values reuse the compiled function of their shape; the probe is
    added to the replacing values, and the gradient is taken with respect to it.
    """
    return engine.gradients_at(model, inputs, target, layer, values, output=output,
                               training=training)


def _replaced(layer: Any, index: int, outputs: Any, call: int | None, values: Any) -> Any:
    """`values` in place of the output of call `index` of `layer` when it is the
    replaced call (`call`; `None`: its only call), in the output's dtype."""
    if call is None and index:
        raise GradprobeError(
            f"Layer {layer.name!r} is called more than once; its activation cannot be "
            f"replaced unambiguously. Choose one call: '{layer.name}@0', "
            f"'{layer.name}@1', ...")
    if call is not None and index != call:
        return outputs
    leaves = keras.tree.flatten(outputs)
    if len(leaves) != 1 or tuple(leaves[0].shape) != tuple(values.shape):
        raise GradprobeError(
            f"The replacement for layer {layer.name!r}'s output must have its shape "
            f"{[tuple(t.shape) for t in leaves]}; got {tuple(values.shape)}.")
    return keras.ops.cast(values, leaves[0].dtype)


def unstack_one(t: Any) -> Any:
    """`(batch, 1, ...)` -> `(batch, ...)`: a mapped single-example output."""
    shape = tuple(t.shape)
    if len(shape) > 1 and shape[1] == 1:
        return keras.ops.reshape(t, (shape[0], *shape[2:]))
    return t


def _input_entries(x: Any, plan: capture.Plan) -> tuple[list, list[tuple[str, str]]]:
    """Entries and (selector, key) aliases for the requested inputs (as
    `capture._probe_inputs` makes them on TensorFlow)."""
    if not plan.inputs:
        return [], []
    keys = capture.input_keys(x)
    wanted: dict[str, str] = {}
    aliases: list[tuple[str, str]] = []
    for spec in plan.inputs:
        chosen = keys if spec.index is None else [capture._input_key(keys, spec.index, x)]
        for k in chosen:
            wanted.setdefault(k, spec.requested)
            aliases.append((spec.requested, k))
    entries = [capture._Entry(k, "input", ("input", k), None, -1, wanted[k],
                              "the target does not depend on this input")
               for k in keys if k in wanted]
    return entries, aliases


def _trainable_flags(model: Any, trainable: list, non_trainable: list) -> tuple:
    """What decides how Keras splits `model`'s variables into trainable and not."""
    return (model.trainable, len(trainable), *(v.trainable for v in trainable),
            *(v.trainable for v in non_trainable))


def _scope(variables: list, values: list, requested: list) -> keras.StatelessScope:
    """A `keras.StatelessScope` in which `variables` read `values` (`None`: a
    requested variable, whose value comes from `requested`).

    The requested variables' values (from the caller, through the differentiated
    argument) go through the scope's `state_mapping`, which checks and casts
    them. The other values are the variables' own (`backends.*.value_of`, one
    per call), of the right shape and dtype by construction: they are put in
    with the scope's `add_update`, which records a value without converting
    it (the conversion costs 10 us per variable on PyTorch, 3.4 ms per call on
    ResNet50)."""
    scope = keras.StatelessScope(state_mapping=requested)
    for variable, value in zip(variables, values):
        if value is not None:
            scope.add_update((variable, value))
    return scope


def _tree_abstract(bk: Any, tree: Any) -> Any:
    return keras.tree.map_structure(bk.abstract, tree)


def _signature(x: Any, args: dict) -> tuple:
    """What a compiled step depends on besides values: structure, shapes, dtypes."""
    def describe(tree: Any) -> tuple:
        if keras.ops.is_tensor(tree):
            return (tuple(tree.shape), str(tree.dtype))
        if type(tree) is dict and all(_is_plain_array(v) for v in tree.values()):
            # (a target's arguments: a dict of arrays, described without keras.tree)
            return ("dict", tuple((k, tuple(v.shape), str(v.dtype))
                                  for k, v in sorted(tree.items())))
        leaves = keras.tree.flatten(tree)
        return (str(keras.tree.map_structure(lambda _: 0, tree)),
                tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves))

    return describe(x), describe(args)


def _is_plain_array(x: Any) -> bool:
    """A backend tensor or a NumPy array (not a nested structure)."""
    return isinstance(x, np.ndarray) or keras.ops.is_tensor(x)
