"""`gp.per_example_norms`: the L2 norm of each example's gradient, per weight.

(The per-example gradients themselves, `gp.gradients(..., per_example=True)`,
are a capture feature: `gradprobe.core.capture.per_example`.)

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

import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import keras

from gradprobe import backends
from gradprobe.core import _patch, _validate
from gradprobe.core.cache import CacheEntry, cached_entry
from gradprobe.core.capture.assembly import per_example_values
from gradprobe.core.capture.recorder import TapeRecorder
from gradprobe.core.capture.tape import compiled
from gradprobe.core.engine import gradients, resolve_request
from gradprobe.core.plan import Plan, make_plan
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
    if backends.get().executing_eagerly():
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


def _plan(model, wrt, tgt, output, training, method) -> CacheEntry:
    def build() -> Plan:
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


def _run(model: Any, x: Any, args: dict, plan: Plan) -> tuple[dict, dict]:
    method = plan.norm_method
    owners = {}
    for v in plan.vars:
        if method != "vectorized" and isinstance(v.owner, GHOST_TYPES):
            owners[id(v.owner)] = v.owner
    tape = backends.get().new_tape(persistent=True)
    ids = set(owners)
    recorder = TapeRecorder(tape, ids | ({id(plan.output_layer)} if plan.output_layer
                                             else set()), frozenset(ids))
    layers = list(owners.values()) + ([plan.output_layer] if plan.output_layer else [])

    def call(model: Any, x: Any, training: bool) -> Any:
        with _patch.wrapped_calls(layers, recorder.hook), keras.StatelessScope():
            return model(x, training=training)

    def layer_value() -> Any:
        calls = recorder.calls_of(plan.output_layer)
        return calls[0].leaves[0][0] if calls else None

    try:  # closed on every exit: see capture.tape.run
        with tape:
            for v in plan.vars:
                backends.get().watch(tape, v.var)
            _, _, value, objective, target_meta = evaluate(
                model, x, plan.target, args, output=plan.output, training=plan.training,
                call=call, layer_value=None if plan.output_layer is None else layer_value,
                names=plan.output_names)
    finally:
        recorder.close()
    value = per_example_values(value, "gp.per_example_norms")

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
    out_grads = dict(zip(ghost, backends.get().gradient(tape, objective, probes)))

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
        norms[v.key] = _row_norms(backends.get().jacobian(tape, value, v.var))
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
        return {id(layer.embeddings): (backends.get().embedding_squares(a, dy), "ghost")}, ""
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
        A = backends.get().conv_patches(layer, a)
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
    return backends.get().pre_activation_gradient(layer, a, dy)


def _outer_squares(A: Any, G: Any, method: str) -> tuple[Any, str]:
    """Squared Frobenius norm of sum_t A[:, t]^T G[:, t], per example, and the
    method: from the Gram matrices over positions (`"ghost"`) or from the
    per-example sum itself (`"outer"`), whichever is cheaper."""
    t, d, e = A.shape[1], A.shape[2], G.shape[2]
    if t == 1:
        ops = keras.ops
        return ops.sum(ops.square(A[:, 0]), 1) * ops.sum(ops.square(G[:, 0]), 1), "ghost"
    if method == "ghost" or t is None or t * t * (d + e) <= t * d * e:
        return backends.get().gram_squares(A, G), "ghost"
    return backends.get().outer_squares(A, G), "outer"


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
            backends.get().layer_norm_squares(layer, x, dy).items()}, ""


__all__ = ["PerExampleNorms", "per_example_norms"]
