"""`gp.integrated_gradients`: Integrated Gradients (Sundararajan et al., 2017),
to the input or, with `layer=`, to a layer's activations (interpolating there)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradprobe import _validate
from gradprobe.attribution import (
    Attribution,
    batched,
    fixed_target,
    input_gradients,
    layer_key,
    repeat_target,
    single_input,
    slice_target,
    target_values,
)
from gradprobe.engine import gradients, gradients_at
from gradprobe.errors import GradprobeError


def integration_points(steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """`(alphas, weights)` on [0, 1] whose weighted sum approximates the integral."""
    steps = _validate.count("steps", steps, "the number of interpolation points", minimum=2)
    if method == "riemann_trapezoid":
        alphas = np.linspace(0.0, 1.0, int(steps))
        weights = np.full(int(steps), 1.0 / (steps - 1))
        weights[[0, -1]] *= 0.5
        return alphas, weights
    if method == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(int(steps))
        return (nodes + 1.0) / 2.0, w / 2.0
    raise GradprobeError(
        f"method must be 'riemann_trapezoid' or 'gausslegendre'; got {method!r}.")


def integrated_gradients(model: keras.Model, inputs: Any, target: Any, *, baseline: Any = None,
                         steps: int = 50, method: str = "riemann_trapezoid", layer: Any = None,
                         output: Any = None, training: bool = False,
                         batch_size: int | None = None,
                         progress: bool | None = None) -> Attribution:
    """Integrated Gradients: `(x - baseline) * integral_0^1 grad f(baseline + a (x - baseline)) da`.

    Args:
        baseline: Same shape as the inputs, or broadcastable; default zeros. With
            `layer=`, the baseline is an *input* baseline whose activation at the
            layer is the layer baseline.
        steps: Integration points.
        method: `"riemann_trapezoid"` or `"gausslegendre"`.
        layer: Attribute to this layer's activations (layer Integrated Gradients,
            interpolating at the layer), by any selector of `gp.gradients`
            including `"name@1"`.
        batch_size: Compute in chunks of this many interpolated examples (bounded
            memory); a progress bar shows when there are several chunks.
        model, inputs, target, output, training: As in `gp.gradients`.

    Returns:
        An `Attribution` with `.delta`, the per-example completeness error
        `sum(attributions) - (f(x) - f(baseline))`.

    Example:

    >>> ig = gp.integrated_gradients(model, images, target="predicted", steps=64)
    >>> np.abs(ig.delta).max()    # small when the integral is well approximated
    """
    _validate.optional_count("batch_size", batch_size, "interpolated examples per chunk")
    x = single_input(model, inputs, "gp.integrated_gradients")
    _validate.baseline(baseline, x)
    n = int(x.shape[0])
    target = fixed_target(model, x, target, output, training)
    base = tf.zeros_like(x) if baseline is None else tf.broadcast_to(
        tf.cast(baseline, x.dtype), tf.shape(x))
    alphas, weights = integration_points(steps, method)
    f_x = target_values(model, x, target, output, training)
    f_b = target_values(model, base, target, output, training)
    if layer is None:
        path = tf.concat([base + float(a) * (x - base) for a in alphas], axis=0)
        g, _ = input_gradients(model, path, repeat_target(target, len(alphas), n), output=output,
                            training=training, batch_size_=batch_size,
                            label="integrated gradients", progress=progress)
        avg = _weighted(g, weights, n)
        attributions = (x - base) * tf.cast(avg, x.dtype)
        key = None
    else:
        ga = gradients(model, x, target, layer, output=output, training=training)
        key = layer_key(ga, layer)
        a_x = ga.activations[key]
        a_b = gradients(model, base, target, key, output=output, training=training,
                        unconnected="zero").activations[key]
        total = len(alphas) * n
        x_rep = tf.concat([x] * len(alphas), axis=0)
        a_path = tf.concat([a_b + float(a) * (a_x - a_b) for a in alphas], axis=0)
        reps = repeat_target(target, len(alphas), n)

        def run(lo: int, hi: int) -> Any:
            return gradients_at(model, x_rep[lo:hi], slice_target(reps, lo, hi), key,
                                a_path[lo:hi], output=output, training=training)[key]

        parts = batched(run, total, batch_size, "layer integrated gradients", progress)
        g = parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)
        attributions = (a_x - a_b) * tf.cast(_weighted(g, weights, n), a_x.dtype)
    sums = tf.reduce_sum(tf.reshape(attributions, [n, -1]), axis=1)
    delta = tf.cast(sums, f_x.dtype) - (f_x - f_b)
    return Attribution(attributions, f_x, "integrated_gradients", delta=delta, layer=key)


def _weighted(g: Any, weights: np.ndarray, n: int) -> Any:
    g = tf.reshape(g, [len(weights), n, *g.shape[1:]])
    w = tf.reshape(tf.constant(weights, g.dtype), [-1] + [1] * (g.shape.rank - 1))
    return tf.reduce_sum(g * w, axis=0)
