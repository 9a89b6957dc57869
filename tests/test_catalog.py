"""Every catalog layer in every model kind agrees with float64 finite differences
and with hand-written tf.GradientTape code (relative error <= 1e-6)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import gradprobe as gp
from catalog import CASES, build
from oracle import assert_close, fd_activation, fd_variable, sample_indices

PARAMS = [pytest.param(case, kind, id=f"{case.name}-{kind}") for case in CASES for kind in case.kinds]


def _select(outputs, output):
    return outputs[1] if output == "head_b" else outputs


@pytest.mark.parametrize("case,kind", PARAMS)
def test_layer_in_model_kind(case, kind, float64):
    model, x, layer, path, calls, output = build(case, kind)
    rng = np.random.default_rng(7)
    proj = tf.constant(rng.normal(size=(3, 2 if output else 3)))

    def target(y):
        return tf.reduce_sum(y * proj, axis=-1)

    def full_target(outputs):
        return target(_select(outputs, output))

    wrt = [path]
    if layer.trainable_weights:
        wrt.append(path + ".weights")
    if not case.int_input:
        wrt.append("inputs")
    g = gp.gradients(model, x, target, wrt, output=output, training=case.training)

    # The target value and per-example shape.
    y = model(x, training=case.training)
    assert_close(g.target, full_target(y), 1e-12, "target")

    # Hand-written tape: input and weight gradients, whole tensors.
    xs = tf.nest.map_structure(tf.constant, x)
    variables = list(layer.trainable_weights)
    with tf.GradientTape() as tape:
        tape.watch(xs)
        obj = tf.reduce_sum(full_target(model(xs, training=case.training)))
    flat_x = tf.nest.flatten(xs)
    expected = tape.gradient(obj, flat_x + [v.value for v in variables])
    if not case.int_input:
        keys = ["inputs"] if len(flat_x) == 1 else [f"inputs:{i}" for i in range(len(flat_x))]
        for key, e in zip(keys, expected[: len(flat_x)]):
            assert g[key].dtype == tf.float64
            assert_close(g[key], e, 1e-10, key)
    by_var = {id(v): k for k, v in g.variables.items()}
    assert len(by_var) == len(variables)
    expected_w = [tf.convert_to_tensor(e).numpy() for e in expected[len(flat_x):]]
    # Relative to the layer's largest weight gradient: some are exactly zero in
    # exact arithmetic (an attention key bias) and only rounding noise here.
    w_scale = max([float(np.max(np.abs(e))) for e in expected_w] + [0.0])
    for v, e in zip(variables, expected_w):
        assert_close(g[by_var[id(v)]], e, 1e-10, v.path, scale=w_scale)

    # Finite differences: activations (each call separately) and one weight.
    for i in calls:
        key = path if len(calls) == 1 else f"{path}@{i}"
        grad = g[key].numpy()
        assert grad.shape == tuple(g.activations[key].shape)
        scale = float(np.max(np.abs(grad)))
        for idx in sample_indices(grad.shape, 3, rng):
            fd = fd_activation(model, x, full_target, layer, i, idx, training=case.training)
            assert_close(grad[idx], fd, 1e-6, f"{key}{idx}", scale=scale)
    if variables:
        v = variables[0]
        grad = g[by_var[id(v)]].numpy()
        scale = float(np.max(np.abs(grad)))
        for idx in sample_indices(grad.shape, 2, rng):
            fd = fd_variable(model, x, full_target, v, idx, training=case.training)
            assert_close(grad[idx], fd, 1e-6, f"{v.path}{idx}", scale=scale)
