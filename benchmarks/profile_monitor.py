"""Where gp.GradientMonitor's overhead comes from, on bench_monitor.py's models.

Three variants of the same model and data, timed in interleaved rounds, each
round giving a paired ratio to the plain model:

- `graph`: the monitor's compiled train function (its hooks in place) set by
  hand as `model.train_function`, in `fit`, with NO monitor callback: the cost
  of the graph alone, inside Keras' own loop and data pipeline.
- `monitor`: `fit` with `gp.GradientMonitor(every=E)` (graph + per-step Python).
- `plain`: `fit` without the monitor (the baseline).

`--profile` then prints the cProfile summary of the monitor's Python during
some `fit`s (everything that is not `TFE_Py_Execute`, the graph's execution).
`--threads 1` makes process CPU time the steadiest measure on a shared machine.

Usage: python benchmarks/profile_monitor.py [--model resnet|transformer|cnn]
       [--batch B] [--steps S] [--rounds N] [--every E] [--threads T] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import gradprobe as gp  # noqa: E402
from bench_monitor import MODELS, make_data  # noqa: E402
from gradprobe.backends import tensorflow_monitor as hooks  # noqa: E402


def variant(kind, build, x, y, batch, steps, every):
    model = build()
    callbacks = [] if kind == "plain" else [gp.GradientMonitor(every=every)]
    model.fit(x[:2 * batch], y[:2 * batch], batch_size=batch, verbose=0, callbacks=callbacks)
    if kind == "graph":
        _, probe, function, *_ = callbacks[0]._built  # the monitor's function, traced
        probe.installed().__enter__()  # its hooks stay in place (this process only)

        def train_function(iterator):
            logs = dict(function(iterator))
            logs.pop(hooks.STATUS_KEY, None)
            return logs

        model.train_function = train_function
        callbacks = []

    def fit():
        model.fit(x[:steps * batch], y[:steps * batch], batch_size=batch, verbose=0,
                  shuffle=False, callbacks=callbacks)

    return fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet", choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    warnings.simplefilter("ignore")
    build = MODELS[args.model][0]
    x, y = make_data(args.model, args.steps * args.batch, np.random.default_rng(0))
    fits = {k: variant(k, build, x, y, args.batch, args.steps, args.every)
            for k in ("plain", "graph", "monitor")}
    times = {k: [] for k in fits}
    for r in range(args.rounds):
        for k in (list(fits) if r % 2 == 0 else list(reversed(fits))):
            t0, c0 = time.perf_counter(), time.process_time()
            fits[k]()
            times[k].append((time.perf_counter() - t0, time.process_time() - c0))
    base = np.array(times["plain"])
    print(f"{args.model}, batch {args.batch}, fits of {args.steps} steps, {args.rounds} rounds, "
          f"every={args.every}, threads {args.threads or 'default'}")
    for k, v in times.items():
        v = np.array(v)
        wall, cpu = np.median(v / base, axis=0) - 1
        print(f"  {k:8s} wall {np.median(v[:, 0]) / args.steps * 1e3:8.2f} ms/step "
              f"({wall:+.1%})  CPU {np.median(v[:, 1]) / args.steps * 1e3:8.2f} ms/step ({cpu:+.1%})")
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(3):
            fits["monitor"]()
        profile.disable()
        stats = pstats.Stats(profile)
        total = sum(s[2] for s in stats.stats.values())
        graph = sum(s[2] for key, s in stats.stats.items() if "TFE_Py_Execute" in key[2])
        print(f"cProfile of 3 fits with the monitor: {total:.2f} s, of which the graph "
              f"(TFE_Py_Execute) {graph:.2f} s")
        stats.sort_stats("cumulative").print_stats("gradprobe", 15)


if __name__ == "__main__":
    main()
