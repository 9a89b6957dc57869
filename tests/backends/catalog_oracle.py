"""Oracles for tests/catalog.py's models on JAX and PyTorch, independent of gradprobe.

Two oracles, both in float64:

- `autograd_grads`: hand-written `jax.grad` / `torch.autograd.grad` through
  `model.stateless_call`, differentiating with respect to the weights, the input
  and a zero tensor added to the output of each call of the layer under test
  (the chain rule: d objective / d (activation + probe) at probe = 0 is the
  activation's gradient). Whole tensors, exact up to rounding.
- `fd_activation`, `fd_weight`, `fd_input`: central finite differences computed
  with NumPy around `model.stateless_call`, one element at a time.

Both reach the layer's output through an instance-level `call` that the oracle
installs on the layer and removes afterwards (`_added`); nothing here uses
gradprobe. `jax` and `torch` are imported lazily: the calling test module skips
itself first under another backend. Never imports tests/oracle.py (TensorFlow).
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np


def values(model):
    """The model's trainable and non-trainable variable values (lists of tensors)."""
    return ([v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables])


@contextlib.contextmanager
def _added(layer, addends, record=None):
    """Adds `addends[n]` (a tensor, or None for nothing) to the output of the layer's
    n-th call while inside; appends each call's output to `record` if given.
    (An instance attribute `call` shadows the class's: Keras' `Layer.__call__`
    calls `self.call`.)"""
    original = layer.call
    count = [0]

    def call(*args, **kwargs):
        out = original(*args, **kwargs)
        n = count[0]
        count[0] += 1
        if record is not None:
            record.append(out)
        if n < len(addends) and addends[n] is not None:
            out = out + addends[n]
        return out

    layer.__dict__["call"] = call
    try:
        yield count
    finally:
        del layer.__dict__["call"]


def objective_value(model, x, objective, layer=None, addends=(), tv=None, ntv=None):
    """float64 sum of `objective(model outputs)` through `stateless_call`, with
    `addends` added to the layer's call outputs and `tv` in place of the weights."""
    tv0, ntv0 = values(model)
    tv = tv0 if tv is None else tv
    ntv = ntv0 if ntv is None else ntv
    ctx = _added(layer, addends) if layer is not None else contextlib.nullcontext()
    with ctx:
        y = model.stateless_call(tv, ntv, x)[0]
    return float(np.sum(keras.ops.convert_to_numpy(objective(y)).astype(np.float64)))


def call_outputs(model, x, layer):
    """The outputs (NumPy) of every call of `layer` in one forward pass of `model`."""
    record = []
    with _added(layer, (), record):
        model(x)
    return [keras.ops.convert_to_numpy(o) for o in record]


def _flat_inputs(x):
    return x if isinstance(x, list) else [x]


def _rebuild(x, flat):
    return list(flat) if isinstance(x, list) else flat[0]


def autograd_grads(model, x, objective, layer, n_calls, variables, with_input):
    """Hand-written backend autograd of `sum(objective(stateless_call(...)))`.

    Returns:
        `(activation_grads, weight_grads, input_grads)`: one NumPy array per call
        of `layer`, per variable in `variables`, per model input (empty unless
        `with_input`).
    """
    tv, ntv = values(model)
    ids = [id(v) for v in model.trainable_variables]
    pos = [ids.index(id(v)) for v in variables]
    shapes = [o.shape for o in call_outputs(model, x, layer)]
    assert len(shapes) == n_calls, (len(shapes), n_calls)
    xs = [keras.ops.convert_to_tensor(a) for a in _flat_inputs(x)]

    def forward(probes, weights, inputs):
        vals = list(tv)
        for p, w in zip(pos, weights):
            vals[p] = w
        with _added(layer, probes) as count:
            y = model.stateless_call(vals, ntv, _rebuild(x, inputs))[0]
        assert count[0] == n_calls, (count[0], n_calls)
        return keras.ops.sum(objective(y))

    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        probes = [jnp.zeros(s, jnp.float64) for s in shapes]
        weights = [tv[p] for p in pos]
        if with_input:
            grads = jax.grad(forward, argnums=(0, 1, 2))(probes, weights, xs)
        else:
            grads = jax.grad(lambda p, w: forward(p, w, xs), argnums=(0, 1))(probes, weights)
            grads = (*grads, [])
    elif backend == "torch":
        import torch

        probes = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes]
        weights = [tv[p].detach().clone().requires_grad_(True) for p in pos]
        inputs = [a.detach().clone().requires_grad_(True) for a in xs] if with_input else xs
        obj = forward(probes, weights, inputs)
        flat = torch.autograd.grad(obj, probes + weights + (inputs if with_input else []))
        grads = (flat[:len(probes)], flat[len(probes):len(probes) + len(weights)],
                 flat[len(probes) + len(weights):])
    else:  # pragma: no cover - the test modules skip other backends first
        raise NotImplementedError(backend)
    return tuple([keras.ops.convert_to_numpy(g) for g in group] for group in grads)


def _central(f, eps):
    """The five-point central difference of `f(delta)` at 0 (truncation error
    O(eps**4), so a large eps keeps float32 rounding inside the model small
    relative to the step)."""
    return (8 * (f(eps) - f(-eps)) - (f(2 * eps) - f(-2 * eps))) / (12 * eps)


def fd_activation(model, x, objective, layer, call_index, idx, eps):
    """Finite difference of the objective in one element of one call's output."""
    shape = call_outputs(model, x, layer)[call_index].shape

    def f(delta):
        d = np.zeros(shape)
        d[idx] = delta
        addends = [None] * call_index + [keras.ops.convert_to_tensor(d)]
        return objective_value(model, x, objective, layer, addends)

    return _central(f, eps)


def fd_weight(model, x, objective, var, idx, eps):
    """Finite difference of the objective in one element of one trainable variable."""
    tv, ntv = values(model)
    pos = [id(v) for v in model.trainable_variables].index(id(var))
    base = keras.ops.convert_to_numpy(tv[pos]).astype(np.float64)

    def f(delta):
        w = base.copy()
        w[idx] += delta
        vals = list(tv)
        vals[pos] = keras.ops.convert_to_tensor(w)
        return objective_value(model, x, objective, tv=vals, ntv=ntv)

    return _central(f, eps)


def fd_input(model, x, objective, input_index, idx, eps):
    """Finite difference of the objective in one element of one model input."""
    flat = [np.asarray(a, np.float64) for a in _flat_inputs(x)]

    def f(delta):
        xs = [a.copy() for a in flat]
        xs[input_index][idx] += delta
        return objective_value(model, _rebuild(x, xs), objective)

    return _central(f, eps)
