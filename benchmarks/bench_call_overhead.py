"""gradprobe's own cost per call on TensorFlow: alternating calls against hand-written code.

`bench_core.py` times blocks of calls (about 0.2 s of one side, then of the other),
so on a small model the machine's drift from block to block is as large as the
difference it looks for. Here every iteration calls the hand-written compiled
function and then `gp.gradients` on the same inputs, each followed by reading its
results, so both meet the same machine state; the table gives the mean time per
call of each side, the difference (what gradprobe costs on top of the same
compiled work, in microseconds) and the ratio.

Models: a two-layer MLP (batch 2: almost nothing but per-call cost) and the small
CNN of `bench_core.py` (batch 32), each asked for one layer's activation gradient
and a class score; the hand-written side is `bench_core.py`'s (a probe model and a
`tf.GradientTape` in a `tf.function`).

Usage: python benchmarks/bench_call_overhead.py [--calls N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import gradprobe as gp  # noqa: E402
from _common import CLASS, load_note, small_cnn  # noqa: E402
from bench_core import tensorflow_hand, tensorflow_sync  # noqa: E402


def two_layer() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(16, name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="d2")(hidden), name="two_layer")


def measure(model: keras.Model, x, layer: str, calls: int) -> tuple[float, float]:
    """Mean seconds per call `(hand-written, gradprobe)` over `calls` alternating calls."""
    raw = tensorflow_hand(model, "one deep activation", layer)

    def hand():
        tensorflow_sync(raw(x))

    def ours():
        g = gp.gradients(model, x, CLASS, layer)
        tensorflow_sync((dict(g), dict(g.activations), g.outputs))

    for _ in range(10):  # tracing and first-call costs
        hand()
        ours()
    spent = [0, 0]
    for _ in range(calls):
        for side, fn in enumerate((hand, ours)):
            start = time.perf_counter_ns()
            fn()
            spent[side] += time.perf_counter_ns() - start
    return spent[0] / calls / 1e9, spent[1] / calls / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="alternating calls per repeat")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repeats per model (the table gives their medians)")
    args = parser.parse_args()
    if keras.backend.backend() != "tensorflow":
        raise SystemExit("bench_call_overhead.py measures the TensorFlow capture: "
                         "run it with KERAS_BACKEND=tensorflow.")
    import tensorflow as tf

    rng = np.random.default_rng(0)
    cases = [("two-layer MLP, batch 2", two_layer(), rng.random((2, 4), dtype=np.float32), "d1"),
             ("small CNN, batch 32", small_cnn(), rng.random((32, 32, 32, 3), dtype=np.float32),
              "conv2")]
    table = Table(title=f"gradprobe's cost per call over hand-written compiled TensorFlow "
                        f"(mean of {args.calls} alternating calls, median of {args.repeats} "
                        f"repeats; {load_note()})")
    for col in ("model", "hand-written us", "gradprobe us", "difference us", "ratio"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, model, x, layer in cases:
        x = tf.constant(x)
        runs = [measure(model, x, layer, args.calls) for _ in range(args.repeats)]
        hand = statistics.median(h for h, _ in runs)
        ours = statistics.median(o for _, o in runs)
        ratio = statistics.median(o / h for h, o in runs)
        table.add_row(name, f"{hand * 1e6:.0f}", f"{ours * 1e6:.0f}",
                      f"{(ours - hand) * 1e6:.0f}", f"{ratio:.3f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
