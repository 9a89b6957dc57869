"""Statistics and diagnosis of half-precision gradients are computed in float32 or
wider (issue 12, item 4): the numbers equal those of the same values in float64."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from gradprobe.backends import tensorflow as backend
from gradprobe.core.stats import diagnose, tensor_stats


def _reference(values64):
    """The statistics written out in float64 NumPy (no gradprobe code)."""
    finite = values64[np.isfinite(values64)]
    return {"norm": np.sqrt(np.sum(finite ** 2)), "mean_abs": np.mean(np.abs(finite)),
            "max_abs": np.max(np.abs(finite)), "std": np.std(finite),
            "zero_fraction": np.mean(values64 == 0), "nonfinite": int(np.sum(~np.isfinite(values64)))}


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_stats_match_float64(dtype):
    rng = np.random.default_rng(0)
    # squares overflow float16 (200^2 * 600 > 65504) and small values' squares underflow
    values = np.concatenate([np.full(600, 200.0), rng.normal(0, 1e-4, 600), [0.0, np.inf, np.nan]])
    half = backend.to_numpy(tf.constant(values, dtype))
    exact = np.asarray(tf.cast(tf.constant(values, dtype), tf.float64))  # the stored values
    got, ref = tensor_stats(half), _reference(exact)
    for field, value in ref.items():
        assert np.isfinite(got[field])
        assert got[field] == pytest.approx(value, rel=1e-6), field


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_diagnosis_is_not_fooled_by_underflow(dtype):
    """RMS 1e-4 squared is 1e-8, below float16's smallest subnormal: in half
    precision the early source would look exactly zero, not vanishing."""
    early = backend.to_numpy(tf.fill([64, 8], tf.constant(1e-4, dtype)))
    late = backend.to_numpy(tf.fill([64, 8], tf.constant(0.5, dtype)))
    stats = {"a": tensor_stats(early), "b": tensor_stats(late)}
    found = diagnose(stats, {"a": "activation", "b": "activation"}, {"a": early, "b": late})
    assert [(f.kind, f.key) for f in found] == [("vanishing", "a")]
    expected = float(tf.cast(tf.constant(1e-4, dtype), tf.float64)) / float(
        tf.cast(tf.constant(0.5, dtype), tf.float64))
    assert found[0].value == pytest.approx(expected, rel=1e-6)
    # a dead unit in half precision is found; live tiny units are not dead
    early[:, 3] = 0
    found = diagnose(stats, {"a": "activation", "b": "activation"}, {"a": early, "b": late})
    dead = [f for f in found if f.kind == "dead"]
    assert len(dead) == 1 and dead[0].value == pytest.approx(1 / 8)
