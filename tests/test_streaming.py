"""Streamed Integrated Gradients and SmoothGrad: results independent of the
chunking (against hand-written tf.GradientTape code in float64), one trace for
any number of chunks (a counter, not a clock), peak memory bounded by
`batch_size` and not by `steps`/`samples` (RSS high-water mark in a
subprocess), and requests that cannot fit refused up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp
from gradprobe.backends.tensorflow_attribution import accumulate, interpolate, noisy
from oracle import assert_close

CHUNKINGS = [1, 7, None, 10_000]


def _front_back(seed=0):
    """A CNN as two halves, so a hand-written layer IG can interpolate at 'fc'."""
    keras.utils.set_random_seed(seed)
    front = [layers.Conv2D(3, 3, activation="tanh", name="conv"), layers.Flatten(name="flat"),
             layers.Dense(5, activation="softplus", name="fc")]
    back = [layers.Dense(3, name="out")]
    inp = keras.Input((6, 6, 2))
    h = inp
    for layer in front + back:
        h = layer(h)
    model = keras.Model(inp, h)

    def run(layers_, t):
        for layer in layers_:
            t = layer(t)
        return t

    return model, (lambda t: run(front, t)), (lambda t: run(back, t))


def _tape_ig(f, x, base, classes, steps):
    """Hand-written trapezoid IG of `sum_i f(.)[i, classes[i]]` at `steps` points."""
    alphas = np.linspace(0.0, 1.0, steps)
    w = np.full(steps, 1.0 / (steps - 1))
    w[[0, -1]] *= 0.5
    total = tf.zeros_like(x)
    for a, wk in zip(alphas, w):
        p = tf.constant(base + a * (x - base))
        with tf.GradientTape() as t:
            t.watch(p)
            s = tf.reduce_sum(tf.gather(f(p), classes, axis=1, batch_dims=1))
        total += wk * t.gradient(s, p)
    return ((x - base) * total).numpy()


def test_ig_unchanged_by_chunking_against_tape(float64):
    model, front, back = _front_back()
    rng = np.random.default_rng(0)
    x = rng.random((3, 6, 6, 2))
    base = rng.random((3, 6, 6, 2)) * 0.2
    classes = np.array([0, 2, 1])
    steps = 13
    want = _tape_ig(model, x, base, classes, steps)
    a_x, a_b = front(tf.constant(x)).numpy(), front(tf.constant(base)).numpy()
    want_layer = _tape_ig(back, a_x, a_b, classes, steps)
    pick = lambda v: np.take_along_axis(model(v).numpy(), classes[:, None], 1)[:, 0]  # noqa: E731
    f_x, f_b = pick(x), pick(base)
    for bs in CHUNKINGS:
        ig = gp.integrated_gradients(model, x, classes, baseline=base, steps=steps,
                                     batch_size=bs, progress=False)
        assert ig.values.dtype == tf.float64
        assert_close(np.asarray(ig), want, 1e-12)
        lig = gp.integrated_gradients(model, x, classes, baseline=base, steps=steps,
                                      layer="fc", batch_size=bs, progress=False)
        assert lig.layer == "fc"
        assert_close(np.asarray(lig), want_layer, 1e-12)
        for result, attr in ((ig, want), (lig, want_layer)):
            assert_close(result.target, f_x, 1e-12)
            sums = attr.reshape(len(x), -1).sum(1)
            assert_close(result.delta, sums - (f_x - f_b), 1e-12, scale=np.abs(f_x - f_b).max())
    # Gauss-Legendre (no end points among the nodes) and a callable target: f(x)
    # and f(baseline) come from separate forward passes.
    ig = gp.integrated_gradients(model, x, lambda y: y[:, 1], baseline=base, steps=steps,
                                 method="gausslegendre", batch_size=5, progress=False)
    f1 = model(x).numpy()[:, 1] - model(base).numpy()[:, 1]
    assert_close(ig.delta, np.asarray(ig).reshape(len(x), -1).sum(1) - f1, 1e-12,
                 scale=np.abs(f1).max())
    # "predicted" is resolved once on the inputs: each chunk keeps each example's class.
    pred = np.argmax(model(x).numpy(), axis=-1)
    ig = gp.integrated_gradients(model, x, "predicted", baseline=base, steps=steps, batch_size=4,
                                 progress=False)
    assert_close(np.asarray(ig), _tape_ig(model, x, base, pred, steps), 1e-12)


def test_smoothgrad_unchanged_by_chunking_against_tape(float64):
    model, _, _ = _front_back(1)
    x = np.random.default_rng(1).random((2, 6, 6, 2))
    samples, noise, seed, cls = 5, 0.3, 11, 2
    n = x.shape[0]
    span = x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True)
    total = np.zeros_like(x)
    for s in range(samples):
        # The documented noise: copy s of example i uses seed (seed, s * n + i).
        eps = np.stack([tf.random.stateless_normal(x.shape[1:], [seed, s * n + i],
                                                   dtype=tf.float64).numpy()
                        for i in range(n)])
        p = tf.constant(x + noise * span * eps)
        with tf.GradientTape() as t:
            t.watch(p)
            out = tf.reduce_sum(model(p)[:, cls])
        total += t.gradient(out, p).numpy() / samples
    want = np.abs(total).max(-1)
    for bs in CHUNKINGS:
        sg = gp.smoothgrad(model, x, cls, samples=samples, noise=noise, seed=seed,
                           batch_size=bs, progress=False)
        assert_close(np.asarray(sg), want, 1e-12)
    other = gp.smoothgrad(model, x, cls, samples=samples, noise=noise, seed=seed + 1)
    assert not np.allclose(np.asarray(other), want)


class Counting(layers.Layer):
    """Counts how often its Python `call` runs: once per trace, once per eager call."""

    calls = 0

    def call(self, x):
        Counting.calls += 1
        return x


def _counting_model():
    keras.utils.set_random_seed(2)
    inp = keras.Input((5, 5, 1))
    h = layers.Conv2D(2, 3, activation="tanh", name="conv")(inp)
    h = Counting(name="count")(h)
    h = layers.Flatten()(h)
    h = layers.Dense(4, activation="tanh", name="fc")(h)
    return keras.Model(inp, layers.Dense(3, name="out")(h))


@pytest.mark.parametrize("kind", ["ig", "layer_ig", "smoothgrad"])
def test_one_trace_for_any_number_of_chunks(kind):
    model = _counting_model()
    x = np.random.default_rng(3).random((2, 5, 5, 1)).astype("float32")

    def run(reps):
        if kind == "smoothgrad":
            return gp.smoothgrad(model, x, 1, samples=reps, seed=0, batch_size=3,
                                 progress=False)
        return gp.integrated_gradients(model, x, [0, 2], steps=reps, batch_size=3,
                                       layer="fc" if kind == "layer_ig" else None,
                                       progress=False)

    run(4)  # traces what a chunk of 3 rows needs
    helpers = [interpolate, noisy, accumulate]
    traced = [f.experimental_get_tracing_count() for f in helpers]
    counts = []
    for reps in (4, 40, 120):  # 3, 27 and 80 chunks
        before = Counting.calls
        run(reps)
        counts.append(Counting.calls - before)
    assert [f.experimental_get_tracing_count() for f in helpers] == traced
    # Only the fixed eager forward passes on the original inputs run Python code:
    # no chunk retraces, no chunk runs eagerly.
    assert counts[0] == counts[1] == counts[2], counts
    assert counts[0] <= 4, counts


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np, keras
    from keras import layers
    import gradprobe as gp

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    keras.utils.set_random_seed(0)
    inp = keras.Input((48, 48, 3))
    h = layers.Conv2D(4, 3, strides=2, activation="relu")(inp)
    h = layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, layers.Dense(3)(h))
    x = np.random.default_rng(0).random((4, 48, 48, 3)).astype("float32")
    kind, small, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def run(reps):
        if kind == "ig":
            gp.integrated_gradients(model, x, 1, steps=reps, batch_size=16, progress=False)
        else:
            gp.smoothgrad(model, x, 1, samples=reps, seed=0, batch_size=16, progress=False)

    run(small)
    run(small)
    m1 = peak_mb()
    run(big)
    m2 = peak_mb()
    refused = ""
    try:
        if kind == "ig":
            gp.integrated_gradients(model, x, 1, steps=10**9)
        else:
            gp.smoothgrad(model, x, 1, samples=10**9)
    except gp.GradprobeError as e:
        refused = str(e)
    m3 = peak_mb()
    print(json.dumps({"small": m1, "big": m2, "refused": m3, "message": refused}))
""")


