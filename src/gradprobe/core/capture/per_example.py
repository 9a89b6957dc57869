"""Per-example weight gradients (`gp.gradients(..., per_example=...)`): which
method is correct for a request (shared by every backend: `check_method`,
`forced_fallback`), and TensorFlow's two methods (`run`):

* `"vectorized_map"` (the default): `tf.vectorized_map` over the examples of
  one ordinary single-example capture pass (`tape.run` on a batch of one: the
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
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np

from gradprobe import backends
from gradprobe.core import _validate
from gradprobe.core.capture import tape
from gradprobe.core.capture.assembly import per_example_values
from gradprobe.core.plan import Plan
from gradprobe.core.selectors import LayerTree
from gradprobe.errors import GradprobeError

METHODS = ("vectorized_map", "jacobian")


def check_method(per_example: Any) -> bool | str:
    """The validated `per_example` argument of `gp.gradients`: `False`, `True` (the
    fastest correct method), the backend's single-example method
    (`"vectorized_map"` on TensorFlow, `"vmap"` on JAX, `"loop"` on PyTorch) or
    `"jacobian"` (that method, as a reference). `"vectorized_map"` means the
    single-example method on every backend, so that code runs on each."""
    if isinstance(per_example, (bool, np.bool_)):
        return bool(per_example)
    if not backends.is_functional():
        return _validate.choice("per_example", per_example, METHODS,
                                "or True (the fastest correct method) or False")
    bk = backends.get()
    single = bk.PER_EXAMPLE_METHOD
    method = _validate.choice("per_example", per_example, (single, "jacobian", "vectorized_map"),
                              "or True (the fastest correct method) or False")
    return single if method == "vectorized_map" else method


def run(model: Any, inputs: Any, args: dict, plan: Plan,
        wrap_errors: bool = True) -> tuple[dict, dict]:
    """`tape.run` for a plan with `per_example` set: the same `(tensors, meta)`,
    with weight gradients shaped `(batch, *variable_shape)` and
    `meta["per_example_method"]` / `meta["per_example_fallbacks"]` per weight key.
    """
    requested = plan.per_example if isinstance(plan.per_example, str) else "auto"
    single = dataclasses.replace(plan, per_example=False)
    if not plan.vars:  # activations and inputs only: per example by nature
        tensors, meta = tape.run(model, inputs, args, single, wrap_errors)
        per_example_values(tensors["target"], "per_example=True")
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


def forced_fallback(model: Any, plan: Plan, requested: str) -> str:
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
        return coupling(model, plan, "the single-example passes would draw once for all "
                                      "examples (one seed state)")
    return coupling(model, plan) or vectorized_map_crashes(model)


def vectorized_map_crashes(model: Any) -> str:
    """Why `tf.vectorized_map` over `model` would crash the process ('' if no known
    reason). With oneDNN on (TensorFlow's default on x86-64 Linux), the vectorised
    Einsum of an `EinsumDense` layer (also inside `MultiHeadAttention` and
    keras-hub's transformer layers) corrupts the heap: the process aborts or
    segfaults, at random, a little later (TensorFlow 2.21: a tiny keras-hub
    `BertBackbone`, a `MultiHeadAttention`, an `EinsumDense` without bias; with
    TF_ENABLE_ONEDNN_OPTS=0 every run passes). No Python error can be caught, so
    the case is recognised before the pass runs."""
    if not backends.get().onednn_enabled():
        return ""
    for node in LayerTree(model).nodes:
        if isinstance(node.layer, keras.layers.EinsumDense):
            return (f"tf.vectorized_map over EinsumDense layer {node.path!r} crashes the "
                    "process when TensorFlow's oneDNN kernels are on (with "
                    "TF_ENABLE_ONEDNN_OPTS=0 set before TensorFlow is imported, "
                    "per_example=True uses it)")
    return ""


def coupling(model: Any, plan: Plan,
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


def _vectorized(model: Any, x: Any, args: dict, plan: Plan,
                wrap_errors: bool) -> tuple[dict, dict]:
    """`tf.vectorized_map` over examples of one capture pass on a batch of one."""
    tensors = meta = None
    if plan.acts or plan.inputs:
        # Activation and input gradients (and their keys, order, values) come from
        # one batched pass, as with per_example=False; only weights are mapped.
        tensors, meta = tape.run(model, x, args, plan, wrap_errors)
        per_example_values(tensors["target"], "per_example=True")
        plan = dataclasses.replace(plan, acts=[], inputs=[])
    mapped = {k: v for k, v in args.items() if getattr(v, "shape", None) is not None
              and len(v.shape)}
    fixed = {k: v for k, v in args.items() if k not in mapped}
    box: dict[str, Any] = {}

    def one(elems: tuple) -> dict:
        xi, ai = elems
        xi = keras.tree.map_structure(lambda t: t[None], xi)
        ai = dict({k: v[None] for k, v in ai.items()}, **fixed)
        out, m = tape.run(model, xi, ai, plan, wrap_errors=False)
        per_example_values(out["target"], "per_example=True")
        box["meta"] = m
        weights = {k: g for k, g in out["grads"].items() if m["kinds"][k] == "weight"}
        return {"grads": weights, "outputs": out["outputs"], "target": out["target"]}

    stacked = backends.get().vectorized_map(one, (x, mapped))
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


def _jacobian(model: Any, x: Any, args: dict, plan: Plan, wrap_errors: bool,
              why: str) -> tuple[dict, dict]:
    """One batched pass under a persistent tape, then the Jacobian of the
    per-example target values with respect to each weight."""
    gradient_tape = backends.get().new_tape(persistent=True)
    with gradient_tape:
        for v in plan.vars:
            backends.get().watch(gradient_tape, v.var)
        tensors, meta = tape.run(model, x, args, plan, wrap_errors)
    value = per_example_values(tensors["target"], "per_example=True")
    grads = dict(tensors["grads"])
    for v in plan.vars:
        if v.key in grads:
            grads[v.key] = backends.get().jacobian(gradient_tape, value, v.var)
    tensors = dict(tensors, grads=grads)
    weights = [k for k in meta["order"] if meta["kinds"][k] == "weight"]
    return tensors, dict(meta, per_example_method=dict.fromkeys(weights, "jacobian"),
                         per_example_fallbacks=dict.fromkeys(weights, why))


def unstack_one(t: Any) -> Any:
    """`(batch, 1, ...)` -> `(batch, ...)`: a mapped single-example output."""
    shape = tuple(t.shape)
    if len(shape) > 1 and shape[1] == 1:
        return keras.ops.reshape(t, (shape[0], *shape[2:]))
    return t
