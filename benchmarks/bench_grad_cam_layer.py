"""`gp.grad_cam_layer` (one forward pass on one example, then a short tape query
per candidate from the end) against the previous rule, which ran gp.gradients
with every leaf layer's activation as a source ("*": one compiled forward and
backward pass over every layer) just to choose a name. Fresh models each round,
as the CLI and the report meet them; interleaved rounds.

Usage: python benchmarks/bench_grad_cam_layer.py [--rounds N]
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

MODELS = [("MobileNet", keras.applications.MobileNet, 64),
          ("MobileNetV3Small", keras.applications.MobileNetV3Small, 96),
          ("ResNet50", keras.applications.ResNet50, 64)]


def _zero(outputs):
    return tf.add_n([0.0 * tf.reduce_sum(tf.cast(t, tf.float32)) for t in tf.nest.flatten(outputs)])


def old_rule(model, x):
    """The previous grad_cam_layer: gradients w.r.t. every leaf activation."""
    g = gp.gradients(model, x, _zero, "*", unconnected="zero")
    spatial = [k for k in g.activations
               if g.kinds[k] == "activation" and len(g.activations[k].shape) == 4]
    return spatial[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    table = Table(title="grad_cam_layer: seconds per call on a fresh model (median)")
    for col in ("model", "old rule (s)", "old choice", "new (s)", "new choice", "speed-up"):
        table.add_column(col)
    for name, ctor, size in MODELS:
        old_t, new_t = [], []
        for _ in range(args.rounds):
            for which in ("old", "new"):
                keras.utils.set_random_seed(0)
                model = ctor(weights=None, input_shape=(size, size, 3))
                x = np.random.default_rng(0).random((1, size, size, 3)).astype("float32")
                start = time.perf_counter()
                if which == "old":
                    old_choice = old_rule(model, x)
                    old_t.append(time.perf_counter() - start)
                else:
                    new_choice = gp.grad_cam_layer(model, x)
                    new_t.append(time.perf_counter() - start)
                gp.clear_cache()
        o, n = statistics.median(old_t), statistics.median(new_t)
        table.add_row(name, f"{o:.2f}", old_choice, f"{n:.2f}", new_choice, f"{o / n:.1f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
