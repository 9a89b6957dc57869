"""`gp.deletion_curve` (all `batch x (steps + 1)` modified inputs in batched model
calls) against a per-step loop (one model call per point of the curve, the
masks built in NumPy), on the benchmarks' small CNN (32x32x3). Both give the
same scores (checked); interleaved rounds, median seconds per curve.

Usage: python benchmarks/bench_checks.py [--rounds N] [--batch N] [--steps N]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import gradprobe as gp  # noqa: E402
from _common import CLASS, interleaved, load_note, small_cnn  # noqa: E402


def per_step_loop(model, x, maps, steps):
    """The deletion curve with one model call per point (the baseline)."""
    n = len(x)
    score = np.abs(maps).sum(-1).reshape(n, -1)
    order = np.argsort(-score, axis=1, kind="stable")
    features = score.shape[1]
    out = np.empty((n, steps + 1))
    for j in range(steps + 1):
        k = int(np.floor(j * features / steps + 0.5))
        keep = np.ones((n, features), bool)
        np.put_along_axis(keep, order[:, :k], False, axis=1)
        xs = np.where(keep.reshape(n, *x.shape[1:-1], 1), x, 0.0).astype("float32")
        out[:, j] = keras.ops.convert_to_numpy(model(xs, training=False))[:, CLASS]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    model = small_cnn()
    x = np.random.default_rng(0).random((args.batch, 32, 32, 3)).astype("float32")
    maps = np.asarray(gp.gradient_x_input(model, x, CLASS))
    batched = gp.deletion_curve(model, x, maps, CLASS, steps=args.steps)
    loop = per_step_loop(model, x, maps, args.steps)
    np.testing.assert_allclose(batched.scores, loop, rtol=1e-4, atol=1e-5)
    fns = {
        "per-step loop": lambda: per_step_loop(model, x, maps, args.steps),
        "gp.deletion_curve": lambda: gp.deletion_curve(model, x, maps, CLASS, steps=args.steps),
        "gp.deletion_curve, batch_size=64": lambda: gp.deletion_curve(
            model, x, maps, CLASS, steps=args.steps, batch_size=64),
    }
    times = interleaved(fns, (), args.rounds)
    base = times["per-step loop"][0]
    table = Table(title=f"deletion curve, {keras.backend.backend()}, batch {args.batch}, "
                        f"{args.steps} steps: median seconds per curve ({load_note()})")
    for col in ("variant", "wall (s)", "CPU (s)", "speed-up vs loop"):
        table.add_column(col)
    for label, (wall, cpu) in times.items():
        table.add_row(label, f"{wall:.3f}", f"{cpu:.3f}", f"{base / wall:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
