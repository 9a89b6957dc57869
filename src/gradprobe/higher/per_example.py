"""Per-example weight gradients: `gp.gradients(..., per_example=True)` and
`gp.per_example_norms`.

**Per-example gradients** (`run`, reached from `capture.run` when a plan has
`per_example` set) use, per request, the fastest method that is correct:

* `"vectorized_map"` (the default): `tf.vectorized_map` over the examples of
  one ordinary single-example capture pass (`capture.run` on a batch of one: the
  model's own forward pass with the same probes, then a tape gradient), so the
  cost is close to one batched forward and backward pass;
* `"jacobian"`: the vectorised Jacobian of the per-example target values over
  one batched pass. The fallback: used when `tf.vectorized_map` cannot vectorise
  an op of the model (the reason is reported), and the only correct method when
  examples interact in the forward pass (BatchNormalization with
  `training=True`); also used for random layers (Dropout, GaussianNoise, ...)
  with `training=True`, which mapped over examples would draw one mask for all.

Both assume nothing else couples examples: example `i`'s target depends on
example `i` only (true of every built-in Keras layer except BatchNormalization
in training mode). Activation and input gradients are per example by nature;
they come from the batched pass as with `per_example=False`.

**Norms**, `gp.per_example_norms`:

For Dense, Conv1D, Conv2D, Embedding, LayerNormalization and EinsumDense the
norms come from each layer's captured input and output gradient, in one forward
and one backward pass (the "ghost norm" identities): for a layer whose
per-example weight gradient is `sum_t a_t g_t^T` (positions `t`),

    ||sum_t a_t g_t^T||^2 = sum_{t,s} (a_t . a_s) (g_t . g_s),

computed from the two Gram matrices (`"ghost"`), or, where that is cheaper
(many positions, small weights: early convolutions), as the norm of the
per-layer outer-product sum from the same captured tensors (`"outer"`). Other
layers, and layers called more than once in the forward pass, fall back to a
vectorised Jacobian of the per-example targets (`"vectorized"`), and say so.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import keras
import numpy as np

from gradprobe import backends
from gradprobe.backends import tensorflow_backend as backend
from gradprobe.backends import tensorflow_higher_backend as tensorflow_higher
from gradprobe.core import _patch, _validate, capture
from gradprobe.core._functional import unstack_one
from gradprobe.core.engine import (
    _Entry,
    cached_entry,
    compiled,
    gradients,
    make_plan,
    resolve_request,
)
from gradprobe.core.selectors import LayerTree, resolve
from gradprobe.core.targets import evaluate
from gradprobe.errors import GradprobeError

GHOST_TYPES = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
               keras.layers.Embedding, keras.layers.LayerNormalization,
               keras.layers.EinsumDense)


class PerExampleNorms(Mapping):
    """key -> per-example L2 norms `(batch,)` of each weight's gradient.

    Attributes:
        total: `(batch,)` norm of each example's whole gradient (all keys together).
        method: key -> `"ghost"`, `"outer"` or `"vectorized"` (see the module doc);
            on JAX and PyTorch, the per-example method of `gp.gradients`
            (`"vmap"`, `"loop"` or `"jacobian"`).
        fallbacks: key -> why the vectorised fallback was used.
        target: The per-example target values.
    """

    def __init__(self, norms: dict[str, Any], method: dict[str, str],
                 fallbacks: dict[str, str], target: Any):
        self._norms = norms
        self.method = MappingProxyType(method)
        self.fallbacks = MappingProxyType(fallbacks)
        self.target = target
        self.total = keras.ops.sqrt(sum(keras.ops.square(n) for n in norms.values()))

    def __getitem__(self, key: str) -> Any:
        return self._norms[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._norms)

    def __len__(self) -> int:
        return len(self._norms)

    def __repr__(self) -> str:
        return "PerExampleNorms({" + ", ".join(
            f"{k!r}: {self.method[k]}" for k in self._norms) + "})"


def per_example_norms(model: keras.Model, inputs: Any, target: Any, wrt: Any = "*.weights", *,
                      output: Any = None, training: bool = False,
                      method: str = "auto") -> PerExampleNorms:
    """L2 norm of each example's gradient, for each weight, without per-example
    gradients of the whole model (one forward and one backward pass for the
    supported layer types).

    Args:
        model, inputs, output, training: As in `gp.gradients`.
        target: A per-example target (class index, per-example classes,
            `"predicted"`, a loss function or a `Loss` with `reduction=None`, or a
            callable returning one value per example).
        wrt: Weight selectors (default `"*.weights"`: every trainable weight).
        method: `"auto"` (ghost or outer, whichever is cheaper, per layer),
            `"ghost"` (never materialise a per-example gradient), or
            `"vectorized"` (the Jacobian fallback for every weight; a reference).

    On JAX and PyTorch the norms are those of the per-example gradients of
    `gp.gradients(..., per_example=True)` (`jax.vmap` over single-example passes
    on JAX, a loop on PyTorch; `method="vectorized"` uses the Jacobian of the
    batched pass); the ghost-norm identities are TensorFlow's only so far.

    Returns:
        A `PerExampleNorms` mapping, with `.total`, `.method` and `.fallbacks`.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)),
    ...                           keras.layers.Dense(8, activation="relu", name="dense"),
    ...                           keras.layers.Dense(3, activation="softmax", name="dense_1")])
    >>> x, y = np.ones((5, 4), "float32"), np.array([0, 1, 2, 1, 0])
    >>> n = gp.per_example_norms(model, x, gp.loss("sparse_categorical_crossentropy", y))
    >>> np.asarray(n.total).shape     # (batch,): clip or weight examples by it (DP-SGD)
    (5,)
    >>> sorted(n)
    ['dense.bias', 'dense.kernel', 'dense_1.bias', 'dense_1.kernel']
    """
    _validate.backend_supported("gp.per_example_norms", backends.FUNCTIONAL)
    _validate.choice("method", method, ("auto", "ghost", "vectorized"))
    if backends.is_functional():
        return _functional_norms(model, inputs, target, wrt, output, training, method)
    req = resolve_request(model, inputs, target, output=output, training=training)
    x, tgt = req.x, req.target
    entry = _plan(model, wrt, tgt, output, req.training, method)
    if backend.executing_eagerly():
        if entry.fn is None:
            entry.fn = compiled(model, entry.plan, _run)
        norms, meta = entry.fn(x, tgt.args)
    else:
        norms, meta = _run(model, x, tgt.args, entry.plan)
    tgt.check(meta["target"])
    value = norms.pop("__target__")
    order = meta["order"]
    return PerExampleNorms({k: norms[k] for k in order}, meta["method"], meta["fallbacks"],
                           value)


def _functional_norms(model: Any, inputs: Any, target: Any, wrt: Any, output: Any,
                      training: bool, method: str) -> PerExampleNorms:
    """`gp.per_example_norms` on JAX and PyTorch: norms of the per-example
    gradients of the functional capture."""
    if method == "ghost":
        raise GradprobeError(
            f"Expected method='auto' or 'vectorized' on the {backends.name()} backend: the "
            "ghost-norm identities run on TensorFlow only so far (here 'auto' maps "
            "single-example passes). Received: method='ghost'")
    g = gradients(model, inputs, target, wrt, output=output, training=training,
                  unconnected="zero", differentiable=False,
                  per_example="jacobian" if method == "vectorized" else True)
    others = [k for k in g if g.kinds[k] != "weight"]
    if others or not len(g):
        raise GradprobeError(
            "gp.per_example_norms takes weight selectors ('dense.kernel', "
            "'conv*.weights', '*.weights'); for activations and inputs the gradients are "
            f"already per example (use gp.gradient_penalty for their norms). Received: "
            f"wrt={wrt!r}")
    norms = {k: _row_norms(g[k]) for k in g}
    return PerExampleNorms(norms, dict(g.per_example_method), dict(g.per_example_fallbacks),
                           g.target)


def _plan(model, wrt, tgt, output, training, method) -> _Entry:
    def build() -> capture.Plan:
        tree = LayerTree(model)
        plan = make_plan(model, tree, resolve(tree, wrt), tgt, output, training, "zero")
        if plan.acts or plan.inputs or not plan.vars:
            raise GradprobeError(
                "gp.per_example_norms takes weight selectors ('dense.kernel', "
                "'conv*.weights', '*.weights'); for activations and inputs the gradients are "
                "already per example (use gp.gradient_penalty for their norms).")
        plan.per_example = True
        plan.norm_method = method
        return plan

    return cached_entry(model, wrt, ("per_example_norms", tgt.cache_key, output, training,
                                     method), build)


def _run(model: Any, x: Any, args: dict, plan: capture.Plan) -> tuple[dict, dict]:
    method = plan.norm_method
    owners = {}
    for v in plan.vars:
        if method != "vectorized" and isinstance(v.owner, GHOST_TYPES):
            owners[id(v.owner)] = v.owner
    tape = backend.new_tape(persistent=True)
    ids = set(owners)
    recorder = capture.Recorder(tape, ids | ({id(plan.output_layer)} if plan.output_layer
                                             else set()), frozenset(ids))
    layers = list(owners.values()) + ([plan.output_layer] if plan.output_layer else [])

    def call(model: Any, x: Any, training: bool) -> Any:
        with _patch.wrapped_calls(layers, recorder.hook), keras.StatelessScope():
            return model(x, training=training)

    def layer_value() -> Any:
        calls = recorder.calls_of(plan.output_layer)
        return calls[0].leaves[0][0] if calls else None

    try:  # closed on every exit: see capture.run
        with tape:
            for v in plan.vars:
                backend.watch(tape, v.var)
            _, _, value, objective, target_meta = evaluate(
                model, x, plan.target, args, output=plan.output, training=plan.training,
                call=call, layer_value=None if plan.output_layer is None else layer_value,
                names=plan.output_names)
    finally:
        recorder.close()
    value = capture.per_example_values(value, "gp.per_example_norms")

    ghost: dict[int, Any] = {}
    shared: dict[int, str] = {}
    batch = value.shape[0]
    for lid, layer in owners.items():
        calls = recorder.calls_of(layer)
        if len(calls) == 1 and calls[0].leaves[0][1] is not None:
            rows = calls[0].leaves[0][0].shape[0]
            if rows is not None and batch is not None and rows != batch:
                # e.g. a position embedding over arange(n)[None], broadcast over the batch:
                # its output is shared by all examples, so no per-example identity applies.
                shared[lid] = (f"layer {layer.name!r} runs on {rows} row(s) shared by the "
                               f"batch of {batch} (a broadcast input), so its output is not "
                               "per example")
                continue
            ghost[lid] = calls[0]
    probes = [ghost[lid].leaves[0][1] for lid in ghost]
    out_grads = dict(zip(ghost, backend.gradient(tape, objective, probes)))

    norms: dict[str, Any] = {"__target__": value}
    methods: dict[str, str] = {}
    fallbacks: dict[str, str] = {}
    for lid, call in ghost.items():
        layer = owners[lid]
        dy = out_grads[lid]
        a = recorder.inputs_of[(lid, 0)]
        if dy is None:
            dy = keras.ops.zeros_like(call.leaves[0][0])
        by_var, why = _ghost_squares(layer, a, call.leaves[0][0], dy, method)
        for v in plan.vars:
            if v.owner is layer and id(v.var) in by_var:
                norms[v.key] = keras.ops.sqrt(keras.ops.maximum(by_var[id(v.var)][0], 0.0))
                methods[v.key] = by_var[id(v.var)][1]
        if why:
            for v in plan.vars:
                if v.owner is layer and v.key not in norms:
                    fallbacks[v.key] = why
    for v in plan.vars:
        if v.key in norms:
            continue
        if v.key not in fallbacks:
            fallbacks[v.key] = shared.get(id(v.owner)) or _why_not(v.owner, owners, recorder,
                                                                    method)
        norms[v.key] = _row_norms(backend.jacobian(tape, value, v.var))
        methods[v.key] = "vectorized"
    order = [v.key for v in plan.vars]
    return norms, {"order": order, "method": methods, "fallbacks": fallbacks,
                   "target": target_meta}


def _row_norms(x: Any) -> Any:
    """The L2 norm of each row of `x` (over every axis but the first)."""
    ops = keras.ops
    return ops.sqrt(ops.sum(ops.square(ops.reshape(x, (ops.shape(x)[0], -1))), axis=1))


def _why_not(owner: Any, owners: dict, recorder: Any, method: str) -> str:
    if method == "vectorized":
        return "method='vectorized' was requested"
    if owner is None:
        return ("the variable is the model's own (no layer owns it), so no ghost-norm "
                "identity applies")
    if id(owner) not in owners:
        return (f"{type(owner).__name__} has no ghost-norm identity here (supported: "
                + ", ".join(t.__name__ for t in GHOST_TYPES) + ")")
    n = len(recorder.calls_of(owner))
    if n != 1:
        return f"layer {owner.name!r} is called {n} times in the forward pass"
    return "its layer configuration is not covered by the ghost identity"


# --------------------------------------------------------------- identities
def _ghost_squares(layer: Any, a: Any, y: Any, dy: Any, method: str) -> tuple[dict, str]:
    """{id(variable): (squared per-example norm, method)} and, if some variables
    of the layer are not covered, the reason."""
    if isinstance(layer, keras.layers.Embedding):
        return {id(layer.embeddings): (tensorflow_higher.embedding_squares(a, dy), "ghost")}, ""
    if isinstance(layer, keras.layers.LayerNormalization):
        return _layer_norm(layer, a, dy)
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return {}, "LoRA or quantized layers are not covered by the ghost identity"
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)) and (
            layer.data_format != "channels_last" or layer.groups != 1
            or layer.padding == "causal"):
        return {}, ("convolutions with channels_first, groups > 1 or causal padding are "
                    "not covered by the ghost identity")
    if isinstance(layer, keras.layers.EinsumDense) and not _einsum_dense_supported(layer):
        return {}, f"EinsumDense equation {layer.equation!r} is not of the form '...k,ko->...o'"
    bias = getattr(layer, "bias", None)
    ops = keras.ops
    dz = _through_activation(layer, a, y, dy)
    b = ops.shape(dz)[0]
    out_dim = dz.shape[-1]
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)):
        A = tensorflow_higher.conv_patches(layer, a)
    else:
        A = ops.reshape(a, (b, -1, a.shape[-1]))
    G = ops.reshape(dz, (b, -1, out_dim))
    sq_kernel, how = _outer_squares(A, G, method)
    result = {id(layer.kernel): (sq_kernel, how)}
    why = ""
    if bias is not None:
        if len(bias.shape) == 1 and bias.shape[0] == out_dim:
            result[id(bias)] = (ops.sum(ops.square(ops.sum(G, axis=1)), axis=1), "ghost")
        else:
            why = "this bias layout is not covered by the ghost identity"
    return result, why


def _through_activation(layer: Any, a: Any, y: Any, dy: Any) -> Any:
    """The gradient at the layer's pre-activation `z`, from its output gradient.

    For the common element-wise activations the derivative follows exactly from
    the output `y`; otherwise `z` is recomputed from the input and the layer's
    activation differentiated at it.
    """
    activation = getattr(layer, "activation", None)
    if activation is None or activation is keras.activations.linear:
        return dy
    if activation is keras.activations.relu:
        return dy * keras.ops.cast(y > 0, dy.dtype)
    if activation is keras.activations.tanh:
        return dy * (1.0 - keras.ops.square(y))
    if activation is keras.activations.sigmoid:
        return dy * y * (1.0 - y)
    return tensorflow_higher.pre_activation_gradient(layer, a, dy)


def _outer_squares(A: Any, G: Any, method: str) -> tuple[Any, str]:
    """Squared Frobenius norm of sum_t A[:, t]^T G[:, t], per example, and the
    method: from the Gram matrices over positions (`"ghost"`) or from the
    per-example sum itself (`"outer"`), whichever is cheaper."""
    t, d, e = A.shape[1], A.shape[2], G.shape[2]
    if t == 1:
        ops = keras.ops
        return ops.sum(ops.square(A[:, 0]), 1) * ops.sum(ops.square(G[:, 0]), 1), "ghost"
    if method == "ghost" or t is None or t * t * (d + e) <= t * d * e:
        return tensorflow_higher.gram_squares(A, G), "ghost"
    return tensorflow_higher.outer_squares(A, G), "outer"


def _einsum_dense_supported(layer: Any) -> bool:
    """True for equations like 'ab,bc->ac' or 'abc,cd->abd': a dense map of the last axis."""
    m = re.fullmatch(r"\.{0,3}(\w*),(\w)(\w)->\.{0,3}(\w*)", layer.equation.replace(" ", ""))
    if not m:
        return False
    lhs, k, o, out = m.groups()
    return lhs.endswith(k) and out.endswith(o) and lhs[:-1] == out[:-1]


def _layer_norm(layer: Any, x: Any, dy: Any) -> tuple[dict, str]:
    rank = len(x.shape)
    axes = sorted(a % rank for a in (layer.axis if isinstance(layer.axis, (list, tuple))
                                     else [layer.axis]))
    if axes != [rank - 1] or getattr(layer, "rms_scaling", False):
        return {}, "LayerNormalization over axes other than the last, or with rms_scaling"
    return {k: (sq, "ghost") for k, sq in
            tensorflow_higher.layer_norm_squares(layer, x, dy).items()}, ""


# --------------------------------------------------- per-example gradients
METHODS = ("vectorized_map", "jacobian")


def check_method(per_example: Any) -> bool | str:
    """The validated `per_example` argument of `gp.gradients`: `False`, `True`
    (the fastest correct method) or one of `METHODS` (that method, as a reference)."""
    if isinstance(per_example, (bool, np.bool_)):
        return bool(per_example)
    return _validate.choice("per_example", per_example, METHODS,
                            "or True (the fastest correct method) or False")


def annotate(result: Any, meta: dict) -> Any:
    """Sets `per_example_method` (key -> method, for the weight keys of a
    `per_example` request; empty otherwise) and `per_example_fallbacks` (key ->
    why the Jacobian was used) on a `Gradients` result."""
    result.per_example_method = MappingProxyType(dict(meta.get("per_example_method", {})))
    result.per_example_fallbacks = MappingProxyType(dict(meta.get("per_example_fallbacks", {})))
    return result


def run(model: Any, inputs: Any, args: dict, plan: capture.Plan,
        wrap_errors: bool = True) -> tuple[dict, dict]:
    """`capture.run` for a plan with `per_example` set: the same `(tensors, meta)`,
    with weight gradients shaped `(batch, *variable_shape)` and
    `meta["per_example_method"]` / `meta["per_example_fallbacks"]` per weight key.
    """
    requested = plan.per_example if isinstance(plan.per_example, str) else "auto"
    single = dataclasses.replace(plan, per_example=False)
    if not plan.vars:  # activations and inputs only: per example by nature
        tensors, meta = capture.run(model, inputs, args, single, wrap_errors)
        capture.per_example_values(tensors["target"], "per_example=True")
        return tensors, dict(meta, per_example_method={}, per_example_fallbacks={})

    why = forced_fallback(model, plan, requested)
    if requested == "vectorized_map":
        crash = vectorized_map_crashes(model)
        if crash:
            raise GradprobeError(
                f"per_example='vectorized_map': {crash}. Received: "
                "per_example='vectorized_map'. Use per_example=True (the Jacobian of the "
                "batched pass, exact) or set TF_ENABLE_ONEDNN_OPTS=0.")
    if not why:
        try:
            return _vectorized(model, inputs, args, single, wrap_errors)
        except GradprobeError:
            raise
        except Exception as e:  # an op tf.vectorized_map cannot convert, or a model
            if requested == "vectorized_map":  # that cannot run on one example
                raise GradprobeError(
                    "per_example='vectorized_map': tf.vectorized_map could not vectorise "
                    f"the single-example pass ({type(e).__name__}: {_reason(e)}). Use "
                    "per_example=True to fall back to the Jacobian.") from e
            why = (f"tf.vectorized_map could not vectorise the single-example pass "
                   f"({type(e).__name__}: {_reason(e)})")
    return _jacobian(model, inputs, args, single, wrap_errors, why)


def forced_fallback(model: Any, plan: capture.Plan, requested: str) -> str:
    """Why the per-example weight gradients must come from the Jacobian of the
    batched pass without trying the single-example method, or '' when that
    method is to be tried, on every backend: `per_example='jacobian'` was
    requested, or `requested` is `"auto"` (`per_example=True`) and examples
    interact in the forward pass (`_coupling`). A single-example method named
    explicitly (`'vectorized_map'`, `'vmap'`, `'loop'`) is tried even then."""
    if requested == "jacobian":
        return "per_example='jacobian' was requested"
    if requested != "auto":
        return ""
    if backends.is_functional():
        return _coupling(model, plan, "the single-example passes would draw once for all "
                                      "examples (one seed state)")
    return _coupling(model, plan) or vectorized_map_crashes(model)


def vectorized_map_crashes(model: Any) -> str:
    """Why `tf.vectorized_map` over `model` would crash the process ('' if no known
    reason). With oneDNN on (TensorFlow's default on x86-64 Linux), the vectorised
    Einsum of an `EinsumDense` layer (also inside `MultiHeadAttention` and
    keras-hub's transformer layers) corrupts the heap: the process aborts or
    segfaults, at random, a little later (TensorFlow 2.21: a tiny keras-hub
    `BertBackbone`, a `MultiHeadAttention`, an `EinsumDense` without bias; with
    TF_ENABLE_ONEDNN_OPTS=0 every run passes). No Python error can be caught, so
    the case is recognised before the pass runs."""
    if not tensorflow_higher.onednn_enabled():
        return ""
    for node in LayerTree(model).nodes:
        if isinstance(node.layer, keras.layers.EinsumDense):
            return (f"tf.vectorized_map over EinsumDense layer {node.path!r} crashes the "
                    "process when TensorFlow's oneDNN kernels are on (with "
                    "TF_ENABLE_ONEDNN_OPTS=0 set before TensorFlow is imported, "
                    "per_example=True uses it)")
    return ""


def _coupling(model: Any, plan: capture.Plan,
              mapped: str = "tf.vectorized_map would draw once for all examples") -> str:
    """Why examples interact in this forward pass ('' when they do not);
    `mapped` says what the single-example method would do with random noise."""
    if not plan.training:
        return ""
    for node in LayerTree(model).nodes:
        if isinstance(node.layer, keras.layers.BatchNormalization):
            return (f"training=True: BatchNormalization layer {node.path!r} normalises with "
                    "batch statistics, so examples interact and only the Jacobian of the "
                    "batched pass is exact")
        if isinstance(node.layer, RANDOM_TYPES):
            return (f"training=True: {type(node.layer).__name__} layer {node.path!r} draws "
                    f"random noise, which {mapped}; "
                    "the Jacobian of the batched pass keeps one draw per example")
    return ""


RANDOM_TYPES = (keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
                keras.layers.SpatialDropout3D, keras.layers.GaussianDropout,
                keras.layers.GaussianNoise, keras.layers.AlphaDropout)


def _reason(e: BaseException) -> str:
    """The informative line of a (possibly long) TensorFlow error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "pfor" in line or "vectoriz" in line:
            return line[:300]
    return lines[-1][:300] if lines else ""


def _vectorized(model: Any, x: Any, args: dict, plan: capture.Plan,
                wrap_errors: bool) -> tuple[dict, dict]:
    """`tf.vectorized_map` over examples of one capture pass on a batch of one."""
    tensors = meta = None
    if plan.acts or plan.inputs:
        # Activation and input gradients (and their keys, order, values) come from
        # one batched pass, as with per_example=False; only weights are mapped.
        tensors, meta = capture.run(model, x, args, plan, wrap_errors)
        capture.per_example_values(tensors["target"], "per_example=True")
        plan = dataclasses.replace(plan, acts=[], inputs=[])
    mapped = {k: v for k, v in args.items() if getattr(v, "shape", None) is not None
              and len(v.shape)}
    fixed = {k: v for k, v in args.items() if k not in mapped}
    box: dict[str, Any] = {}

    def one(elems: tuple) -> dict:
        xi, ai = elems
        xi = keras.tree.map_structure(lambda t: t[None], xi)
        ai = dict({k: v[None] for k, v in ai.items()}, **fixed)
        out, m = capture.run(model, xi, ai, plan, wrap_errors=False)
        capture.per_example_values(out["target"], "per_example=True")
        box["meta"] = m
        weights = {k: g for k, g in out["grads"].items() if m["kinds"][k] == "weight"}
        return {"grads": weights, "outputs": out["outputs"], "target": out["target"]}

    stacked = tensorflow_higher.vectorized_map(one, (x, mapped))
    m = box["meta"]
    if tensors is None:
        tensors = {"grads": stacked["grads"], "values": {},
                   "outputs": keras.tree.map_structure(unstack_one, stacked["outputs"]),
                   "target": keras.ops.reshape(stacked["target"], (-1,))}
        meta = m
    else:
        tensors["grads"] = dict(tensors["grads"], **stacked["grads"])
    weights = [k for k in meta["order"] if meta["kinds"][k] == "weight"]
    return tensors, dict(meta, per_example_method=dict.fromkeys(weights, "vectorized_map"),
                         per_example_fallbacks={})


def _jacobian(model: Any, x: Any, args: dict, plan: capture.Plan, wrap_errors: bool,
              why: str) -> tuple[dict, dict]:
    """One batched pass under a persistent tape, then the Jacobian of the
    per-example target values with respect to each weight."""
    tape = backend.new_tape(persistent=True)
    with tape:
        for v in plan.vars:
            backend.watch(tape, v.var)
        tensors, meta = capture.run(model, x, args, plan, wrap_errors)
    value = capture.per_example_values(tensors["target"], "per_example=True")
    grads = dict(tensors["grads"])
    for v in plan.vars:
        if v.key in grads:
            grads[v.key] = backend.jacobian(tape, value, v.var)
    tensors = dict(tensors, grads=grads)
    weights = [k for k in meta["order"] if meta["kinds"][k] == "weight"]
    return tensors, dict(meta, per_example_method=dict.fromkeys(weights, "jacobian"),
                         per_example_fallbacks=dict.fromkeys(weights, why))


__all__ = ["PerExampleNorms", "per_example_norms"]
