"""gp.GradientMonitor's overhead on the current Keras backend (meant for JAX and
PyTorch; `benchmarks/bench_monitor.py` is the TensorFlow study), as ratios of
whole `fit` times in the same run.

Why whole fits: on JAX, `fit` dispatches its jitted steps asynchronously, so a
plain fit's per-step clock (bench_monitor.py's main estimate) measures the
dispatch, not the step; anything that reads a value on the host after a step
(the monitor reads its status after every execution, for the NaN/Inf check)
makes the Python loop wait for the step. The whole fit includes the final wait,
so it is the time a user sees.

Variants, all on ONE model instance (the monitor puts the model's own train
function back after each fit), warm (each traced once before timing), in
interleaved rounds whose order rotates (see bench_monitor.rotation): the plain
fit (the baseline); the plain fit again (A/A control: the noise of this run); a
callback reading the loss on the host after every step (the floor of any
per-step check); the monitor at every=1 and every=10, and at every=10 with
replay=True (a non-finite step not applied, each batch kept). Each row: the median over
rounds of the fit time over the baseline's in the same round, wall and process
CPU time, with the interquartile range.

Models (`--models`, comma-separated): the small CNN (default), and the two models of
the targets, bench_monitor.py's CIFAR-style ResNet-20 (batch 64) and 4-block
Transformer (batch 32); `--steps`/`--batch` default to each model's own.

Usage: KERAS_BACKEND=jax python benchmarks/bench_monitor_backends.py [--models cnn,resnet,transformer]
       [--steps S] [--rounds N] [--batch B] [--threads T]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradprobe as gp  # noqa: E402
from bench_monitor import MODELS, ReadLoss, make_data, rotation  # noqa: E402


def fit_time(model, callbacks, x, y, batch):
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn", help="cnn, resnet, transformer")
    parser.add_argument("--steps", type=int, default=0,
                        help="steps per fit (0: 100 for the CNN, 20 for the others)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=0, help="0: the model's own")
    parser.add_argument("--threads", type=int, default=0,
                        help="PyTorch's threads (0: its default; less noise on a busy machine)")
    args = parser.parse_args()
    if args.threads and keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(args.threads)
    elif args.threads:
        parser.error("--threads: PyTorch only")
    rows = [bench(name, args) for name in args.models.split(",")]
    print("| model | variant | fit ms (median) | wall overhead (IQR) | CPU overhead (IQR) |")
    print("|---|---|---|---|---|")
    for row in rows:
        for line in row:
            print(line)


def bench(name: str, args: argparse.Namespace) -> list[str]:
    build, batch, _, _ = MODELS[name]
    batch = args.batch or batch
    steps = args.steps or (100 if name == "cnn" else 20)
    x, y = make_data(name, steps * batch, np.random.default_rng(0))
    model = build()
    variants = {"no monitor": [], "no monitor (A/A control)": [],
                "callback reading the loss": [ReadLoss()],
                "monitor every=1": [gp.GradientMonitor(every=1)],
                "monitor every=10": [gp.GradientMonitor(every=10)],
                "monitor every=10, replay=True": [gp.GradientMonitor(every=10, replay=True)]}
    for callbacks in variants.values():  # warm-up: tracing
        model.fit(x[:batch * 10], y[:batch * 10], batch_size=batch, verbose=0,
                  callbacks=callbacks)
    load0 = os.getloadavg()[0]
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for r in range(args.rounds):
        for k in rotation(list(variants), r):
            w, c = fit_time(model, variants[k], x, y, batch)
            wall[k].append(w)
            cpu[k].append(c)
    load1 = os.getloadavg()[0]
    base = "no monitor"
    print(f"{keras.backend.backend()}: {name} (batch {batch}), fit of {steps} steps, "
          f"{args.rounds} rounds, load average {load0:.1f} -> {load1:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    lines = []
    for k in variants:
        cells = []
        for values in (wall, cpu):
            ratios = np.array(values[k]) / np.array(values[base])
            q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
            cells.append("-" if k == base else f"{q2 - 1:+.1%} ({q1 - 1:+.1%} .. {q3 - 1:+.1%})")
        lines.append(f"| {name} | {k} | {np.median(wall[k]) * 1e3:.0f} | {cells[0]} | "
                     f"{cells[1]} |")
        print(lines[-1], flush=True)
    return lines

if __name__ == "__main__":
    main()
