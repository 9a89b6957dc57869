"""A data loop over 32 different batch sizes: `gp.gradients` against a
hand-written `tf.function(reduce_retracing=True)` doing the same work (tape
gradient of the same per-example class scores with respect to the same
sources: the input and two kernels), in interleaved rounds (medians).

Each round starts cold on both sides (`gp.clear_cache()` and a new
`tf.function`), runs the 32 batch sizes once ("cold loop", traces included),
then once more ("warm loop", every shape already handled). The trace counts
of both sides are printed: requests that differ only in batch size (and in
their per-example classes) share one trace after the relaxed-shape retrace.

Target: gradprobe/hand-written <= 1.2 on the cold loop.

Usage: python benchmarks/bench_batch_sizes.py [--rounds N] [--sizes 32] [--max-batch 96]
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import gradprobe as gp  # noqa: E402
from _common import timed  # noqa: E402
from gradprobe.core import cache  # noqa: E402

WRT = ["inputs", "conv2.kernel", "fc.kernel"]


def cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(16, 3, activation="relu", name="conv1")(inp)
    h = keras.layers.MaxPooling2D(name="pool1")(h)
    h = keras.layers.Conv2D(32, 3, activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(name="pool2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(64, activation="relu", name="fc")(h)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(h), name="cnn")


def hand_written(model: keras.Model):
    kernels = [model.get_layer("conv2").kernel, model.get_layer("fc").kernel]

    @tf.function(reduce_retracing=True)
    def grads(x, classes):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=False)
            score = tf.reduce_sum(tf.gather(y, classes, axis=1, batch_dims=1))
        return tape.gradient(score, [x, *kernels])

    return grads


def run_gp(model, batches):
    for x, c in batches:
        g = gp.gradients(model, x, c, WRT)
        np.asarray(g["inputs"])


def run_hand(fn, batches):
    for x, c in batches:
        np.asarray(fn(x, c)[0])


def gp_traces(model) -> int:
    return sum(e.fn.experimental_get_tracing_count()
               for e in cache.entries_by_model.get(model, {}).values()
               if e.fn is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, default=32, help="distinct batch sizes")
    parser.add_argument("--max-batch", type=int, default=96)
    args = parser.parse_args()
    console = Console(width=150) if not Console().is_terminal else Console()
    model = cnn()
    rng = np.random.default_rng(0)
    sizes = rng.choice(np.arange(1, args.max_batch + 1), args.sizes, replace=False)
    batches = [(rng.random((int(n), 32, 32, 3), np.float32),
                rng.integers(0, 10, int(n)).astype(np.int32)) for n in sizes]

    # the same gradients on both sides
    hand = hand_written(model)
    for x, c in batches[:3]:
        ours, theirs = gp.gradients(model, x, c, WRT), hand(x, c)
        for key, t in zip(WRT, theirs):
            np.testing.assert_allclose(ours[key], t, rtol=1e-4,
                                       atol=1e-6 * float(np.abs(t).max()))

    load0 = os.getloadavg()[0]
    res = {k: {"cold": [], "warm": [], "cold_cpu": [], "warm_cpu": []} for k in ("gp", "hand")}
    traces = {}
    for r in range(args.rounds):
        order = ("gp", "hand") if r % 2 == 0 else ("hand", "gp")
        for side in order:
            if side == "gp":
                gp.clear_cache()
                fn, f_args = run_gp, (model, batches)
            else:
                hand = hand_written(model)
                fn, f_args = run_hand, (hand, batches)
            for phase in ("cold", "warm"):
                wall, cpu = timed(fn, *f_args)
                res[side][phase].append(wall)
                res[side][f"{phase}_cpu"].append(cpu)
            traces[side] = gp_traces(model) if side == "gp" else \
                hand.experimental_get_tracing_count()
        console.print(f"  round {r + 1}/{args.rounds} done", style="dim")
    load1 = os.getloadavg()[0]

    med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in res.items()}
    table = Table(title=f"{args.sizes} batch sizes in 1..{args.max_batch} (CNN 32x32x3, "
                        f"wrt={WRT}, per-example classes): median seconds per loop of "
                        f"{args.sizes} calls over {args.rounds} interleaved rounds")
    for col in ["loop", "gradprobe wall", "hand wall", "ratio wall", "gradprobe CPU",
                "hand CPU", "ratio CPU", "traces gp / hand"]:
        table.add_column(col, justify="left" if col == "loop" else "right")
    for phase in ("cold", "warm"):
        g, h = med["gp"], med["hand"]
        table.add_row(f"{phase} ({'traces included' if phase == 'cold' else 'all traced'})",
                      f"{g[phase]:.3f}", f"{h[phase]:.3f}", f"{g[phase] / h[phase]:.3f}",
                      f"{g[phase + '_cpu']:.3f}", f"{h[phase + '_cpu']:.3f}",
                      f"{g[phase + '_cpu'] / h[phase + '_cpu']:.3f}",
                      f"{traces['gp']} / {traces['hand']}")
    console.print(table)
    console.print(f"load average (1 min) {load0:.2f} before, {load1:.2f} after, "
                  f"{os.cpu_count()} CPUs. Target: cold ratio <= 1.2.")


if __name__ == "__main__":
    main()
