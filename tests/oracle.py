"""Independent oracles: float64 central finite differences and hand-written tapes.

Nothing here uses gradprobe; the activation perturbation uses its own wrapper.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tolerance import assert_close as _assert_close


def objective(model, x, target_fn, training=False):
    return float(np.sum(target_fn(model(x, training=training)).numpy()))


def fd_input(model, x, target_fn, idx, eps=1e-6, training=False):
    x = np.array(x, dtype=np.float64)
    plus, minus = x.copy(), x.copy()
    plus[idx] += eps
    minus[idx] -= eps
    return (objective(model, plus, target_fn, training)
            - objective(model, minus, target_fn, training)) / (2 * eps)


def fd_variable(model, x, target_fn, var, idx, eps=1e-6, training=False):
    original = var.numpy().copy()
    try:
        v = original.copy()
        v[idx] += eps
        var.assign(v)
        f_plus = objective(model, x, target_fn, training)
        v[idx] -= 2 * eps
        var.assign(v)
        f_minus = objective(model, x, target_fn, training)
    finally:
        var.assign(original)
    return (f_plus - f_minus) / (2 * eps)


def fd_activation(model, x, target_fn, layer, call_index, idx, eps=1e-6, training=False):
    """Perturbs one element of the output of the `call_index`-th call of `layer`."""
    original_call = layer.call
    state = {"n": 0, "delta": 0.0}

    def perturbed(*args, **kwargs):
        out = original_call(*args, **kwargs)
        n = state["n"]
        state["n"] += 1
        if n == call_index:
            d = np.zeros(out.shape, dtype=out.dtype.as_numpy_dtype)
            d[idx] = state["delta"]
            out = out + tf.constant(d)
        return out

    layer.__dict__["call"] = perturbed
    try:
        state.update(n=0, delta=eps)
        f_plus = objective(model, x, target_fn, training)
        state.update(n=0, delta=-eps)
        f_minus = objective(model, x, target_fn, training)
    finally:
        del layer.__dict__["call"]
    return (f_plus - f_minus) / (2 * eps)


def tape_grads(model, x, target_fn, variables, training=False):
    """Hand-written tape: gradients w.r.t. the input and the given variables."""
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        obj = tf.reduce_sum(target_fn(model(xt, training=training)))
    grads = tape.gradient(obj, [xt] + [v.value for v in variables])
    return grads[0], grads[1:]


def sample_indices(shape, k, rng):
    shape = tuple(shape)
    flat = rng.choice(int(np.prod(shape)), size=min(k, int(np.prod(shape))), replace=False)
    return [np.unravel_index(int(i), shape) for i in flat]


def assert_close(actual, expected, rtol=1e-6, what="", scale=None):
    """Max absolute difference relative to the largest entry of `expected`
    (or `scale`, the magnitude of the whole gradient the entries come from).
    Kept for the float64 comparisons that pass an explicit `rtol`; for values
    computed in float32/float16 use `tolerance.assert_close(a, e, dtype)`."""
    _assert_close(actual, expected, rtol=rtol, what=what, scale=scale, tiny=1e-9)
