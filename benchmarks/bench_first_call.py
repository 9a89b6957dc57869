"""First-call latency: the first `gp.gradients` call against the first call of
a hand-written `tf.function` doing the same work (tape gradient of the summed
class scores with respect to the input and two kernels), each in a fresh
Python process, on ResNet50(weights=None), in interleaved repetitions (medians).
The hand-written function is timed as users write it (`@tf.function`, AutoGraph
on) and with `autograph=False` (what gradprobe compiles with, as Keras 3's own
train and predict steps do).

Each child process imports TensorFlow, Keras and gradprobe and builds the model
before its clock starts (the same for both sides), then times one call, the
result brought to NumPy. A third kind of child breaks gradprobe's first call
down (instrumented, so it is not part of the headline ratio):

* before tracing: gradprobe's Python (validation, selector resolution, plan);
* tracing: the trace of the compiled function, split into the model's own
  forward pass (Keras building the graph), gradprobe's per-layer hook inside it,
  the backward graph (`tape.gradient`) and the rest of gradprobe's Python;
* first run: graph optimisation and the first execution, minus a warm run;
* warm run, and what is left after the compiled call (result assembly).

Target: gradprobe/hand-written <= 1.2 (first call, wall time).

Usage: python benchmarks/bench_first_call.py [--reps 5] [--size 96] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

KERNELS = ["conv1_conv.kernel", "predictions.kernel"]


# ------------------------------------------------------------------ children
def _setup(size: int, batch: int):
    import keras
    import numpy as np

    import gradprobe  # noqa: F401  (imported before the clock, as on the other side)

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
    x = np.random.default_rng(0).random((batch, size, size, 3), np.float32)
    classes = (np.arange(batch) * 97 % 1000).astype(np.int32)
    return model, x, classes


def _hand(model, classes, autograph: bool = True):
    import tensorflow as tf

    kernels = [model.get_layer(k.split(".")[0]).kernel for k in KERNELS]
    idx = tf.constant(classes)

    @tf.function(autograph=autograph)
    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=False)
            score = tf.reduce_sum(tf.gather(y, idx, axis=1, batch_dims=1))
        return tape.gradient(score, [x, *kernels])

    return grads


def child(kind: str, size: int, batch: int) -> dict:
    import numpy as np

    import gradprobe as gp
    from _common import timed

    model, x, classes = _setup(size, batch)
    wrt = ["inputs", *KERNELS]

    def first_call():
        if kind == "gp":
            g = gp.gradients(model, x, classes, wrt)
            np.asarray(g["inputs"])
        else:
            np.asarray(_hand(model, classes, autograph=kind == "hand")(x)[0])

    wall, cpu = timed(first_call)
    return {"wall": wall, "cpu": cpu}


class _Clock:
    """Accumulates the time spent in a wrapped function (outermost calls only)."""

    def __init__(self):
        self.total, self.depth = 0.0, 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t
                self.depth -= 1

        return timed


def breakdown(size: int, batch: int) -> dict:
    """gradprobe's first call, phase by phase (instrumented)."""
    import numpy as np

    import gradprobe as gp
    from gradprobe.backends import tensorflow as backend
    from gradprobe.core.capture import recorder, tape

    model, x, classes = _setup(size, batch)
    hook, forward, backward = _Clock(), _Clock(), _Clock()
    recorder.TapeRecorder.hook = hook.wrap(recorder.TapeRecorder.hook)
    tape.call_model = forward.wrap(tape.call_model)
    backend.gradient = backward.wrap(backend.gradient)
    marks: dict[str, float] = {}
    make = tape.compiled

    def compiled(*a, **k):
        fn = make(*a, **k)

        def call(xx, args):
            marks["pre"] = time.perf_counter()
            getattr(fn, "fn", fn).get_concrete_function(xx, args)  # the tf.function
            marks["traced"] = time.perf_counter()
            out = fn(xx, args)
            marks["first_run"] = time.perf_counter()
            fn(xx, args)
            marks["warm_run"] = time.perf_counter()
            return out

        return call

    tape.compiled = compiled
    t0 = time.perf_counter()
    g = gp.gradients(model, x, classes, ["inputs", *KERNELS])
    np.asarray(g["inputs"])
    t1 = time.perf_counter()
    trace = marks["traced"] - marks["pre"]
    warm = marks["warm_run"] - marks["first_run"]
    return {
        "before tracing": marks["pre"] - t0,
        "tracing: model forward (Keras)": forward.total - hook.total,
        "tracing: gradprobe hook": hook.total,
        "tracing: backward graph": backward.total,
        "tracing: rest of gradprobe": trace - forward.total - backward.total,
        "first run minus warm run": marks["first_run"] - marks["traced"] - warm,
        "warm run": warm,
        "after the run (result)": t1 - marks["warm_run"],
        "total (without the extra warm run)": t1 - t0 - warm,
    }


