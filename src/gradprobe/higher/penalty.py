"""`gp.gradient_penalty`: per-example gradient norms, ready to add to a loss."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from gradprobe import backends
from gradprobe.core import _functional_form, _validate
from gradprobe.core.engine import gradients
from gradprobe.errors import GradprobeError


def gradient_penalty(model: keras.Model, inputs: Any, target: Any, wrt: Any = "inputs", *,
                     norm: float | str = 2, output: Any = None,
                     training: bool = False) -> Any:
    """Per-example norms of the gradient of `target` with respect to `wrt`.

    The norm of each example's gradient, taken over every non-batch axis of every
    source together. The result is differentiable (with respect to the model's
    weights, under your tape), as a gradient penalty needs: for WGAN-GP,
    `lam * tf.reduce_mean((gp.gradient_penalty(critic, x_hat, lambda y: y[:, 0]) - 1) ** 2)`.

    On PyTorch the result is in the autograd graph (the input gradient is taken
    with `create_graph=True`), so `loss.backward()` reaches the weights through
    it. On JAX it is differentiable with respect to the weights when your loss
    supplies them as arguments: inside the function you give to `jax.grad`,
    call it under `keras.StatelessScope(state_mapping=zip(model.trainable_variables,
    weights))` (the Example below), or write the penalty with `gp.functional`.

    Args:
        model, inputs, target, output, training: As in `gp.gradients`.
        wrt: Activation or input selectors (default `"inputs"`): per-example sources.
        norm: `2` (default), `1`, or `"inf"`.

    Returns:
        A tensor of shape `(batch,)`.

    Example (JAX):

    >>> import jax
    >>> import jax.numpy as jnp
    >>> critic = keras.Sequential([keras.Input((4,)),
    ...                            keras.layers.Dense(8, activation="tanh"),
    ...                            keras.layers.Dense(1)])
    >>> x_hat = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    >>> # the weights as the argument of the differentiated loss
    >>> def loss_fn(weights):
    ...     with keras.StatelessScope(state_mapping=list(zip(critic.trainable_variables,
    ...                                                      weights))):
    ...         norms = gp.gradient_penalty(critic, x_hat, lambda y: y[:, 0])
    ...     return 10.0 * jnp.mean((norms - 1.0) ** 2)
    >>> grads = jax.grad(loss_fn)([v.value for v in critic.trainable_variables])
    >>> [tuple(g.shape) for g in grads]
    [(4, 8), (8,), (8, 1), (1,)]
    """
    _validate.backend_supported("gp.gradient_penalty", backends.FUNCTIONAL)
    _validate.model(model)
    if isinstance(norm, (bool, np.bool_)) or norm not in (1, 2, "inf", float("inf")):
        raise _validate.fail("norm", norm, "1, 2 (default) or 'inf', the norm taken over each "
                                           "example's gradient.")
    if not backends.get().DIFFERENTIABLE_GRADIENTS:  # (PyTorch)
        form = _functional_form.build(model, inputs, target, wrt, output=output,
                                      training=training, live=True,
                                      what="gp.gradient_penalty")
        kinds = form.kinds
        if not any(kinds[k] == "weight" for k in form.keys):
            found = backends.get().grad(
                lambda probes, x: form.objective(probes, form.variables, x), form.probes,
                form.inputs)
            grads = [found[k] for k in form.keys]
    else:  # TensorFlow (under the caller's tape) and JAX (compiled, and differentiable
        # when traced under the caller's jax.grad): the gradients of gp.gradients
        g = gradients(model, inputs, target, wrt, output=output, training=training)
        grads, kinds = [g[k] for k in g], dict(g.kinds)
    weights = [k for k in kinds if kinds[k] == "weight"]
    if weights:
        raise GradprobeError(
            f"gradient_penalty needs per-example sources (activations or inputs); "
            f"{weights[0]!r} is a weight. Use gp.per_example_norms for weights.")
    ops = keras.ops
    flat = ops.concatenate([ops.reshape(v, (ops.shape(v)[0], -1)) for v in grads], axis=1)
    if norm == 2:
        return ops.sqrt(ops.sum(ops.square(flat), axis=1))
    if norm == 1:
        return ops.sum(ops.abs(flat), axis=1)
    return ops.max(ops.abs(flat), axis=1)
