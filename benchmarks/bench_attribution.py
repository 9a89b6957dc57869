"""Grad-CAM, saliency, Integrated Gradients and SmoothGrad on
ResNet50(weights=None): gradprobe against hand-written compiled tf.GradientTape
code doing the same work (for IG and SmoothGrad: one tf.function that loops over
the same chunks of interpolated or noisy inputs) and, for Grad-CAM and saliency,
against tf-keras-vis (same layer, same class scores), in interleaved rounds.

Grad-CAM and saliency run on a batch of 8; IG (64 steps) and SmoothGrad (32
samples) on `--images` images in chunks of `--chunk` rows.

Target: gradprobe within 1.15x the compiled baseline (and so several times
faster than tf-keras-vis, which runs eagerly).

tf-keras-vis is optional: `pip install -e ".[bench]"`; without it that column
says so. Usage: python benchmarks/bench_attribution.py [--rounds N] [--size 224]
[--images 4] [--chunk 32] [--tasks gradcam,saliency,ig,smoothgrad]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import gradprobe as gp  # noqa: E402

LAYER = "conv5_block3_out"


def baselines(model, classes):
    probe = keras.Model(model.inputs, [model.get_layer(LAYER).output, model.output])
    idx = tf.constant(classes)

    @tf.function
    def cam(x):
        with tf.GradientTape() as t:
            a, y = probe(x, training=False)
            t.watch(a)
            score = tf.reduce_sum(tf.gather(y, idx, axis=1, batch_dims=1))
        g = t.gradient(score, a)
        m = tf.nn.relu(tf.reduce_sum(tf.reduce_mean(g, axis=[1, 2], keepdims=True) * a, -1))
        m = tf.image.resize(m[..., None], x.shape[1:3])[..., 0]
        lo = tf.reduce_min(m, axis=[1, 2], keepdims=True)
        hi = tf.reduce_max(m, axis=[1, 2], keepdims=True)
        return tf.math.divide_no_nan(m - lo, hi - lo)

    @tf.function
    def saliency(x):
        with tf.GradientTape() as t:
            t.watch(x)
            y = model(x, training=False)
            score = tf.reduce_sum(tf.gather(y, idx, axis=1, batch_dims=1))
        return tf.reduce_max(tf.abs(t.gradient(score, x)), axis=-1)

    return cam, saliency


def batched_baselines(model, classes, n, steps, samples, chunk, noise=0.15, seed=0):
    """IG and SmoothGrad written by hand: each one tf.function looping over
    chunks of `chunk` rows (`chunk // n` steps or samples of all `n` images)."""
    k = chunk // n
    idx = tf.constant(np.tile(classes, k))

    def grad(rows):
        with tf.GradientTape() as t:
            t.watch(rows)
            y = model(rows, training=False)
            score = tf.reduce_sum(tf.gather(y, idx, axis=1, batch_dims=1))
        return t.gradient(score, rows)

    alphas = np.linspace(0.0, 1.0, steps)
    w = np.full(steps, 1.0 / (steps - 1))
    w[[0, -1]] *= 0.5
    alphas, w = tf.constant(alphas, tf.float32), tf.constant(w, tf.float32)

    @tf.function
    def ig(x):
        base = tf.zeros_like(x)
        total = tf.zeros_like(x)
        for c in tf.range(steps // k):
            a = tf.reshape(alphas[c * k:(c + 1) * k], [k, 1, 1, 1, 1])
            path = tf.reshape(base[None] + a * (x - base)[None], [k * n, *x.shape[1:]])
            g = tf.reshape(grad(path), [k, n, *x.shape[1:]])
            total += tf.tensordot(w[c * k:(c + 1) * k], g, axes=1)
        return (x - base) * total

    @tf.function
    def smooth(x):
        axes = [1, 2, 3]
        span = tf.reduce_max(x, axes, keepdims=True) - tf.reduce_min(x, axes, keepdims=True)
        total = tf.zeros_like(x)
        for c in tf.range(samples // k):
            eps = tf.random.stateless_normal([k, *x.shape], tf.stack([seed, c]))
            rows = tf.reshape(x[None] + noise * span[None] * eps, [k * n, *x.shape[1:]])
            total += tf.reduce_sum(tf.reshape(grad(rows), [k, n, *x.shape[1:]]), 0) / samples
        return tf.reduce_max(tf.abs(total), axis=-1)

    return ig, smooth


def tf_keras_vis(model, classes):
    try:
        from tf_keras_vis.gradcam import Gradcam
        from tf_keras_vis.saliency import Saliency
        from tf_keras_vis.utils.scores import CategoricalScore
    except ImportError as e:  # pragma: no cover - optional
        return None, None, f"not installed ({e}); pip install -e '.[bench]'"
    score = CategoricalScore(list(classes))
    gradcam, sal = Gradcam(model, clone=False), Saliency(model, clone=False)
    return (lambda x: gradcam(score, x, penultimate_layer=LAYER),
            lambda x: sal(score, x), "")


def _time(fn, x, reps=1):
    """(wall, CPU) seconds per call; CPU counts every thread of the process."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        np.asarray(fn(x))
    return (time.perf_counter() - t0) / reps, (time.process_time() - c0) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4, help="images for IG and SmoothGrad")
    parser.add_argument("--chunk", type=int, default=32, help="rows per chunk (batch_size)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--tasks", default="gradcam,saliency,ig,smoothgrad")
    args = parser.parse_args()
    wanted = set(args.tasks.split(","))
    n, chunk = args.images, args.chunk
    if chunk % n or args.steps % (chunk // n) or args.samples % (chunk // n):
        parser.error("--chunk must be a multiple of --images, and --steps and --samples "
                     "multiples of chunk/images (the baseline has no partial chunks)")
    console = Console(width=150) if not Console().is_terminal else Console()
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(args.size, args.size, 3))
    x = tf.constant(np.random.default_rng(0).random((8, args.size, args.size, 3), np.float32))
    classes = np.arange(8) * 100
    cam_base, sal_base = baselines(model, classes)
    cam_vis, sal_vis, why = tf_keras_vis(model, classes)
    xs, cls = x[:n], classes[:n]
    ig_base, sg_base = batched_baselines(model, cls, n, args.steps, args.samples, chunk)
    tasks = {
        "Grad-CAM": ({"gradprobe": lambda xx: gp.grad_cam(model, xx, classes, LAYER),
                      "compiled": cam_base, "tf-keras-vis": cam_vis}, x),
        "saliency": ({"gradprobe": lambda xx: gp.saliency(model, xx, classes),
                      "compiled": sal_base, "tf-keras-vis": sal_vis}, x),
        f"IG ({args.steps} steps)": ({
            "gradprobe": lambda xx: gp.integrated_gradients(
                model, xx, cls, steps=args.steps, batch_size=chunk, progress=False),
            "compiled": ig_base}, xs),
        f"SmoothGrad ({args.samples} samples)": ({
            "gradprobe": lambda xx: gp.smoothgrad(
                model, xx, cls, samples=args.samples, batch_size=chunk, seed=0,
                progress=False),
            "compiled": sg_base}, xs),
    }
    keep = {"gradcam": "Grad-CAM", "saliency": "saliency", "ig": "IG", "smoothgrad": "SmoothGrad"}
    tasks = {k: v for k, v in tasks.items()
             if any(k.startswith(keep[w]) for w in wanted if w in keep)}
    if "Grad-CAM" in tasks:
        ours = np.asarray(gp.grad_cam(model, x, classes, LAYER))
        np.testing.assert_allclose(ours, np.asarray(cam_base(x)), atol=1e-4)
    if "saliency" in tasks:
        np.testing.assert_allclose(np.asarray(gp.saliency(model, x, classes)),
                                   np.asarray(sal_base(x)), rtol=1e-4, atol=1e-7)
    if "ig" in wanted:  # the same interpolation points: the same attributions
        ours = np.asarray(gp.integrated_gradients(model, xs, cls, steps=args.steps,
                                                  batch_size=chunk, progress=False))
        theirs = np.asarray(ig_base(xs))
        np.testing.assert_allclose(ours, theirs, atol=1e-4 * float(np.abs(theirs).max()))
    rows = []
    load0 = os.getloadavg()[0]
    for task, (fns, x) in tasks.items():
        fns = {k: f for k, f in fns.items() if f is not None}
        for f in fns.values():
            _time(f, x)
            _time(f, x)
        times = {k: [] for k in fns}
        cpu = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, f in fns.items():
                wall, c = _time(f, x)
                times[k].append(wall)
                cpu[k].append(c)
        med = {k: statistics.median(v) for k, v in times.items()}
        med.update({f"{k} cpu": statistics.median(v) for k, v in cpu.items()})
        rows.append((task, med))
        console.print(f"  {task} done", style="dim")
    table = Table(title=f"ResNet50(weights=None), {args.size}x{args.size}, Grad-CAM/saliency "
                        f"on 8 images, IG/SmoothGrad on {n} in chunks of {chunk}: median "
                        f"seconds per call over {args.rounds} rounds")
    for col in ["task", "gradprobe", "compiled", "tf-keras-vis", "gradprobe/compiled",
                "gradprobe/compiled CPU", "tf-keras-vis/gradprobe"]:
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, med in rows:
        vis = med.get("tf-keras-vis")
        table.add_row(task, f"{med['gradprobe']:.3f}", f"{med['compiled']:.3f}",
                      f"{vis:.3f}" if vis else (why or "-"), f"{med['gradprobe'] / med['compiled']:.3f}",
                      f"{med['gradprobe cpu'] / med['compiled cpu']:.3f}",
                      f"{vis / med['gradprobe']:.2f}x" if vis else "-")
    console.print(table)
    console.print(f"load average (1 min) {load0:.2f} before, {os.getloadavg()[0]:.2f} after, "
                  f"{os.cpu_count()} CPUs. target: gradprobe/compiled <= 1.15.")


if __name__ == "__main__":
    main()
