"""Grad-CAM and saliency on ResNet50(weights=None) at batch 8: gradprobe against
hand-written compiled tf.GradientTape code and against tf-keras-vis (same layer,
same class scores), in interleaved rounds.

Target: gradprobe within 1.15x the compiled baseline (and so several times
faster than tf-keras-vis, which runs eagerly).

tf-keras-vis is optional: `pip install -e ".[bench]"`; without it that column
says so. Usage: python benchmarks/bench_attribution.py [--rounds N] [--size 224]
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
    t0 = time.perf_counter()
    for _ in range(reps):
        np.asarray(fn(x))
    return (time.perf_counter() - t0) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    console = Console(width=150) if not Console().is_terminal else Console()
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(args.size, args.size, 3))
    x = tf.constant(np.random.default_rng(0).random((8, args.size, args.size, 3), np.float32))
    classes = np.arange(8) * 100
    cam_base, sal_base = baselines(model, classes)
    cam_vis, sal_vis, why = tf_keras_vis(model, classes)
    tasks = {
        "Grad-CAM": {"gradprobe": lambda xx: gp.grad_cam(model, xx, classes, LAYER),
                     "compiled": cam_base, "tf-keras-vis": cam_vis},
        "saliency": {"gradprobe": lambda xx: gp.saliency(model, xx, classes),
                     "compiled": sal_base, "tf-keras-vis": sal_vis},
    }
    ours = np.asarray(gp.grad_cam(model, x, classes, LAYER))
    np.testing.assert_allclose(ours, np.asarray(cam_base(x)), atol=1e-4)
    np.testing.assert_allclose(np.asarray(gp.saliency(model, x, classes)),
                               np.asarray(sal_base(x)), rtol=1e-4, atol=1e-7)
    rows = []
    for task, fns in tasks.items():
        fns = {k: f for k, f in fns.items() if f is not None}
        for f in fns.values():
            _time(f, x)
            _time(f, x)
        times = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, f in fns.items():
                times[k].append(_time(f, x))
        rows.append((task, {k: statistics.median(v) for k, v in times.items()}))
        console.print(f"  {task} done", style="dim")
    table = Table(title=f"ResNet50(weights=None), batch 8, {args.size}x{args.size}: "
                        "median seconds per call")
    for col in ["task", "gradprobe", "compiled", "tf-keras-vis", "gradprobe/compiled",
                "tf-keras-vis/gradprobe"]:
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, med in rows:
        vis = med.get("tf-keras-vis")
        table.add_row(task, f"{med['gradprobe']:.3f}", f"{med['compiled']:.3f}",
                      f"{vis:.3f}" if vis else why, f"{med['gradprobe'] / med['compiled']:.3f}",
                      f"{vis / med['gradprobe']:.2f}x" if vis else "-")
    console.print(table)
    console.print("target: gradprobe/compiled <= 1.15.")


if __name__ == "__main__":
    main()
