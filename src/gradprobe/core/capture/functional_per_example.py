"""Per-example weight gradients in the functional strategy (JAX, PyTorch): the
compiled step of a request replaced by one whose weight gradients are per
example (single-example passes mapped over the batch, or the Jacobian of the
batched pass where examples interact)."""

from __future__ import annotations

from typing import Any

import keras

from gradprobe.core.capture.functional_steps import unsharded, value_and_grad
from gradprobe.core.capture.per_example import forced_fallback, unstack_one
from gradprobe.core.capture.recorder import FunctionalRecorder
from gradprobe.errors import GradprobeError


def per_example_step(request: Any, bk: Any, model: Any, prep: Any, probe_ids: set[int],
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
    plan = request.plan
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
        recorder = FunctionalRecorder(bk, probe_ids, {}, {})
        return request.forward(prep, {"probes": {}, "vars": diff}, trainable, non_trainable,
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

    single_grad = value_and_grad(bk, prep.loss_scaled)(forward_plain)

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
        grads, outputs, target = unsharded(bk, mapped_one(
            trainable, non_trainable, *unsharded(bk, (x, mapped)), fixed))
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

    why = forced_fallback(model, plan, requested)
    if not why and single == "vmap":
        try:  # traced on abstract values: nothing is computed
            bk.eval_shape(vmap_step, *abstract_args)
        except Exception as e:
            # The batched pass traced: what fails here is the mapping (a model
            # call error comes wrapped by `call_errors.call_error`: report its cause).
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
