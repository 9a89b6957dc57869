"""Per-example weight-gradient norms on a small CNN: gradprobe (ghost norms from
each layer's input and output gradient, one forward and one backward pass)
against hand-written compiled `tf.vectorized_map` of per-example tape gradients
and against `tape.jacobian`, at batch 16, 64 and 256, in interleaved rounds.

Targets: at least 5x faster than vectorized_map at batch 256, and time growing
no faster than linearly with the batch size.

Usage: python benchmarks/bench_per_example.py [--rounds N] [--batches 16,64,256]
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
    gradient norms are what DP-SGD clips)."""
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
    variables = model.trainable_weights

    @tf.function
    def vmap(x, y):
        def one(args):
            xi, yi = args
            with tf.GradientTape() as t:
                loss = loss_fn(yi[None], model(xi[None]))
            return [tf.norm(g) for g in t.gradient(loss, [v.value for v in variables])]

        return tf.vectorized_map(one, (x, y))

    @tf.function
    def jac(x, y):
        with tf.GradientTape() as t:
            losses = loss_fn(y, model(x))
        js = t.jacobian(losses, [v.value for v in variables])
        return [tf.norm(tf.reshape(j, [tf.shape(j)[0], -1]), axis=1) for j in js]

    return vmap, jac


def _time(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
        for v in tf.nest.flatten(out if not isinstance(out, gp.PerExampleNorms)
                                 else list(out.values())):
            np.asarray(v)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--models", default="cnn,dp_cnn,mnist_convnet")
    parser.add_argument("--jacobian-max-batch", type=int, default=256,
                        help="skip the (slow) tape.jacobian baseline above this batch")
    args = parser.parse_args()
    console = Console(width=150) if not Console().is_terminal else Console()
    for name in args.models.split(","):
        bench(MODELS[name](), args, console)
    console.print("targets: vmap/gradprobe >= 5x at batch 256; time per example not growing. "
                  "'floor' is one compiled forward+backward of the summed loss (batch "
                  "gradients only): no per-example method can be faster.")


def bench(model, args, console) -> None:
    vmap, jac = baselines(model)
    variables = model.trainable_weights

    @tf.function
    def floor(x, y):
        with tf.GradientTape() as t:
            loss = tf.reduce_sum(loss_fn(y, model(x)))
        return t.gradient(loss, [v.value for v in variables])

    rng = np.random.default_rng(0)
    rows = []
    for b in [int(s) for s in args.batches.split(",")]:
        x = tf.constant(rng.random((b, 28, 28, 1), dtype=np.float32))
        y = tf.constant(rng.integers(0, 10, size=b))
        target = gp.loss(loss_fn, y)
        fns = {
            "gradprobe": lambda x=x, target=target: gp.per_example_norms(model, x, target),
            "vectorized_map": lambda x=x, y=y: vmap(x, y),
            "jacobian": lambda x=x, y=y: jac(x, y),
            "floor": lambda x=x, y=y: floor(x, y),
        }
        if b > args.jacobian_max_batch:
            del fns["jacobian"]
        # Same numbers from all three.
        ours = gp.per_example_norms(model, x, target)
        ref = vmap(x, y)
        for key, r in zip(ours, ref):
            np.testing.assert_allclose(ours[key], r, rtol=2e-3, atol=1e-5)
        for fn in fns.values():
            _time(fn, 2)
        reps = max(1, int(0.3 / max(_time(fns["gradprobe"], 1), 1e-4)))
        times = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                times[k].append(_time(fn, reps))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((b, med))
        console.print(f"  {model.name}: batch {b} done", style="dim")
    table = Table(title=f"{model.name}: per-example weight-gradient norms "
                        "(median seconds per call)")
    for col in ["batch", "gradprobe", "vectorized_map", "jacobian", "floor", "vmap/gradprobe",
                "jacobian/gradprobe", "gradprobe/floor", "gradprobe per example"]:
        table.add_column(col, justify="right")
    for b, med in rows:
        jac_s = med.get("jacobian")
        table.add_row(str(b), f"{med['gradprobe']:.4f}", f"{med['vectorized_map']:.4f}",
                      f"{jac_s:.4f}" if jac_s else "skipped", f"{med['floor']:.4f}",
                      f"{med['vectorized_map'] / med['gradprobe']:.1f}x",
                      f"{jac_s / med['gradprobe']:.1f}x" if jac_s else "-",
                      f"{med['gradprobe'] / med['floor']:.2f}",
                      f"{med['gradprobe'] / b * 1e6:.0f} us")
    console.print(table)
    console.print(f"method per weight: {dict(gp.per_example_norms(model, x, target).method)}")


if __name__ == "__main__":
    main()