@pytest.mark.parametrize("kind", ["ig", "smoothgrad"])
def test_peak_memory_bounded_by_batch_size(kind, tmp_path):
    """10x the steps/samples with the same batch_size: the RSS high-water mark
    stays within a small margin (all rows at once would add about 4 x 10 x the
    small run's 128 rows x 27 KB, i.e. well over 100 MB)."""
    script = tmp_path / "memory.py"
    script.write_text(_MEMORY_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTEROP_THREADS="1",
               TF_NUM_INTRAOP_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(os.path.dirname(__file__), "..", "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script), kind, "32", "320"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    assert m["big"] - m["small"] < 40, m
    # steps/samples=10**9 at once is refused before anything is allocated.
    assert m["refused"] - m["big"] < 40, m
    assert "10,000,000,000" in m["message"] or "4,000,000,000" in m["message"], m
    assert "batch_size" in m["message"] and "GiB" in m["message"], m


def test_max_bytes_refuses_with_numbers_and_fix():
    model = _counting_model()
    x = np.random.default_rng(4).random((2, 5, 5, 1)).astype("float32")
    row = 5 * 5 * 1 * 4
    with pytest.raises(gp.GradprobeError) as e:
        gp.integrated_gradients(model, x, 0, steps=50, max_bytes=10 * row)
    msg = str(e.value)
    assert "100 modified inputs" in msg and f"{100 * row * 4:,} bytes" in msg, msg
    assert "max_bytes=" in msg and "batch_size" in msg
    # The same request in chunks that fit runs, and equals the one-chunk result.
    a = gp.integrated_gradients(model, x, 0, steps=50, batch_size=2, max_bytes=10 * row,
                                progress=False)
    b = gp.integrated_gradients(model, x, 0, steps=50, progress=False)
    assert_close(np.asarray(a), np.asarray(b), 1e-5)
    with pytest.raises(gp.GradprobeError, match="modified inputs per chunk"):
        gp.smoothgrad(model, x, 0, samples=50, max_bytes=10 * row)
    # Layer IG also counts the activation rows it interpolates (4 floats at 'fc').
    fits = 2 * row * 4 + 1
    gp.integrated_gradients(model, x, 0, steps=50, batch_size=2, max_bytes=fits, progress=False)
    with pytest.raises(gp.GradprobeError, match="layer='fc'"):
        gp.integrated_gradients(model, x, 0, steps=50, layer="fc", batch_size=2, max_bytes=fits)
    with pytest.raises(gp.GradprobeError, match="at most 1024 steps"):
        gp.integrated_gradients(model, x, 0, steps=10**9, method="gausslegendre")
