"""`gp.gradients` under `keras.distribution` on JAX, against the single-device call.

Sets XLA's host device count (`--devices`, 4 by default) before JAX is imported,
then builds the same model (same weights) three times: on one device, under
`DataParallel` over every device, and under `ModelParallel` on a (batch 2,
model devices/2) mesh whose `LayoutMap` shards every conv and dense kernel's
output axis over "model". For each, it times in interleaved rounds (medians of
wall and CPU time) `gp.gradients(model, x, 0, wrt)` with `x` a NumPy batch (as
a user passes it: gradprobe lays it out each call) and the hand-written
equivalent: the batch put where Keras' trainer puts it
(`distribution.get_data_layout`) and `jax.jit(jax.value_and_grad)` of
`model.stateless_call`. Ratios: gradprobe against the hand-written code of the
same placement, and each placement against the single-device gradprobe call.

Host CPU "devices" share the machine's cores, so a sharded call here measures the
partitioning overhead, not a speed-up: the numbers say what the distribution
costs gradprobe relative to Keras' own placement, on the same cores.

Usage: KERAS_BACKEND=jax python benchmarks/bench_jax_distribution.py
       [--devices 4] [--rounds 30] [--batch 32] [--models cnn,mlp] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=4)
parser.add_argument("--rounds", type=int, default=30)
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--models", default="cnn,mlp")
parser.add_argument("--json", default=None)
ARGS = parser.parse_args()

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={ARGS.devices}").strip()
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import gradprobe as gp  # noqa: E402
from _common import CLASS, interleaved, load_note, small_cnn  # noqa: E402

if keras.backend.backend() != "jax":
    sys.exit("bench_jax_distribution.py runs on JAX: KERAS_BACKEND=jax")


def mlp() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((256,))
    h = keras.layers.Dense(512, activation="relu", name="fc0")(inp)
    h = keras.layers.Dense(512, activation="relu", name="fc1")(h)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(h), name="mlp")


MODELS = {"cnn": (small_cnn, (32, 32, 3)), "mlp": (mlp, (256,))}
WORKLOADS = {"all weights": "*.weights", "activations + weights": ["*", "*.weights"],
             "input": "inputs"}


def distributions() -> dict:
    devices = keras.distribution.list_devices("cpu")
    mesh = keras.distribution.DeviceMesh((2, len(devices) // 2), ("batch", "model"), devices)
    layouts = keras.distribution.LayoutMap(mesh)
    layouts[".*conv\\d/kernel"] = (None, None, None, "model")
    layouts[".*fc\\d/kernel"] = (None, "model")
    return {"one device": None,
            "DataParallel": keras.distribution.DataParallel(devices=devices),
            "ModelParallel": keras.distribution.ModelParallel(layout_map=layouts,
                                                              batch_dim_name="batch")}


def hand_written(model: keras.Model, dist) -> callable:
    """The batch placed as Keras' trainer places it, then the jitted gradient of
    every trainable weight (the hand-written code of the "all weights" row; the
    other rows compare with it too, as bench_jax.py does)."""
    def objective(trainable, non_trainable, x):
        y, _ = model.stateless_call(trainable, non_trainable, x)
        return jnp.sum(y[:, CLASS])

    step = jax.jit(jax.value_and_grad(objective))

    def run(x):
        if dist is not None:
            x = jax.device_put(x, dist.get_data_layout(x.shape).backend_layout)
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        return jax.block_until_ready(step(trainable, non_trainable, x))

    return run


def gradprobe_call(model: keras.Model, wrt) -> callable:
    def run(x):
        return jax.block_until_ready(list(gp.gradients(model, x, CLASS, wrt).values()))

    return run


def main() -> None:
    rows = []
    for name in ARGS.models.split(","):
        make, shape = MODELS[name]
        x = np.random.default_rng(0).random((ARGS.batch, *shape), dtype="float32")
        for label, dist in distributions().items():
            keras.distribution.set_distribution(dist)
            model = make()
            fns = {"hand-written": hand_written(model, dist)}
            for work, wrt in WORKLOADS.items():
                fns[work] = gradprobe_call(model, wrt)
            for fn in fns.values():  # trace and compile outside the timing
                fn(x)
                fn(x)
            times = interleaved(fns, (x,), ARGS.rounds)
            for work in WORKLOADS:
                rows.append({"model": name, "placement": label, "work": work,
                             "ms": times[work][0] * 1e3, "cpu_ms": times[work][1] * 1e3,
                             "hand_ms": times["hand-written"][0] * 1e3})
            keras.distribution.set_distribution(None)
    single = {(r["model"], r["work"]): r["ms"] for r in rows if r["placement"] == "one device"}
    table = Table(title=f"gp.gradients under keras.distribution, {ARGS.devices} host CPU devices, "
                        f"batch {ARGS.batch}, JAX {jax.__version__} ({load_note()})")
    for col in ("model", "placement", "gradients of", "gradprobe ms", "CPU ms",
                "hand-written ms", "gradprobe / hand-written", "/ one-device gradprobe"):
        table.add_column(col, justify="left" if col in ("model", "placement", "gradients of")
                         else "right")
    for r in rows:
        r["vs_hand"] = r["ms"] / r["hand_ms"]
        r["vs_single"] = r["ms"] / single[(r["model"], r["work"])]
        table.add_row(r["model"], r["placement"], r["work"], f"{r['ms']:.2f}",
                      f"{r['cpu_ms']:.2f}", f"{r['hand_ms']:.2f}", f"{r['vs_hand']:.2f}",
                      f"{r['vs_single']:.2f}")
    Console(width=160).print(table)
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump({"devices": ARGS.devices, "batch": ARGS.batch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
