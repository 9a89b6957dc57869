"""Per-example weight gradients on small CNNs: `gp.gradients(..., per_example=True)`
against hand-written compiled `tf.vectorized_map` of per-example tape gradients,
at batch 16, 64 and 256, in interleaved rounds (medians).

Also shown: `per_example="jacobian"` (the fallback method: the vectorised
Jacobian of the per-example losses), and the floor, one compiled forward and
backward pass of the summed loss (batch gradients only). With `--norms`, a
second table compares `gp.per_example_norms` (ghost norms) with the norms of
the hand-written `tf.vectorized_map` gradients.

Targets: gradprobe/vectorized_map <= 1.1 at every batch, and time growing
linearly with the batch size (time per example not growing).

Usage: python benchmarks/bench_per_example.py [--rounds N] [--batches 16,64,256] [--norms]
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


def cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(16, 3, activation="relu", name="conv1")(inp)
    h = keras.layers.MaxPooling2D(name="pool1")(h)
    h = keras.layers.Conv2D(32, 3, activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(name="pool2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(64, activation="relu", name="fc")(h)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(h), name="cnn")


def dp_cnn() -> keras.Model:
    """The CNN of the TensorFlow Privacy DP-SGD MNIST tutorial (per-example
    gradients are what DP-SGD clips)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(16, 8, strides=2, padding="same", activation="relu", name="conv1")(inp)
    h = keras.layers.MaxPooling2D(2, 1, name="pool1")(h)
    h = keras.layers.Conv2D(32, 4, strides=2, activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(2, 1, name="pool2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(32, activation="relu", name="fc")(h)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(h), name="dp_cnn")


def mnist_convnet() -> keras.Model:
    """The classic Keras MNIST convnet (conv32-conv64-pool-dense128): its wide
    dense layer is where per-example gradients are expensive to materialise."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(32, 3, activation="relu", name="conv1")(inp)
    h = keras.layers.Conv2D(64, 3, activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(128, activation="relu", name="fc")(h)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(h), name="mnist_convnet")


MODELS = {"cnn": cnn, "dp_cnn": dp_cnn, "mnist_convnet": mnist_convnet}


def loss_fn(y, logits):
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def baselines(model):
    """Hand-written compiled functions: per-example gradients by
    tf.vectorized_map, and the floor (one batch gradient)."""
    variables = model.trainable_weights

    @tf.function
    def vmap(x, y):
        def one(args):
            xi, yi = args
            with tf.GradientTape() as t:
                loss = tf.reduce_sum(loss_fn(yi[None], model(xi[None])))
            return t.gradient(loss, [v.value for v in variables])

        return tf.vectorized_map(one, (x, y))

    @tf.function
    def floor(x, y):
        with tf.GradientTape() as t:
            loss = tf.reduce_sum(loss_fn(y, model(x)))
        return t.gradient(loss, [v.value for v in variables])

    return vmap, floor


def _time(fn, reps):
    """(wall, CPU) seconds per call; CPU counts every thread of the process."""
    def run():
        for _ in range(reps):
            out = fn()
            for v in (out.values() if hasattr(out, "values") and callable(out.values)
                      else tf.nest.flatten(out)):
                np.asarray(v)

    wall, cpu = timed(run)
    return wall / reps, cpu / reps


def _medians(fns, rounds):
    for fn in fns.values():  # trace and warm up
        _time(fn, 1)
    # About 0.3 s per measurement for each method (one call for the slow ones).
    reps = {k: max(1, int(0.3 / max(_time(fn, 1)[0], 1e-4))) for k, fn in fns.items()}
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(rounds):  # interleaved: every method once per round
        for k, fn in fns.items():
            wall, c = _time(fn, reps[k])
            times[k].append(wall)
            cpu[k].append(c)
    med = {k: statistics.median(v) for k, v in times.items()}
    med.update({f"{k} cpu": statistics.median(v) for k, v in cpu.items()})
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--models", default="cnn,dp_cnn,mnist_convnet")
    parser.add_argument("--jacobian-max-batch", type=int, default=64,
                        help="skip the (slow) Jacobian method above this batch")
    parser.add_argument("--max-mb", type=float, default=400,
                        help="skip a batch whose per-example gradients (float32) exceed this")
    parser.add_argument("--norms", action="store_true",
                        help="also compare gp.per_example_norms with vectorized_map norms")
    args = parser.parse_args()
    console = Console(width=160) if not Console().is_terminal else Console()
    for name in args.models.split(","):
        model = MODELS[name]()
        bench(model, args, console)
        if args.norms:
            bench_norms(model, args, console)
    console.print(f"load average (1 min) now {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs.")
    console.print("target: gradprobe/vmap <= 1.1 at every batch, time per example not "
                  "growing. 'floor' is one compiled forward+backward of the summed loss "
                  "(batch gradients only).")


def bench(model, args, console) -> None:
    vmap, floor = baselines(model)
    rng = np.random.default_rng(0)
    rows = []
    params = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    for b in [int(s) for s in args.batches.split(",")]:
        if b * params * 4 / 2**20 > args.max_mb:
            console.print(f"  {model.name}: batch {b} skipped: its per-example gradients take "
                          f"{b * params * 4 / 2**20:.0f} MB (> --max-mb {args.max_mb:g})")
            continue
        x = tf.constant(rng.random((b, 28, 28, 1), dtype=np.float32))
        y = tf.constant(rng.integers(0, 10, size=b))
        target = gp.loss(loss_fn, y)
        fns = {
            "gradprobe": lambda x=x, t=target: gp.gradients(model, x, t, "*.weights",
                                                            per_example=True),
            "vectorized_map": lambda x=x, y=y: vmap(x, y),
            "jacobian": lambda x=x, t=target: gp.gradients(model, x, t, "*.weights",
                                                           per_example="jacobian"),
            "floor": lambda x=x, y=y: floor(x, y),
        }
        if b > args.jacobian_max_batch:
            del fns["jacobian"]
        ours = gp.gradients(model, x, target, "*.weights", per_example=True)
        ref = vmap(x, y)
        assert len(ours) == len(ref)
        for g, r in zip(ours.values(), ref):  # same numbers
            np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-5)
        med = _medians(fns, args.rounds)
        rows.append((b, med))
        console.print(f"  {model.name}: batch {b} done", style="dim")
    table = Table(title=f"{model.name}: per-example weight gradients, "
                        "gp.gradients(per_example=True) (median seconds per call)")
    for col in ["batch", "gradprobe", "vectorized_map", "jacobian", "floor",
                "gradprobe/vmap", "gradprobe/vmap CPU", "jacobian/gradprobe",
                "gradprobe/floor", "gradprobe per example"]:
        table.add_column(col, justify="right")
    for b, med in rows:
        jac_s = med.get("jacobian")
        table.add_row(str(b), f"{med['gradprobe']:.4f}", f"{med['vectorized_map']:.4f}",
                      f"{jac_s:.4f}" if jac_s else "skipped", f"{med['floor']:.4f}",
                      f"{med['gradprobe'] / med['vectorized_map']:.2f}",
                      f"{med['gradprobe cpu'] / med['vectorized_map cpu']:.2f}",
                      f"{jac_s / med['gradprobe']:.1f}x" if jac_s else "-",
                      f"{med['gradprobe'] / med['floor']:.2f}",
                      f"{med['gradprobe'] / b * 1e6:.0f} us")
    console.print(table)
    console.print(f"method per weight: {dict(ours.per_example_method)}")


def bench_norms(model, args, console) -> None:
    vmap, floor = baselines(model)

    @tf.function
    def vmap_norms(x, y):
        return [tf.norm(tf.reshape(g, [tf.shape(g)[0], -1]), axis=1) for g in vmap(x, y)]

    rng = np.random.default_rng(0)
    rows = []
    for b in [int(s) for s in args.batches.split(",")]:
        x = tf.constant(rng.random((b, 28, 28, 1), dtype=np.float32))
        y = tf.constant(rng.integers(0, 10, size=b))
        target = gp.loss(loss_fn, y)
        fns = {"gradprobe": lambda x=x, t=target: gp.per_example_norms(model, x, t),
               "vectorized_map": lambda x=x, y=y: vmap_norms(x, y),
               "floor": lambda x=x, y=y: floor(x, y)}
        ours = gp.per_example_norms(model, x, target)
        for key, r in zip(ours, vmap_norms(x, y)):
            np.testing.assert_allclose(ours[key], r, rtol=2e-3, atol=1e-5)
        rows.append((b, _medians(fns, args.rounds)))
    table = Table(title=f"{model.name}: per-example gradient norms, gp.per_example_norms "
                        "(median seconds per call)")
    for col in ["batch", "gradprobe", "vectorized_map", "floor", "vmap/gradprobe",
                "gradprobe/floor"]:
        table.add_column(col, justify="right")
    for b, med in rows:
        table.add_row(str(b), f"{med['gradprobe']:.4f}", f"{med['vectorized_map']:.4f}",
                      f"{med['floor']:.4f}", f"{med['vectorized_map'] / med['gradprobe']:.1f}x",
                      f"{med['gradprobe'] / med['floor']:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
