"""Can TensorFlow run the functional capture as fast as its tape capture? (issue 26 item 1)

The functional capture (`gradprobe.core.capture.functional`: the forward pass as a
function of its probes and variables, a discovery and a dependency pass on abstract
values, one compiled step per input signature) runs on JAX and PyTorch. This script
gives it TensorFlow's primitives (`value_and_grad` by a `tf.GradientTape`, `jit` by
`tf.function`, `eval_shape` and `connected` by tracing on `tf.TensorSpec`s: written
here, an experiment, not part of the package) and times, in one process and in
interleaved rounds, `gp.gradients` through the tape capture (the package's) and
through the functional one, on the models and tasks of `bench_core.py`. Both must
agree (checked). The ratio functional / tape decides whether one strategy could
serve all three backends (target <= 1.05).

Usage: KERAS_BACKEND=tensorflow python benchmarks/bench_tf_functional.py [--quick]
       [--rounds N]
"""

from __future__ import annotations

import argparse
import itertools
import os
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import gradprobe as gp  # noqa: E402
from _common import CLASS, interleaved, load_note, resnet50, small_cnn  # noqa: E402
from gradprobe import backends  # noqa: E402
from gradprobe.backends import tensorflow as tape_backend  # noqa: E402

WRT = {"one deep activation": None, "all activations": "*", "all weights": "*.weights",
       "input": "inputs"}


def functional_tensorflow() -> types.SimpleNamespace:
    """TensorFlow's functional primitives (see `gradprobe.backends.interface.FunctionalBackend`)."""
    counter = itertools.count(1)
    bk = types.SimpleNamespace(**{k: getattr(tape_backend, k) for k in dir(tape_backend)
                                  if not k.startswith("__")})
    bk.CAPTURE, bk.PER_EXAMPLE, bk.trace_count = "functional", False, 0

    def value_and_grad(fn):
        def run(diff, *rest):
            flat = tf.nest.flatten(diff)
            with tf.GradientTape() as tape:
                for t in flat:
                    tape.watch(t)
                objective, aux = fn(diff, *rest)
            grads = tape.gradient(objective, flat,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return (objective, aux), tf.nest.pack_sequence_as(diff, grads)
        return run

    def traced(fn, *args):
        specs = tf.nest.map_structure(
            lambda a: a if isinstance(a, tf.TensorSpec) else tf.TensorSpec(a.shape, a.dtype),
            args)
        return tf.function(fn).get_concrete_function(*specs)

    def eval_shape(fn, *args):
        out = traced(fn, *args).structured_outputs
        return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), out)

    def connected(fn, diff, *rest):
        found = {}

        def probe(diff, *rest):
            flat = tf.nest.flatten(diff)
            with tf.GradientTape() as tape:
                for t in flat:
                    tape.watch(t)
                objective, _ = fn(diff, *rest)
            found["flags"] = [g is not None for g in tape.gradient(objective, flat)]
            return objective

        traced(probe, diff, *rest)
        return tf.nest.pack_sequence_as(diff, found["flags"])

    def jit(fn):
        def counted(*args):
            bk.trace_count = next(counter)
            return fn(*args)
        return tf.function(counted, reduce_retracing=True)

    bk.value_and_grad = bk.scaled_value_and_grad = value_and_grad
    bk.eval_shape, bk.connected, bk.jit = eval_shape, connected, jit
    bk.abstract = lambda x: tf.TensorSpec(x.shape, x.dtype)
    bk.value_of = lambda v: tf.convert_to_tensor(v.value)
    bk.zeros = lambda shape, dtype: tf.zeros(shape, dtype)
    bk.add_probe = lambda x, probe: x + probe
    bk.is_array = tf.is_tensor
    bk.trace_error = lambda e: (type(e).__name__ if isinstance(
        e, tf.errors.OperatorNotAllowedInGraphError) else None)
    return bk


class Functional:
    """`gp.gradients` through the functional capture on TensorFlow, while entered."""

    def __init__(self):
        self.bk = functional_tensorflow()

    def __enter__(self):
        self.saved = backends.FUNCTIONAL, backends.get()
        backends.FUNCTIONAL = (*self.saved[0], "tensorflow")
        backends._loaded["tensorflow"] = self.bk

    def __exit__(self, *exc):
        backends.FUNCTIONAL = self.saved[0]
        backends._loaded["tensorflow"] = self.saved[1]


def bench(label, model, x, deep, rounds, console):
    rows = []
    x = tf.convert_to_tensor(x)
    functional = Functional()
    # A twin with the same weights: the cache keeps one compiled function per model
    # and request, so each strategy gets its own model.
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    for task, wrt in WRT.items():
        wrt = wrt or deep
        gp.clear_cache()

        def tape_call(wrt=wrt):
            g = gp.gradients(model, x, CLASS, wrt)
            return [np.asarray(v) for v in g.values()]

        def functional_call(wrt=wrt):
            with functional:
                g = gp.gradients(twin, x, CLASS, wrt)
            return [np.asarray(v) for v in g.values()]

        a, b = tape_call(), functional_call()  # (compiled, and compared)
        for u, v in zip(a, b):
            np.testing.assert_allclose(u, v, rtol=1e-3,
                                       atol=1e-5 * max(1.0, float(np.abs(u).max())))
        t = interleaved({"tape": tape_call, "functional": functional_call}, (), rounds)
        rows.append({"model": label, "task": task, "tape_ms": t["tape"][0] * 1e3,
                     "functional_ms": t["functional"][0] * 1e3,
                     "ratio": t["functional"][0] / t["tape"][0],
                     "cpu_ratio": t["functional"][1] / t["tape"][1]})
        console.print(f"  {label}: {task} done ({load_note()})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CNN only")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if keras.backend.backend() != "tensorflow":
        raise SystemExit("bench_tf_functional.py runs on the tensorflow backend.")
    console = Console(width=160)
    rng = np.random.default_rng(0)
    rows = bench("small CNN, batch 32", small_cnn(),
                 rng.random((32, 32, 32, 3), dtype=np.float32), "conv2", args.rounds, console)
    if not args.quick:
        rows += bench("ResNet50(weights=None) 64x64, batch 4", resnet50(64),
                      rng.random((4, 64, 64, 3), dtype=np.float32), "conv4_block6_out",
                      args.rounds, console)
    table = Table(title=f"gp.gradients on TensorFlow {tf.__version__}: functional capture vs "
                        f"tape capture (median of {args.rounds} interleaved rounds; "
                        f"{load_note()} at the end)")
    for col in ("model", "task", "tape ms", "functional ms", "ratio", "CPU ratio"):
        table.add_column(col, justify="left" if col in ("model", "task") else "right")
    for r in rows:
        table.add_row(r["model"], r["task"], f"{r['tape_ms']:.2f}", f"{r['functional_ms']:.2f}",
                      f"{r['ratio']:.3f}", f"{r['cpu_ratio']:.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
