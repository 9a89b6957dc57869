"""`gp.integrated_gradients`: Integrated Gradients (Sundararajan et al., 2017),
to the input or, with `layer=`, to a layer's activations (interpolating there)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from gradprobe.attribution._common import (
    Attribution,
    ModelInputs,
    accumulator_dtype,
    chunk_rows,
    compiled_target_values,
    interpolate_rows,
    layer_key,
    row_bytes,
    stream,
)
from gradprobe.core import _validate
from gradprobe.core.engine import resolve_request
from gradprobe.errors import GradprobeError

# Gauss-Legendre nodes come from an eigenvalue problem of size steps x steps
# (numpy.polynomial.legendre.leggauss): more nodes than this cost seconds and
# gigabytes, and add nothing a smooth integrand needs.
MAX_GAUSS_LEGENDRE_STEPS = 1024


class IntegrationRule:
    """Nodes and weights on [0, 1] whose weighted sum approximates the integral,
    computed for the steps a chunk needs (never all `steps` at once for the
    trapezoid rule, so memory does not grow with `steps`)."""

    def __init__(self, steps: int, method: str):
        self.steps = _validate.count("steps", steps, "the number of interpolation points",
                                     minimum=2)
        self.method = _validate.choice("method", method, ("riemann_trapezoid", "gausslegendre"),
                                       "the integration rule")
        if method == "riemann_trapezoid":
            self._nodes = self._weights = None
        elif method == "gausslegendre":
            if self.steps > MAX_GAUSS_LEGENDRE_STEPS:
                raise GradprobeError(
                    f"method='gausslegendre' supports at most {MAX_GAUSS_LEGENDRE_STEPS} steps "
                    f"(its nodes solve a steps x steps eigenvalue problem); got steps={steps}. "
                    "Use fewer steps (Gauss-Legendre needs far fewer than the trapezoid rule) "
                    "or method='riemann_trapezoid'.")
            nodes, w = np.polynomial.legendre.leggauss(self.steps)
            self._nodes, self._weights = (nodes + 1.0) / 2.0, w / 2.0

    def alphas(self, k: np.ndarray) -> np.ndarray:
        if self._nodes is not None:
            return self._nodes[k]
        return k / (self.steps - 1)

    def weights(self, k: np.ndarray) -> np.ndarray:
        if self._weights is not None:
            return self._weights[k]
        w = np.full(k.shape, 1.0 / (self.steps - 1))
        return np.where((k == 0) | (k == self.steps - 1), 0.5 * w, w)


def integration_points(steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """`(alphas, weights)` on [0, 1] whose weighted sum approximates the integral."""
    rule = IntegrationRule(steps, method)
    k = np.arange(rule.steps)
    return rule.alphas(k), rule.weights(k)


def integrated_gradients(model: keras.Model, inputs: Any, target: Any, *, baseline: Any = None,
                         steps: int = 50, method: str = "riemann_trapezoid", layer: Any = None,
                         output: Any = None, training: bool = False,
                         batch_size: int | None = None, max_bytes: int | None = None,
                         progress: bool | None = None) -> Attribution:
    """Integrated Gradients: `(x - baseline) * integral_0^1 grad f(baseline + a (x - baseline)) da`.

    Args:
        baseline: Same shape as the inputs, or broadcastable; default zeros. With
            `layer=`, the baseline is an *input* baseline whose activation at the
            layer is the layer baseline. For a model with several inputs, the
            inputs' structure (`None` where zeros apply). Integer inputs (token
            ids, masks) are held at their values along the path; with `layer=`
            they have a baseline too (default zeros, e.g. the pad token).
        steps: Integration points.
        method: `"riemann_trapezoid"` or `"gausslegendre"` (at most 1024 steps).
        layer: Attribute to this layer's activations (layer Integrated Gradients,
            interpolating at the layer), by any selector of `gp.gradients`
            including `"name@1"`.
        batch_size: Evaluate this many interpolated inputs at a time (default:
            all `steps x batch` at once). Each chunk is built only when it is
            needed, so memory is bounded by `batch_size`, not by `steps`; every
            chunk runs through one compiled function (a `tf.function` on
            TensorFlow, one cached `jax.jit` trace per chunk shape on JAX,
            eager autograd on PyTorch), and a progress bar shows when there
            are several chunks.
        max_bytes: Refuse (with the numbers and the fix) a request whose chunk
            of interpolated inputs and their gradients would need more than this
            many bytes; default: the memory available now. The model's own
            activations are not in this estimate.
        model, inputs, target, output, training: As in `gp.gradients`. With
            several inputs (list, tuple or dict) the attributions have the same
            structure: one per floating-point input, `None` for the integer
            inputs held fixed (listed in `result.fixed`).

    What the baseline leaves unspecified follows one rule, for the path and for
    `delta` alike: without `layer=`, integer inputs are held at their values
    and floating inputs default to zeros; with `layer=`, the baseline gives the
    layer's baseline activation (integer inputs default to zeros there, e.g. the
    pad token), and every other input of the model is held at its value along
    the path, so `f(baseline)` in `delta` is the model with that activation and
    the held inputs.

    Returns:
        An `Attribution` with `.delta`, the per-example completeness error
        `sum(attributions) - (f(x) - f(baseline))`, computed in float32 at least
        (also for float16 models; attributions are summed in float32 too).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.GlobalAveragePooling2D(name="gap"),
    ...     keras.layers.Dense(3, name="dense"),
    ... ])
    >>> images = np.random.default_rng(0).random((2, 8, 8, 1), dtype="float32")
    >>> ig = gp.integrated_gradients(model, images, target="predicted", steps=64,
    ...                              batch_size=32, progress=False)
    >>> np.asarray(ig).shape
    (2, 8, 8, 1)
    >>> bool(np.abs(np.asarray(ig.delta)).max() < 1e-2)   # small: the integral is well approximated
    True
    """
    _validate.optional_count("batch_size", batch_size, "interpolated examples per chunk")
    rule = IntegrationRule(steps, method)
    req = resolve_request(model, inputs, target, output=output, training=training)
    mi = ModelInputs(req.x, req.model)
    if layer is None:
        mi.require_floating("gp.integrated_gradients")
    n = mi.n
    label = "integrated gradients" if layer is None else "layer integrated gradients"
    rows = chunk_rows(what=f"gp.integrated_gradients(steps={rule.steps})", reps_name="steps",
                      reps=rule.steps, n=n, batch_size_=batch_size, per_row=row_bytes(mi.leaves),
                      max_bytes=max_bytes)
    req = req.fixed()
    bases = mi.baseline(baseline, hold_fixed=layer is None)
    base = mi.pack_all(bases)
    # The trapezoid rule evaluates f at alpha = 0 and 1: f(baseline) and f(x) come
    # with the chunks (for per-example targets); otherwise two forward passes.
    ends = (0, rule.steps - 1) if method == "riemann_trapezoid" else ()

    if layer is None:
        keys, floating = mi.float_keys, mi.floating

        def step(idx: np.ndarray, k: np.ndarray, r: np.ndarray) -> Any:
            alphas = rule.alphas(k)
            path = {i: interpolate_rows(mi.leaves[i], bases[i], idx, alphas) for i in floating}
            g = req.gradients(keys, x=mi.rows(idx, path), rows=idx)
            return [g[key] for key in keys], g.target

        wide = {i: accumulator_dtype(mi.leaves[i].dtype) for i in floating}
        acc, kept = stream(n=n, reps=rule.steps, rows=rows, weights=rule.weights, step=step,
                           acc=[ops.zeros(tuple(mi.leaves[i].shape), wide[i])
                                for i in floating],
                           label=label, progress=progress, keep=ends,
                           target=req.target)
        per_leaf = {i: (ops.cast(mi.leaves[i], wide[i]) - ops.cast(bases[i], wide[i])) * a
                    for i, a in zip(floating, acc)}
        attributions, key, fixed = mi.pack(per_leaf), None, mi.fixed
        parts = list(per_leaf.values())
    else:
        ga = req.gradients(layer)
        key = layer_key(ga, layer)
        a_x = ga.activations[key]
        gb = req.gradients(key, x=base, unconnected="zero")
        a_b = gb.activations[key]
        wide = accumulator_dtype(a_x.dtype)
        rows = chunk_rows(what=f"gp.integrated_gradients(steps={rule.steps}, layer={key!r})",
                          reps_name="steps", reps=rule.steps, n=n, batch_size_=batch_size,
                          per_row=row_bytes([*mi.leaves, a_x]), max_bytes=max_bytes)

        def step(idx: np.ndarray, k: np.ndarray, r: np.ndarray) -> Any:
            path = interpolate_rows(a_x, a_b, idx, rule.alphas(k))
            g = req.gradients(key, x=mi.rows(idx), rows=idx, replacement=path)
            return [g[key]], g.target

        acc, _ = stream(n=n, reps=rule.steps, rows=rows, weights=rule.weights, step=step,
                        acc=[ops.zeros(tuple(a_x.shape), wide)], label=label,
                        progress=progress, target=req.target)
        # f(baseline) is f at the path's start: the layer's activation replaced by the
        # baseline's, every other input held at its value, as along the whole path
        # (one rule for what the baseline leaves unspecified, for the path and delta).
        start = req.gradients(key, replacement=a_b, unconnected="zero")
        kept = {0: start.target, rule.steps - 1: ga.target}
        ends = (0, rule.steps - 1)
        attributions = (ops.cast(a_x, wide) - ops.cast(a_b, wide)) * acc[0]
        parts, fixed = [attributions], ()
    f_b, f_x = (kept.get(k) for k in ends) if ends else (None, None)
    if not (_per_example(f_x, n) and _per_example(f_b, n)) and layer is None:
        f_x = compiled_target_values(req)
        f_b = compiled_target_values(req, base)
    wide = "float64" if any(_dtype(p) == "float64" for p in parts) else "float32"
    sums = None
    for p in parts:  # (in order, as tf.add_n adds)
        part = ops.sum(ops.reshape(ops.cast(p, wide), (n, -1)), axis=1)
        sums = part if sums is None else sums + part
    delta_dtype = "float64" if "float64" in (_dtype(sums), _dtype(f_x)) else "float32"
    delta = ops.cast(sums, delta_dtype) - (ops.cast(f_x, delta_dtype) - ops.cast(f_b, delta_dtype))
    return Attribution(attributions, f_x, "integrated_gradients", delta=delta, layer=key,
                       fixed=fixed)


def _dtype(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def _per_example(values: Any, n: int) -> bool:
    return values is not None and tuple(getattr(values, "shape", ())) == (n,)