def hand_breakdown(size: int, batch: int) -> dict:
    import numpy as np

    model, x, classes = _setup(size, batch)
    fn = _hand(model, classes)
    t0 = time.perf_counter()
    fn.get_concrete_function(x)
    t1 = time.perf_counter()
    np.asarray(fn(x)[0])
    t2 = time.perf_counter()
    np.asarray(fn(x)[0])
    t3 = time.perf_counter()
    return {"tracing": t1 - t0, "first run minus warm run": (t2 - t1) - (t3 - t2),
            "warm run": t3 - t2, "total (without the extra warm run)": t2 - t0}


# -------------------------------------------------------------------- parent
def spawn(kind: str, size: int, batch: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--size", str(size),
                          "--batch", str(batch)], capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child {kind} failed:\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--breakdowns", type=int, default=3)
    parser.add_argument("--child", choices=["gp", "hand", "hand_noag", "breakdown",
                                            "hand_breakdown"])
    args = parser.parse_args()
    if args.child:
        fn = {"gp": lambda: child("gp", args.size, args.batch),
              "hand": lambda: child("hand", args.size, args.batch),
              "hand_noag": lambda: child("hand_noag", args.size, args.batch),
              "breakdown": lambda: breakdown(args.size, args.batch),
              "hand_breakdown": lambda: hand_breakdown(args.size, args.batch)}[args.child]
        print("RESULT " + json.dumps(fn()), flush=True)
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=150) if not Console().is_terminal else Console()
    load0 = os.getloadavg()[0]
    kinds = ("gp", "hand", "hand_noag")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for r in range(args.reps):
        for kind in kinds[r % 3:] + kinds[:r % 3]:  # rotated: no side always first
            runs[kind].append(spawn(kind, args.size, args.batch))
        console.print(f"  repetition {r + 1}/{args.reps}: " + ", ".join(
            f"{k} {runs[k][-1]['wall']:.2f} s" for k in kinds), style="dim")
    parts = [spawn("breakdown", args.size, args.batch) for _ in range(args.breakdowns)]
    hand_parts = [spawn("hand_breakdown", args.size, args.batch)
                  for _ in range(args.breakdowns)]
    load1 = os.getloadavg()[0]

    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "cpu")}
           for k, v in runs.items()}
    table = Table(title=f"First call, ResNet50(weights=None) {args.size}x{args.size}, batch "
                        f"{args.batch}, wrt=inputs + {len(KERNELS)} kernels: median over "
                        f"{args.reps} fresh processes each (interleaved)")
    for col in ["", "gradprobe", "hand tf.function", "ratio", "hand, autograph=False",
                "ratio "]:
        table.add_column(col, justify="left" if not col else "right")
    for m in ("wall", "cpu"):
        g, h, h2 = med["gp"][m], med["hand"][m], med["hand_noag"][m]
        table.add_row(f"first call, {m} s", f"{g:.3f}", f"{h:.3f}", f"{g / h:.3f}",
                      f"{h2:.3f}", f"{g / h2:.3f}")
    console.print(table)

    table = Table(title=f"Where the first call goes (median of {args.breakdowns} instrumented "
                        "fresh processes, seconds)")
    table.add_column("phase")
    table.add_column("gradprobe", justify="right")
    table.add_column("hand-written", justify="right")
    hand_map = {"tracing: model forward (Keras)": "tracing"}
    for phase in parts[0]:
        ours = statistics.median(p[phase] for p in parts)
        key = hand_map.get(phase, phase)
        theirs = (f"{statistics.median(p[key] for p in hand_parts):.3f}"
                  + (" (all tracing)" if key == "tracing" else "")
                  if key in hand_parts[0] else "-")
        table.add_row(phase, f"{ours:.3f}", theirs)
    console.print(table)
    console.print(f"load average (1 min) {load0:.2f} before, {load1:.2f} after, "
                  f"{os.cpu_count()} CPUs. Target: first-call ratio (wall) <= 1.2.")


if __name__ == "__main__":
    main()
