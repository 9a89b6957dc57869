"""`fit` of a small CNN for 200 steps with gp.GradientMonitor at every=1 and
every=10 against `fit` without it. Each variant has its own model and callbacks,
built and warmed up (traced) once; then 200-step fits of the variants are timed
in interleaved rounds (the order alternates from round to round).

Targets: overhead at most 10% at every=1 and at most 3% at every=10.

On the 2-core machines this runs on, the speed of the whole machine changes from
second to second (whole fits alternate between about 1.5 s and 2.6 s, with or
without the monitor), so whole-fit times of separate fits are not comparable.
The main estimate is therefore per step and paired: a clock callback (in every
variant, the baseline included) timestamps each step; each fit gives its median
step time; each round gives the ratio of a variant's median step time to the
baseline's in the same round; the table shows the median and the interquartile
range of those ratios over the rounds. Whole-fit minimum and median are shown too.
`--threads 1` pins TensorFlow to one thread, which makes the machine's noise much
smaller (the overhead itself does not depend on it).

Usage: python benchmarks/bench_monitor.py [--rounds N] [--steps 200] [--threads T]
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


class StepClock(keras.callbacks.Callback):
    """Timestamps the start of every step (in every variant)."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.times.append(time.perf_counter())

    def on_train_end(self, logs=None):
        self.times.append(time.perf_counter())


def run(model, callbacks, clock, x, y, steps, batch):
    gc.collect()
    clock.times = []
    t0 = time.perf_counter()
    model.fit(x[:steps * batch], y[:steps * batch], batch_size=batch, epochs=1, verbose=0,
              shuffle=False, callbacks=[*callbacks, clock])
    whole = time.perf_counter() - t0
    return whole, float(np.median(np.diff(clock.times)[1:]))  # the first step starts the input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0,
                        help="TensorFlow intra- and inter-op threads (0: TensorFlow's default)")
    args = parser.parse_args()
    if args.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.random((args.steps * args.batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=args.steps * args.batch)
    variants = {
        "no monitor": (cnn(), [], StepClock()),
        "monitor every=1": (cnn(), [gp.GradientMonitor(every=1)], StepClock()),
        "monitor every=10": (cnn(), [gp.GradientMonitor(every=10)], StepClock()),
    }
    for model, callbacks, clock in variants.values():  # warm-up: tracing
        model.fit(x[:args.batch * 4], y[:args.batch * 4], batch_size=args.batch, verbose=0,
                  callbacks=[*callbacks, clock])
    whole = {k: [] for k in variants}
    step = {k: [] for k in variants}
    for r in range(args.rounds):
        for k in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            model, callbacks, clock = variants[k]
            w, s = run(model, callbacks, clock, x, y, args.steps, args.batch)
            whole[k].append(w)
            step[k].append(s)
    base = "no monitor"
    console = Console(width=130) if not Console().is_terminal else Console()
    threads = args.threads or "default"
    table = Table(title=f"fit, {args.steps} steps of batch {args.batch}, {args.rounds} rounds, "
                        f"TensorFlow threads: {threads}")
    for col in ("variant", "median step ms", "step overhead (paired median)", "IQR",
                "fit min s", "fit median s", "overhead (fit min)"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for k in variants:
        ratios = np.array(step[k]) / np.array(step[base])
        q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
        first = k == base
        table.add_row(k, f"{statistics.median(step[k]) * 1e3:.3f}",
                      "-" if first else f"{q2 - 1:+.1%}",
                      "-" if first else f"{q1 - 1:+.1%} .. {q3 - 1:+.1%}",
                      f"{min(whole[k]):.3f}", f"{statistics.median(whole[k]):.3f}",
                      "-" if first else f"{min(whole[k]) / min(whole[base]) - 1:+.1%}")
    console.print(table)
    console.print("targets: overhead <= 10% at every=1, <= 3% at every=10.")


if __name__ == "__main__":
    main()
