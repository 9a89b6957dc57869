"""`fit` with gp.GradientMonitor at every=1 and every=10 against `fit` without
it, on three models: a CIFAR-sized ResNet-20 (32x32x3, batch 64), a small
Transformer encoder (4 blocks, width 128, sequence 64, batch 32) and, as
information, a tiny CNN (28x28x1, batch 32). All variants of a model run on ONE
model instance (the monitor puts the model's own train function back after each
fit): separate but identical models differ in speed by a few percent on their
own. After a warm-up fit of each variant (tracing), fits of the variants are
timed in interleaved rounds. The order rotates from round to round (round r
starts with variant r, cyclically; every other cycle runs backwards), so over
any multiple of 5 rounds each variant runs once in each position: the first fit
of a round tends to run slower, and this puts that on every variant alike.

Rows: the plain fit (the baseline); the plain fit again (A/A control: its
"overhead" is the noise of the run); a do-nothing callback that reads the loss
on the host every step (the floor of any per-step monitor); the monitor at
every=1 and every=10. The load average of the machine is printed with each
table. The last lines are the table for benchmarks/README.md.

Targets (ResNet and Transformer): overhead at most +3% at every=1 and at most
+1% at every=10.

On the shared 2-core machines this runs on, the speed of the whole machine
changes from second to second, so whole-fit times of separate fits are not
comparable. The main estimate is therefore per step and paired: a clock
callback (in every variant, the baseline included) timestamps each step; each
fit gives its median step time; each round gives the ratio of a variant's
median step time to the baseline's in the same round; the table shows the
median and the interquartile range of those ratios over the rounds. The same
is shown for the process CPU time per step (all TensorFlow threads), which
other processes competing for the cores disturb much less than wall time.
`--threads 1` pins TensorFlow to one thread, which makes the machine's noise
smaller (the overhead itself does not depend on it).

Usage: python benchmarks/bench_monitor.py [--quick] [--models resnet,transformer,cnn]
       [--rounds N] [--steps S] [--threads T]

On JAX and PyTorch: `KERAS_BACKEND=jax` (or `torch`) `python benchmarks/bench_monitor.py
--models cnn` (the same variants and ratios; `--threads` sets PyTorch's threads, and is
refused on JAX, whose CPU threads are fixed when it starts).
`--quick`: ResNet-20 and the Transformer only, 10 steps x 5 rounds (about 4-5
minutes on an idle 2-core machine; the full run takes about 12).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import gradprobe as gp  # noqa: E402


def cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def resnet20() -> keras.Model:
    """ResNet-20 for CIFAR (He et al. 2016): 19 conv layers in 3 stages of 3
    basic blocks (16, 32, 64 filters), batch norm, and a dense classifier."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))

    def conv_bn(h, filters, strides=1, relu=True):
        h = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization()(h)
        return keras.layers.ReLU()(h) if relu else h

    h = conv_bn(inputs, 16)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage and block == 0 else 1
            shortcut = h
            if strides != 1:
                shortcut = keras.layers.Conv2D(filters, 1, strides=strides, use_bias=False)(h)
            out = conv_bn(conv_bn(h, filters, strides), filters, relu=False)
            h = keras.layers.ReLU()(keras.layers.Add()([out, shortcut]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(10)(h), name="resnet20")
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class AddPositions(keras.layers.Layer):
    """Adds a learned embedding of each position (a layer, so that the model is
    symbolic on every backend: an Embedding called on a concrete `arange` would
    be one eager tensor, which PyTorch cannot differentiate twice)."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=tuple(input_shape[1:]), name="positions")

    def call(self, x):
        return x + self.table[None]


def transformer() -> keras.Model:
    """A Transformer encoder: token + position embeddings, 4 blocks of width
    128 (4 heads, feed-forward 512, pre-layer-norm), mean pooling, classifier."""
    keras.utils.set_random_seed(0)
    seq, width, vocab = 64, 128, 1000
    tokens = keras.Input((seq,), dtype="int32")
    h = AddPositions()(keras.layers.Embedding(vocab, width)(tokens))
    for _ in range(4):
        a = keras.layers.LayerNormalization()(h)
        a = keras.layers.MultiHeadAttention(4, width // 4)(a, a)
        h = h + a
        f = keras.layers.LayerNormalization()(h)
        f = keras.layers.Dense(4 * width, activation="gelu")(f)
        h = h + keras.layers.Dense(width)(f)
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization()(h))
    model = keras.Model(tokens, keras.layers.Dense(10)(h), name="transformer")
    model.compile(keras.optimizers.AdamW(1e-4),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def make_data(name: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if name == "transformer":
        x = rng.integers(0, 1000, size=(n, 64)).astype("int32")
    elif name == "resnet":
        x = rng.random((n, 32, 32, 3), dtype=np.float32)
    else:
        x = rng.random((n, 28, 28, 1), dtype=np.float32)
    return x, rng.integers(0, 10, size=n)


# name: (builder, batch, default steps per fit, default rounds)
MODELS = {
    "resnet": (resnet20, 64, 15, 10),
    "transformer": (transformer, 32, 20, 10),
    "cnn": (cnn, 32, 100, 5),
}
# --quick: the two target models, fewer steps and rounds (about 4-5 minutes on an
# idle 2-core machine).
QUICK = {"models": "resnet,transformer", "steps": 10, "rounds": 5}


class StepClock(keras.callbacks.Callback):
    """Timestamps the start of every step (in every variant)."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.times.append(time.perf_counter())

    def on_train_end(self, logs=None):
        self.times.append(time.perf_counter())


class ReadLoss(keras.callbacks.Callback):
    """The floor of any per-step monitor: a callback that reads one scalar (the
    loss) on the host after every step."""

    def on_train_batch_end(self, batch, logs=None):
        self.last = float(logs["loss"])


def run(model, callbacks, clock, x, y, steps, batch):
    gc.collect()
    clock.times = []
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(x[:steps * batch], y[:steps * batch], batch_size=batch, epochs=1, verbose=0,
              shuffle=False, callbacks=[*callbacks, clock])
    whole, cpu = time.perf_counter() - t0, time.process_time() - c0
    # the first step starts the input pipeline
    return whole, float(np.median(np.diff(clock.times)[1:])), cpu / steps


def rotation(names: list[str], r: int) -> list[str]:
    """The order of round `r`: starts at variant `r` (cyclically); every other
    full cycle backwards. Over a multiple of len(names) rounds, each variant
    runs once in each position."""
    shift = r % len(names)
    order = names[shift:] + names[:shift]
    return order[::-1] if (r // len(names)) % 2 else order


BASE = "no monitor"
CONTROL = "no monitor (A/A control)"
FLOOR = "callback reading the loss"


def bench(name: str, args: argparse.Namespace, console: Console) -> dict[str, tuple]:
    """Times the variants of one model; returns variant -> (wall ratio - 1, its
    IQR, CPU ratio - 1, its IQR, median step ms)."""
    build, batch, steps, rounds = MODELS[name]
    steps, rounds = args.steps or steps, args.rounds or rounds
    x, y = make_data(name, steps * batch, np.random.default_rng(0))
    # ONE model for every variant: the monitor puts the model's own train function
    # back after each fit, so plain and monitored fits alternate on the same
    # variables and the same compiled plain function (separate model instances
    # differ in speed by a few percent on their own: see the A/A control row).
    model = build()
    clock = StepClock()
    variants = {
        BASE: [],
        CONTROL: [],
        FLOOR: [ReadLoss()],
        "monitor every=1": [gp.GradientMonitor(every=1)],
        "monitor every=10": [gp.GradientMonitor(every=10)],
    }
    n_vars = len(model.trainable_weights)
    for callbacks in variants.values():  # warm-up: tracing
        model.fit(x[:batch * 4], y[:batch * 4], batch_size=batch, verbose=0,
                  callbacks=[*callbacks, clock])
    load0 = os.getloadavg()[0]
    step = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for r in range(rounds):
        for k in rotation(list(variants), r):
            _, s, c = run(model, variants[k], clock, x, y, steps, batch)
            step[k].append(s)
            cpu[k].append(c)
    load1 = os.getloadavg()[0]
    threads = args.threads or "default"
    table = Table(title=f"{name} on {keras.backend.backend()}: {n_vars} trainable variables, "
                        f"fit of {steps} steps of batch {batch}, {rounds} rounds, threads: "
                        f"{threads}, load "
                        f"average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} CPUs")
    for col in ("variant", "median step ms", "step overhead (paired median)", "IQR",
                "CPU ms/step", "CPU overhead (paired median)", "IQR "):
        table.add_column(col, justify="left" if col == "variant" else "right")
    out = {}
    for k in variants:
        first = k == BASE
        cells, summary = [], []
        for values in (step, cpu):
            ratios = np.array(values[k]) / np.array(values[BASE])
            q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
            cells += [f"{statistics.median(values[k]) * 1e3:.2f}",
                      "-" if first else f"{q2 - 1:+.1%}",
                      "-" if first else f"{q1 - 1:+.1%} .. {q3 - 1:+.1%}"]
            summary += [q2 - 1, (q1 - 1, q3 - 1)]
        table.add_row(k, *cells)
        out[k] = (*summary, statistics.median(step[k]) * 1e3, load0, load1)
    console.print(table)
    return out


def markdown(results: dict[str, dict[str, tuple]]) -> str:
    """The table of benchmarks/README.md: one row per model."""
    lines = ["| model | plain step | every=1 wall (CPU) | every=10 wall (CPU) | "
             "reading the loss wall (CPU) | A/A control wall (CPU) | load average |",
             "|---|---|---|---|---|---|---|"]
    for name, out in results.items():
        def cell(k, out=out):
            wall, _, cpu_, _, *_ = out[k]
            return f"{wall:+.1%} ({cpu_:+.1%})"
        base = out[BASE]
        lines.append(f"| {name} | {base[4]:.0f} ms | {cell('monitor every=1')} | "
                     f"{cell('monitor every=10')} | {cell(FLOOR)} | {cell(CONTROL)} | "
                     f"{base[5]:.1f} -> {base[6]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,transformer,cnn",
                        help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--rounds", type=int, default=0, help="0: the model's default")
    parser.add_argument("--steps", type=int, default=0, help="steps per fit; 0: the default")
    parser.add_argument("--threads", type=int, default=0,
                        help="TensorFlow intra- and inter-op threads, or PyTorch's threads "
                             "(0: the backend's default)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['models']}, {QUICK['steps']} steps, {QUICK['rounds']} "
                             "rounds (explicit --models/--steps/--rounds win)")
    args = parser.parse_args()
    if args.quick:
        if args.models == parser.get_default("models"):
            args.models = QUICK["models"]
        args.steps = args.steps or QUICK["steps"]
        args.rounds = args.rounds or QUICK["rounds"]
    if args.threads and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    elif args.threads and keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(args.threads)
    elif args.threads:
        parser.error(f"--threads is not supported on {keras.backend.backend()}")
    console = Console(width=150) if not Console().is_terminal else Console()
    names = args.models.split(",")
    for name in names:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    start = time.perf_counter()
    results = {name: bench(name, args, console) for name in names}
    console.print("targets (resnet, transformer): overhead <= +3% at every=1, <= +1% at "
                  "every=10; the tiny CNN is information. The A/A control row is a second "
                  "measurement of the plain fit: its spread is the noise of this run.")
    print(markdown(results))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
