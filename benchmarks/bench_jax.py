"""gp.gradients on the JAX backend against hand-written `jax.jit(jax.value_and_grad)`.

Rows, per model:

* `all weights`: gradprobe (`wrt="*.weights"`) and the hand-written code do the
  same work: gradients of the class score with respect to every trainable
  weight, through `model.stateless_call`, compiled with `jax.jit`.
* `activations + weights`: gradprobe also returns the gradient (and the value)
  of every layer's activation (`wrt=["*", "*.weights"]`); the hand-written
  baseline still computes the weights only, so the ratio is the whole price of
  the activation gradients.

* `per-example weights`: `per_example=True` (one gradient of every trainable
  weight per example, `jax.vmap` over single-example passes) against the
  hand-written batch gradient (one gradient for the whole batch): the price of
  per-example gradients (target: within 2x), at batch 16 and 64 (ResNet50 at
  batch 16 only unless `--pe-resnet-batches` says otherwise: its per-example
  gradients take 64 x 94 MiB at batch 64). A second table compares the same
  rows with hand-written `jax.jit(jax.vmap(jax.grad))` (the same work).

Both read the variables' current values on every call (as a training loop's
weights change) and wait for the results (`block_until_ready`). Calls are
interleaved in rounds; the table gives median wall and CPU time per call and
gradprobe / hand-written (target <= 1.10).

Usage: KERAS_BACKEND=jax python benchmarks/bench_jax.py [--quick] [--rounds N] [--json PATH]
       [--per-example-only] [--pe-batches 16,64] [--pe-resnet-batches 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

if keras.backend.backend() != "jax":
    raise SystemExit("bench_jax.py needs KERAS_BACKEND=jax (set before Python starts).")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import gradprobe as gp  # noqa: E402
from _common import CLASS, resnet50, small_cnn, timed  # noqa: E402


def handwritten(model: keras.Model):
    """The code a JAX user writes: value_and_grad over the weights, jitted."""

    @jax.jit
    def step(trainable, non_trainable, x):
        def score(tv):
            y, _ = model.stateless_call(tv, non_trainable, x, training=False)
            return jnp.sum(y[:, CLASS]), y

        (_, y), grads = jax.value_and_grad(score, has_aux=True)(trainable)
        return grads, y

    def run(x):
        out = step([v.value for v in model.trainable_variables],
                   [v.value for v in model.non_trainable_variables], x)
        return jax.block_until_ready(out)

    return run


def handwritten_per_example(model: keras.Model):
    """Hand-written per-example gradients: jax.vmap of the single-example
    jax.grad, jitted (the same work as per_example=True)."""

    @jax.jit
    def step(trainable, non_trainable, x):
        def score(tv, xi):
            y, _ = model.stateless_call(tv, non_trainable, xi[None], training=False)
            return y[0, CLASS]

        return jax.vmap(jax.grad(score), in_axes=(None, 0))(trainable, x)

    def run(x):
        out = step([v.value for v in model.trainable_variables],
                   [v.value for v in model.non_trainable_variables], x)
        return jax.block_until_ready(out)

    return run


def gradprobe_fn(model: keras.Model, wrt, per_example: bool = False):
    def run(x):
        g = gp.gradients(model, x, CLASS, wrt, per_example=per_example)
        return jax.block_until_ready((dict(g), dict(g.activations), g.outputs))

    return run


def bench(name: str, model: keras.Model, x, rounds: int,
          tasks=(("all weights", "*.weights", False),
                 ("activations + weights", ["*", "*.weights"], False))) -> list[dict]:
    hand = handwritten(model)
    rows = []
    for task, wrt, per_example in tasks:
        ours = gradprobe_fn(model, wrt, per_example)
        g = gp.gradients(model, x, CLASS, wrt, per_example=per_example)
        ref = hand(x)[0]
        for v, r in zip(model.trainable_variables, ref):  # same numbers first
            key = [k for k, var in g.variables.items() if var is v][0]
            # (per example: the per-example gradients sum to the batch gradient)
            mine = np.asarray(g[key]).sum(0) if per_example else np.asarray(g[key])
            np.testing.assert_allclose(mine, np.asarray(r), rtol=2e-4,
                                       atol=1e-5 * float(np.abs(np.asarray(r)).max() + 1e-12))
        if per_example:
            assert set(g.per_example_method.values()) == {"vmap"}, dict(g.per_example_method)
        n_acts = sum(1 for k in g if g.kinds[k] == "activation")
        del g
        fns = [("hand", hand), ("ours", ours)]
        if per_example:  # also the hand-written vmap: the same work as gradprobe
            fns.append(("hand_pe", handwritten_per_example(model)))
        for _ in range(3):  # warm-up (compilation)
            for _, fn in fns:
                fn(x)
        times = {label: [] for label, _ in fns}
        for i in range(rounds):
            for label, fn in fns if i % 2 == 0 else fns[::-1]:
                times[label].append(timed(fn, x))
        med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
               for k, v in times.items()}
        rows.append({"model": name, "task": task, "batch": int(x.shape[0]),
                     "activations": n_acts,
                     "hand_ms": med["hand"][0] * 1e3, "ours_ms": med["ours"][0] * 1e3,
                     "hand_cpu_ms": med["hand"][1] * 1e3, "ours_cpu_ms": med["ours"][1] * 1e3,
                     "ratio": med["ours"][0] / med["hand"][0],
                     "cpu_ratio": med["ours"][1] / med["hand"][1]})
        if per_example:
            rows[-1].update(hand_pe_ms=med["hand_pe"][0] * 1e3,
                            hand_pe_cpu_ms=med["hand_pe"][1] * 1e3,
                            pe_ratio=med["ours"][0] / med["hand_pe"][0],
                            pe_cpu_ratio=med["ours"][1] / med["hand_pe"][1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CNN only")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="ResNet50 input size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", default=None)
    parser.add_argument("--per-example-only", action="store_true",
                        help="only the per-example rows")
    parser.add_argument("--pe-batches", default="16,64",
                        help="batch sizes of the per-example rows (small CNN)")
    parser.add_argument("--pe-resnet-batches", default="16",
                        help="batch sizes of the per-example rows (ResNet50)")
    parser.add_argument("--pe-size", type=int, default=32,
                        help="ResNet50 input size of the per-example rows")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    cnn = small_cnn()
    if not args.per_example_only:
        rows += bench("small CNN", cnn,
                      jnp.asarray(rng.normal(size=(args.batch, 32, 32, 3)).astype("float32")),
                      args.rounds)
    pe_task = (("per-example weights / batch gradient", "*.weights", True),)
    for b in (int(v) for v in args.pe_batches.split(",") if v):
        x = jnp.asarray(rng.normal(size=(b, 32, 32, 3)).astype("float32"))
        rows += bench("small CNN", cnn, x, args.rounds, pe_task)
    if not args.quick:
        if not args.per_example_only:
            net = resnet50(args.size)
            x = jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3))
                            .astype("float32"))
            rows += bench(f"ResNet50 {args.size}x{args.size}", net, x, args.rounds)
        net = resnet50(args.pe_size)
        for b in (int(v) for v in args.pe_resnet_batches.split(",") if v):
            x = jnp.asarray(rng.normal(size=(b, args.pe_size, args.pe_size, 3))
                            .astype("float32"))
            rows += bench(f"ResNet50 {args.pe_size}x{args.pe_size}", net, x, args.rounds,
                          pe_task)
    table = Table(title=f"gp.gradients on JAX {jax.__version__} ({jax.default_backend()}), "
                        f"median of {args.rounds} interleaved rounds; load average "
                        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end")
    for col in ("model", "task", "batch", "act. grads", "hand-written ms", "gradprobe ms",
                "ratio", "hand CPU ms", "gradprobe CPU ms", "CPU ratio"):
        table.add_column(col, justify="left" if col in ("model", "task") else "right")
    for r in rows:
        table.add_row(r["model"], r["task"], str(r["batch"]), str(r["activations"]),
                      f"{r['hand_ms']:.2f}",
                      f"{r['ours_ms']:.2f}", f"{r['ratio']:.3f}", f"{r['hand_cpu_ms']:.1f}",
                      f"{r['ours_cpu_ms']:.1f}", f"{r['cpu_ratio']:.3f}")
    Console(width=200).print(table)
    pe = [r for r in rows if "pe_ratio" in r]
    if pe:
        t2 = Table(title="per_example=True against hand-written jit(vmap(grad)) (same work)")
        for col in ("model", "batch", "hand vmap ms", "gradprobe ms", "ratio",
                    "hand vmap CPU ms", "gradprobe CPU ms", "CPU ratio"):
            t2.add_column(col, justify="left" if col == "model" else "right")
        for r in pe:
            t2.add_row(r["model"], str(r["batch"]), f"{r['hand_pe_ms']:.2f}",
                       f"{r['ours_ms']:.2f}", f"{r['pe_ratio']:.3f}",
                       f"{r['hand_pe_cpu_ms']:.1f}", f"{r['ours_cpu_ms']:.1f}",
                       f"{r['pe_cpu_ratio']:.3f}")
        Console(width=200).print(t2)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
