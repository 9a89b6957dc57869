"""The model-kind × representative-layer subset of tests/catalog.py on JAX and PyTorch.

Every model kind of `catalog.KINDS` (sequential, functional, subclassed, nested
model, custom layer, a layer shared by two calls, multi-output) with seven
representative layers (Dense, Conv2D, Embedding on integer ids,
LayerNormalization, BatchNormalization in inference, MultiHeadAttention, a
custom layer with its own weights),
in float64: `gp.gradients` of the layer's activation (one result per call of a
shared layer), its weights and the input agree with two oracles independent of
gradprobe (tests/backends/catalog_oracle.py):

- hand-written `jax.grad` / `torch.autograd.grad` through `model.stateless_call`
  (whole tensors);
- float64 central finite differences computed with NumPy around
  `model.stateless_call` (a few elements of each gradient).

Tolerances (measured on this machine, max over the 48 cases). Keras' type
promotion maps float64 to float32 on JAX and PyTorch whenever it resolves a
result type (`keras.src.backend.common.dtypes.BIT64_TO_BIT32_DTYPE`), so some
float64 ops compute in float32, about 1e-7 off: `keras.ops.tanh` on JAX (every
catalog head is a tanh Dense), `keras.ops.matmul` on PyTorch (every Dense),
and `keras.ops.var` on both (LayerNormalization). Hence:

- autograd: 1e-10 on PyTorch (measured 0: the same float32 steps in the same
  order; tests/test_catalog.py uses 1e-10 on TensorFlow); 1e-6 on JAX
  (measured 4e-7: gradprobe's `jax.jit`-compiled float32 steps round
  differently from the eager oracle's);
- finite differences: a five-point stencil at eps 3e-2 (truncation O(eps**4))
  instead of two points at 1e-6, which would divide the 1e-7 float32 rounding
  by 1e-6 (measured errors up to 0.1); tolerance 1e-4 of the gradient's largest
  entry (measured max 1.2e-5 on PyTorch, 3.7e-5 on JAX). A wrong gradient (a
  missing call, summed calls, a wrong weight) is off by O(1).

Run with `KERAS_BACKEND=jax` or `KERAS_BACKEND=torch`; skipped on TensorFlow,
where tests/test_catalog.py runs the whole catalog against tests/oracle.py.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

if keras.backend.backend() not in ("jax", "torch"):
    pytest.skip("JAX/PyTorch catalog subset: run with KERAS_BACKEND=jax or torch "
                "(TensorFlow runs the whole catalog in tests/test_catalog.py)",
                allow_module_level=True)

import catalog_oracle as oracle  # noqa: E402
from backend_helpers import arr  # noqa: E402
from keras import ops  # noqa: E402

import gradprobe as gp  # noqa: E402
from catalog import CASES, KINDS, build  # noqa: E402

SUBSET = ["dense", "conv2d", "embedding", "layernorm", "batchnorm_inference",
          "multi_head_attention", "custom_weights"]
PARAMS = [pytest.param(case, kind, id=f"{case.name}-{kind}")
          for case in CASES if case.name in SUBSET for kind in case.kinds]
BACKEND = keras.backend.backend()


EXACT_TOL = 1e-6 if BACKEND == "jax" else 1e-10  # against autograd (see the docstring)
FD_EPS, FD_TOL = 3e-2, 1e-4  # five-point finite differences (see the docstring)


def rel_err(actual, expected, scale):
    actual = np.asarray(arr(actual), np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected))) / max(scale, 1e-12)


def sample_indices(shape, k, rng):
    flat = rng.choice(int(np.prod(shape)), size=min(k, int(np.prod(shape))), replace=False)
    return [np.unravel_index(int(i), tuple(shape)) for i in flat]


def test_subset_covers_every_kind_and_layer():
    assert sorted({c.name for c in CASES if c.name in SUBSET}) == sorted(SUBSET)
    kinds = {p.values[1] for p in PARAMS}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("case,kind", PARAMS)
def test_layer_in_model_kind(case, kind, x64):
    model, x, layer, path, calls, output = build(case, kind)
    rng = np.random.default_rng(7)
    proj = rng.normal(size=(3, 2 if output else 3))

    def target(y):  # of the selected output (float32 on JAX: the tanh head)
        return ops.sum(ops.cast(y, "float64") * ops.convert_to_tensor(proj, "float64"), axis=-1)

    def full_target(outputs):  # of the model's outputs (the oracles')
        return target(outputs[1] if output == "head_b" else outputs)

    wrt = [path]
    if layer.trainable_weights:
        wrt.append(path + ".weights")
    if not case.int_input:
        wrt.append("inputs")
    before = [arr(v.value).copy() for v in model.weights]
    g = gp.gradients(model, x, target, wrt, output=output)
    for a, b in zip(before, [arr(v.value) for v in model.weights]):
        np.testing.assert_array_equal(a, b)  # the model is sacred

    # The target value.
    expected_target = arr(full_target(model(x)))
    err = rel_err(g.target, expected_target, float(np.max(np.abs(expected_target))))
    assert err <= EXACT_TOL, f"target: relative error {err:.3g}"

    # Hand-written autograd: every call's activation, every weight, the input.
    variables = list(layer.trainable_weights)
    act_e, w_e, in_e = oracle.autograd_grads(model, x, full_target, layer, len(calls), variables,
                                             not case.int_input)
    keys = [path if len(calls) == 1 else f"{path}@{i}" for i in calls]
    for key, e in zip(keys, act_e):
        # (float32 on JAX where the layer ends in keras.ops.tanh: see the docstring)
        assert arr(g[key]).dtype == arr(g.activations[key]).dtype, key
        assert arr(g.activations[key]).shape == e.shape, key
        err = rel_err(g[key], e, float(np.max(np.abs(e))))
        assert err <= EXACT_TOL, f"{key}: relative error {err:.3g} against autograd"
    by_var = {id(v): k for k, v in g.variables.items()}
    assert len(by_var) == len(variables)
    w_scale = max([float(np.max(np.abs(e))) for e in w_e] + [0.0])
    for v, e in zip(variables, w_e):
        err = rel_err(g[by_var[id(v)]], e, w_scale)
        assert err <= EXACT_TOL, f"{v.path}: relative error {err:.3g} against autograd"
    in_keys = ["inputs"] if len(in_e) == 1 else [f"inputs:{i}" for i in range(len(in_e))]
    for key, e in zip(in_keys, in_e):
        assert arr(g[key]).dtype == np.float64, key
        err = rel_err(g[key], e, float(np.max(np.abs(e))))
        assert err <= EXACT_TOL, f"{key}: relative error {err:.3g} against autograd"

    # Finite differences: each call's activation, one weight, each input.
    for i, key in zip(calls, keys):
        grad = arr(g[key])
        scale = float(np.max(np.abs(grad)))
        for idx in sample_indices(grad.shape, 2, rng):
            fd = oracle.fd_activation(model, x, full_target, layer, i, idx, FD_EPS)
            err = abs(grad[idx] - fd) / max(scale, 1e-12)
            assert err <= FD_TOL, f"{key}{idx}: relative error {err:.3g} against finite differences"
    if variables:
        v = variables[0]
        grad = arr(g[by_var[id(v)]])
        scale = float(np.max(np.abs(grad)))
        for idx in sample_indices(grad.shape, 2, rng):
            fd = oracle.fd_weight(model, x, full_target, v, idx, FD_EPS)
            err = abs(grad[idx] - fd) / max(scale, 1e-12)
            assert err <= FD_TOL, f"{v.path}{idx}: relative error {err:.3g} against finite differences"
    for j, key in enumerate(in_keys):
        grad = arr(g[key])
        scale = float(np.max(np.abs(grad)))
        for idx in sample_indices(grad.shape, 1, rng):
            fd = oracle.fd_input(model, x, full_target, j, idx, FD_EPS)
            err = abs(grad[idx] - fd) / max(scale, 1e-12)
            assert err <= FD_TOL, f"{key}{idx}: relative error {err:.3g} against finite differences"
