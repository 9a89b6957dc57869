"""`gp.hvp`: Hessian-vector products of a target."""

from __future__ import annotations

from typing import Any

import keras

from gradprobe import backends
from gradprobe.core import _functional_form, _validate
from gradprobe.core.engine import gradients, resolve_request
from gradprobe.core.tape import Tape
from gradprobe.core.targets import evaluate
from gradprobe.errors import GradprobeError, quoted


def hvp(model: keras.Model, inputs: Any, target: Any, wrt: Any, vector: Any, *,
        output: Any = None, training: bool = False) -> dict[str, Any]:
    """Hessian-vector products `H v` of a scalar target.

    On TensorFlow: with respect to weights, forward-over-backward
    (`tf.autodiff.ForwardAccumulator` around one backward pass); with respect to
    activations or inputs, double backward through two nested `gp.Tape`s. On
    JAX: forward over reverse (`jax.jvp` of `jax.grad` of the forward pass of
    `gp.functional`); on PyTorch: double backward (`torch.autograd.grad` with
    `create_graph=True`, then again). On JAX and PyTorch, weights and
    activations/inputs can be mixed in one call (the product with the joint
    Hessian).

    Args:
        model, inputs, target, output, training: As in `gp.gradients`.
        wrt: Selectors as in `gp.gradients`; all weights, or all activations/inputs.
        vector: The `v` of `H v`: one tensor when `wrt` names one source, else a
            dict from key (as `gp.gradients` would key it) or a list in that order.

    Returns:
        A dict from key to `H v`, each shaped like its source.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)),
    ...                           keras.layers.Dense(6, activation="tanh", name="dense"),
    ...                           keras.layers.Dense(2, name="dense_1")])
    >>> x, y = np.ones((3, 4), "float32"), np.zeros((3, 2), "float32")
    >>> v = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")  # like the kernel
    >>> hv = gp.hvp(model, x, gp.loss("mse", y), "dense.kernel", v)["dense.kernel"]
    >>> tuple(hv.shape)
    (4, 6)
    """
    _validate.backend_supported("gp.hvp", backends.FUNCTIONAL)
    _validate.model(model)
    if backends.is_functional():
        return _functional_hvp(model, inputs, target, wrt, vector, output, training)
    g = gradients(model, inputs, target, wrt, output=output, training=training,
                  unconnected="zero", compile=False, differentiable=False)
    keys = list(g)
    vectors = [_validate.like("vector", v, g[k], f"the gradient of {k!r}")
               for k, v in zip(keys, _vectors(keys, vector))]
    kinds = {g.kinds[k] for k in keys}
    if kinds == {"weight"}:
        variables = [g.variables[k] for k in keys]

        def inner() -> list[Any]:
            found = gradients(model, inputs, target, variables, output=output,
                              training=training, unconnected="zero", compile=False)
            return [found[k] for k in keys]

        return dict(zip(keys, backends.get().forward_over_backward(variables, vectors,
                                                                      inner)))
    if "weight" in kinds:
        raise GradprobeError(
            f"gp.hvp takes weights or activations/inputs, not a mix; got {quoted(keys)}. "
            "Call it once for each.")
    return _double_backward(model, inputs, target, wrt, keys, vectors, output, training)


def _functional_hvp(model: Any, inputs: Any, target: Any, wrt: Any, vector: Any, output: Any,
                    training: bool) -> dict[str, Any]:
    """`gp.hvp` on JAX and PyTorch: the backend's Hessian-vector product of the
    objective of `gp.functional`'s forward pass, at zero probes and the current
    weights."""
    form = _functional_form.build(model, inputs, target, wrt, output=output, training=training,
                                  unconnected="zero", live=False, what="gp.hvp")
    keys = form.keys
    primal = _functional_form.split(form)
    refs = dict(primal["probes"], **primal["vars"])
    vectors = [_functional_form.like("vector", v, refs[k], f"the gradient of {k!r}")
               for k, v in zip(keys, _vectors(keys, vector))]
    tangent = {"probes": {}, "vars": {}}
    for k, v in zip(keys, vectors):
        tangent["vars" if form.kinds[k] == "weight" else "probes"][k] = v

    bk = backends.get()

    def make(request: Any, prep: Any) -> Any:
        objective = _functional_form.objective_fn(request, prep)

        def products(primal: dict, tangent: dict, trainable: list, non_trainable: list,
                     x: Any, args: dict) -> dict:
            return bk.hvp(lambda d, *rest: objective(d, *rest)[0], primal, tangent,
                          trainable, non_trainable, x, args)

        return bk.jit(products)  # jax.jit on JAX (cached per request and signature)

    products = form.cached("hvp", make)(primal, tangent, *form.values(), form.inputs,
                                        form._args)
    return {k: products["vars" if form.kinds[k] == "weight" else "probes"][k] for k in keys}


def _vectors(keys: list[str], vector: Any) -> list[Any]:
    # Values are converted (and checked against each source) by `_validate.like`.
    if isinstance(vector, dict):
        missing = [k for k in keys if k not in vector]
        if missing:
            raise GradprobeError(
                f"Expected `vector` to have an entry for every source; it has none for "
                f"{quoted(missing)} (keys: {quoted(keys)}). Received: vector={quoted(vector)}")
        return [vector[k] for k in keys]
    if isinstance(vector, (list, tuple)) and not (len(keys) == 1 and len(vector) != 1):
        if len(vector) != len(keys):
            raise GradprobeError(
                f"Expected `vector` to have one entry per source ({len(keys)}: {quoted(keys)}); "
                f"it has {len(vector)}. Received: vector=<{type(vector).__name__} of "
                f"{len(vector)}>")
        return list(vector)
    if len(keys) != 1:
        raise GradprobeError(
            f"Expected `vector` to be a dict or a list in the order of the sources: `wrt` "
            f"names {len(keys)} ({quoted(keys)}). Received: vector={_validate.shown(vector)}")
    return [vector]


def _double_backward(model, inputs, target, wrt, keys, vectors, output, training):
    req = resolve_request(model, inputs, target, output=output, training=training)
    with Tape(model, watch=wrt, persistent=True) as outer:
        with Tape(model, watch=wrt) as inner:
            objective = evaluate(model, req.x, req.target, output=output,
                                 training=req.training).objective
        grads = inner.gradient(objective, keys, unconnected="zero")
        dot = backends.get().vector_dot(grads, vectors)
    result = outer.gradient(dot, keys, unconnected="zero")
    return dict(zip(keys, result))
