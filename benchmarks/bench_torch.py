"""gp.gradients on the PyTorch backend against hand-written `torch.autograd.grad`.

Rows, per model:

* `all weights`: gradprobe (`wrt="*.weights"`) and the hand-written code do the
  same work: gradients of the class score with respect to every trainable
  weight (the hand-written code: `model(x)` and one `torch.autograd.grad` over
  `model.trainable_variables`), eagerly.
* `activations + weights`: gradprobe also returns the gradient (and the value)
  of every layer's activation (`wrt=["*", "*.weights"]`); the hand-written
  baseline still computes the weights only, so the ratio is the whole price of
  the activation gradients.

Calls are interleaved in rounds; the table gives median wall and CPU time per
call and gradprobe / hand-written (target <= 1.10).

Usage: KERAS_BACKEND=torch python benchmarks/bench_torch.py [--quick] [--rounds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

if keras.backend.backend() != "torch":
    raise SystemExit("bench_torch.py needs KERAS_BACKEND=torch (set before Python starts).")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import gradprobe as gp  # noqa: E402
from _common import CLASS, resnet50, small_cnn, timed  # noqa: E402


def handwritten(model: keras.Model):
    """The code a PyTorch user writes: the model's call and one autograd.grad."""

    def run(x):
        weights = [v.value for v in model.trainable_variables]
        y = model(x, training=False)
        return torch.autograd.grad(y[:, CLASS].sum(), weights), y.detach()

    return run


def gradprobe_fn(model: keras.Model, wrt):
    def run(x):
        g = gp.gradients(model, x, CLASS, wrt)
        return dict(g), dict(g.activations), g.outputs

    return run


def bench(name: str, model: keras.Model, x, rounds: int) -> list[dict]:
    hand = handwritten(model)
    rows = []
    for task, wrt in (("all weights", "*.weights"),
                      ("activations + weights", ["*", "*.weights"])):
        ours = gradprobe_fn(model, wrt)
        g = gp.gradients(model, x, CLASS, wrt)
        ref = hand(x)[0]
        for v, r in zip(model.trainable_variables, ref):  # same numbers first
            key = [k for k, var in g.variables.items() if var is v][0]
            r = r.detach().numpy()
            np.testing.assert_allclose(np.asarray(g[key]), r, rtol=2e-4,
                                       atol=1e-5 * float(np.abs(r).max() + 1e-12))
        n_acts = sum(1 for k in g if g.kinds[k] == "activation")
        for _ in range(3):  # warm-up (compilation)
            hand(x)
            ours(x)
        times = {"hand": [], "ours": []}
        for i in range(rounds):
            order = (("hand", hand), ("ours", ours)) if i % 2 == 0 else \
                (("ours", ours), ("hand", hand))
            for label, fn in order:
                times[label].append(timed(fn, x))
        med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
               for k, v in times.items()}
        rows.append({"model": name, "task": task, "activations": n_acts,
                     "hand_ms": med["hand"][0] * 1e3, "ours_ms": med["ours"][0] * 1e3,
                     "hand_cpu_ms": med["hand"][1] * 1e3, "ours_cpu_ms": med["ours"][1] * 1e3,
                     "ratio": med["ours"][0] / med["hand"][0],
                     "cpu_ratio": med["ours"][1] / med["hand"][1]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CNN only")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="ResNet50 input size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = bench("small CNN", small_cnn(),
                 torch.as_tensor(rng.normal(size=(args.batch, 32, 32, 3)).astype("float32")),
                 args.rounds)
    if not args.quick:
        x = torch.as_tensor(rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32"))
        rows += bench(f"ResNet50 {args.size}x{args.size}", resnet50(args.size), x,
                      args.rounds)
    table = Table(title=f"gp.gradients on PyTorch {torch.__version__} (CPU, "
                        f"{torch.get_num_threads()} threads), batch {args.batch}, median of "
                        f"{args.rounds} interleaved rounds")
    for col in ("model", "task", "act. grads", "hand-written ms", "gradprobe ms", "ratio",
                "hand CPU ms", "gradprobe CPU ms", "CPU ratio"):
        table.add_column(col, justify="left" if col in ("model", "task") else "right")
    for r in rows:
        table.add_row(r["model"], r["task"], str(r["activations"]), f"{r['hand_ms']:.2f}",
                      f"{r['ours_ms']:.2f}", f"{r['ratio']:.3f}", f"{r['hand_cpu_ms']:.1f}",
                      f"{r['ours_cpu_ms']:.1f}", f"{r['cpu_ratio']:.3f}")
    Console(width=200).print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
