"""gradprobe against hand-written tf.GradientTape code doing the same work.

For each model and each task (one deep layer's activation; all layers'
activations; all weights; the input) it times

* `compiled`: hand-written code in a `tf.function` (probe model + tape),
* `eager`: the same hand-written code run eagerly,
* `gradprobe`: `gp.gradients(...)` with its default cached compilation,

The hand-written code returns what it computed and gradprobe returns too: the
gradients, the model output and, for activation tasks, the activations (the
user of a probe model has them in hand: `hidden_output, predictions = probe(x)`).

in interleaved rounds, and prints the median times and the ratios
gradprobe / compiled (target <= 1.10) and eager / gradprobe (target > 1).

Usage: python benchmarks/bench_core.py [--quick] [--rounds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
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

CLASS = 0


def small_cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    h = inp
    for i, f in enumerate([16, 32, 64]):
        h = keras.layers.Conv2D(f, 3, padding="same", activation="relu", name=f"conv{i}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.MaxPooling2D(name=f"pool{i}")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dense(64, activation="relu", name="fc")(h)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(h), name="small_cnn")


def resnet50() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.applications.ResNet50(weights=None)


def handwritten(model: keras.Model, task: str, deep: str):
    """The code a user writes: a probe model and a tape."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if task == "one deep activation":
        probe = keras.Model(model.inputs, [model.get_layer(deep).output, model.output])
    elif task == "all activations":
        probe = keras.Model(model.inputs, [[layer.output for layer in layers], model.output])
    else:
        probe = None

    def fn(x):
        with tf.GradientTape() as tape:
            if task == "input":
                tape.watch(x)
            if probe is not None:
                acts, y = probe(x, training=False)
                tape.watch(acts)
            else:
                y = model(x, training=False)
            score = tf.reduce_sum(y[:, CLASS])
        if task == "all weights":
            return tape.gradient(score, model.trainable_variables), y
        if task == "input":
            return tape.gradient(score, x), y
        return tape.gradient(score, acts), acts, y

    return fn


def _run(fn, x, reps: int) -> float:
    """Seconds per call over `reps` calls, waiting for every result."""
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(x)
        leaves = list(out.values()) if isinstance(out, gp.Gradients) else tf.nest.flatten(out)
        for v in leaves:
            np.asarray(v)
    return (time.perf_counter() - t0) / reps


def wrt_for(task: str, deep: str):
    return {"one deep activation": deep, "all activations": "*", "all weights": "*.weights",
            "input": "inputs"}[task]


def bench(name, model, x, deep, rounds, console):
    x = tf.constant(x)
    rows = []
    for task in ["one deep activation", "all activations", "all weights", "input"]:
        hand = handwritten(model, task, deep)
        variants = {
            "compiled": tf.function(hand),
            "eager": hand,
            "gradprobe": lambda xx, t=task: gp.gradients(model, xx, CLASS, wrt_for(t, deep)),
        }
        for fn in variants.values():  # warm-up: tracing and first-call costs
            _run(fn, x, 2)
        # Each sample runs enough calls to last >= 0.25 s; variants are interleaved.
        reps = max(1, int(0.25 / max(_run(variants["compiled"], x, 1), 1e-4)))
        times = {k: [] for k in variants}
        for _ in range(rounds):
            for k, fn in variants.items():
                times[k].append(_run(fn, x, reps))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"model": name, "task": task, **{f"{k}_s": v for k, v in med.items()},
                     "ratio_vs_compiled": med["gradprobe"] / med["compiled"],
                     "eager_over_gradprobe": med["eager"] / med["gradprobe"]})
        console.print(f"  {name}: {task} done", style="dim")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CNN only")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    rng = np.random.default_rng(0)
    rows = bench("small CNN, batch 64", small_cnn(),
                 rng.random((64, 32, 32, 3), dtype=np.float32), "conv2", args.rounds, console)
    if not args.quick:
        rows += bench("ResNet50(weights=None), batch 8", resnet50(),
                      rng.random((8, 224, 224, 3), dtype=np.float32), "conv4_block6_out",
                      max(3, args.rounds // 2), console)
    table = Table(title="gradprobe vs hand-written tf.GradientTape (median seconds per call)")
    for col in ["model", "task", "compiled", "eager", "gradprobe", "gradprobe/compiled",
                "eager/gradprobe"]:
        table.add_column(col, justify="left" if col in ("model", "task") else "right")
    for r in rows:
        ok = "green" if r["ratio_vs_compiled"] <= 1.10 else "red"
        table.add_row(r["model"], r["task"], f"{r['compiled_s']:.4f}", f"{r['eager_s']:.4f}",
                      f"{r['gradprobe_s']:.4f}", f"[{ok}]{r['ratio_vs_compiled']:.3f}[/{ok}]",
                      f"{r['eager_over_gradprobe']:.2f}x")
    console.print(table)
    console.print("target: gradprobe/compiled <= 1.10 in every row; eager/gradprobe > 1.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
