"""gradprobe against hand-written compiled code of the current Keras backend, same work.

Runs under the backend that `KERAS_BACKEND` selects. For each model (a small
CNN, and ResNet50(weights=None) on small inputs) and each task (one deep layer's
activation; every layer's activation; every weight; the input) it times, in
interleaved rounds and in the same process:

* `hand-written`: the code a user of that backend writes, compiled as that
  backend compiles:
  - TensorFlow: a probe model (`keras.Model(inputs, [activations, output])`)
    and a `tf.GradientTape`, in a `tf.function`;
  - JAX: `jax.jit(jax.value_and_grad(...))` over `model.stateless_call` (for
    one activation: the model cut at that layer, the gradient of the head's
    `stateless_call` at the trunk's output);
  - PyTorch: the model's call and one `torch.autograd.grad` (Keras runs PyTorch
    eagerly; for one activation: the trunk without autograd, the head with it);
* `gradprobe`: `gp.gradients(...)` with its default (cached) compilation.

Both sides return the same things: the gradients, the model output and, for
activation tasks, the activations, and both wait for them. On JAX and PyTorch
there is no hand-written form of "every activation" short of re-implementing
gradprobe's probes: that row's baseline is the hand-written gradient of every
weight (less work), so its ratio is the whole price of the activation
gradients. The table gives median wall and CPU time per call and the ratios
gradprobe / hand-written (target <= 1.10).

Usage: KERAS_BACKEND=<tensorflow|jax|torch> python benchmarks/bench_core.py
       [--quick] [--rounds N] [--batch B] [--size S] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import gradprobe as gp  # noqa: E402
from _common import CLASS, interleaved, load_note, resnet50, small_cnn, timed  # noqa: E402

BACKEND = keras.backend.backend()
TASKS = ("one deep activation", "all activations", "all weights", "input")
WRT = {"one deep activation": None, "all activations": "*", "all weights": "*.weights",
       "input": "inputs"}


def _cut(model: keras.Model, deep: str) -> tuple[keras.Model, keras.Model]:
    """The model cut after layer `deep`: `(trunk, head)`, `head(trunk(x)) == model(x)`
    (every path from the input to the output runs through `deep`)."""
    tensor = model.get_layer(deep).output
    return keras.Model(model.inputs, tensor), keras.Model(tensor, model.outputs[0])


# --------------------------------------------------------------- TensorFlow
def tensorflow_hand(model: keras.Model, task: str, deep: str):
    import tensorflow as tf

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    probe = None
    if task == "one deep activation":
        probe = keras.Model(model.inputs, [model.get_layer(deep).output, model.output])
    elif task == "all activations":
        probe = keras.Model(model.inputs, [[layer.output for layer in layers], model.output])

    @tf.function
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


def tensorflow_sync(out) -> None:
    for v in keras.tree.flatten(out):
        np.asarray(v)


# ---------------------------------------------------------------------- JAX
def jax_hand(model: keras.Model, task: str, deep: str):
    import jax
    import jax.numpy as jnp

    def values(m):
        return ([v.value for v in m.trainable_variables],
                [v.value for v in m.non_trainable_variables])

    if task == "one deep activation":
        trunk, head = _cut(model, deep)

        @jax.jit
        def step(trunk_values, head_values, x):
            a, _ = trunk.stateless_call(*trunk_values, x, training=False)

            def score(a):
                y, _ = head.stateless_call(*head_values, a, training=False)
                return jnp.sum(y[:, CLASS]), y

            (_, y), grad = jax.value_and_grad(score, has_aux=True)(a)
            return grad, a, y

        return lambda x: step(values(trunk), values(head), x)

    if task == "input":
        @jax.jit
        def step_input(model_values, x):
            def score(x):
                y, _ = model.stateless_call(*model_values, x, training=False)
                return jnp.sum(y[:, CLASS]), y

            (_, y), grad = jax.value_and_grad(score, has_aux=True)(x)
            return grad, y

        return lambda x: step_input(values(model), x)

    @jax.jit  # every weight (also the baseline of "all activations")
    def step_weights(trainable, non_trainable, x):
        def score(tv):
            y, _ = model.stateless_call(tv, non_trainable, x, training=False)
            return jnp.sum(y[:, CLASS]), y

        (_, y), grads = jax.value_and_grad(score, has_aux=True)(trainable)
        return grads, y

    return lambda x: step_weights(*values(model), x)


def jax_sync(out) -> None:
    import jax

    jax.block_until_ready(out)


# ------------------------------------------------------------------ PyTorch
def torch_hand(model: keras.Model, task: str, deep: str):
    import torch

    if task == "one deep activation":
        trunk, head = _cut(model, deep)

        def run_deep(x):
            with torch.no_grad():
                a = trunk(x, training=False)
            a = a.detach().requires_grad_(True)
            y = head(a, training=False)
            return torch.autograd.grad(y[:, CLASS].sum(), a)[0], a.detach(), y.detach()

        return run_deep

    if task == "input":
        def run_input(x):
            x = x.detach().requires_grad_(True)
            y = model(x, training=False)
            return torch.autograd.grad(y[:, CLASS].sum(), x)[0], y.detach()

        return run_input

    def run_weights(x):  # every weight (also the baseline of "all activations")
        weights = [v.value for v in model.trainable_variables]
        y = model(x, training=False)
        return torch.autograd.grad(y[:, CLASS].sum(), weights), y.detach()

    return run_weights


def torch_sync(out) -> None:
    pass  # PyTorch on the CPU returns computed tensors


HAND = {"tensorflow": tensorflow_hand, "jax": jax_hand, "torch": torch_hand}
SYNC = {"tensorflow": tensorflow_sync, "jax": jax_sync, "torch": torch_sync}


def _numpy(t) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(t))


def check_same_numbers(model, task, deep, hand_out, g) -> None:
    """gradprobe and the hand-written code compute the same gradients."""
    if task == "all activations":
        return  # (on JAX and PyTorch the baseline computes other things; on TensorFlow,
        # the rows of the other tasks check the same gradients)
    if task == "all weights":
        pairs = [(g[[k for k, var in g.variables.items() if var is v][0]], r)
                 for v, r in zip(model.trainable_variables, hand_out[0])]
    elif task == "input":
        pairs = [(g["inputs"], hand_out[0])]
    else:
        pairs = [(g[deep], hand_out[0])]
    for ours, ref in pairs:
        ours, ref = _numpy(ours), _numpy(ref)
        np.testing.assert_allclose(ours, ref, rtol=2e-4,
                                   atol=1e-5 * float(np.abs(ref).max() + 1e-12))


def bench(name: str, model: keras.Model, x, deep: str, rounds: int, console) -> list[dict]:
    x = keras.ops.convert_to_tensor(x)
    sync = SYNC[BACKEND]
    rows = []
    for task in TASKS:
        wrt = WRT[task] or deep
        raw = HAND[BACKEND](model, task, deep)

        def hand(xx, raw=raw):
            out = raw(xx)
            sync(out)
            return out

        def ours(xx, wrt=wrt):
            g = gp.gradients(model, xx, CLASS, wrt)
            sync((dict(g), dict(g.activations), g.outputs))
            return g

        check_same_numbers(model, task, deep, hand(x), ours(x))
        for _ in range(2):  # warm-up: tracing, compilation, first-call costs
            hand(x)
            ours(x)
        # Each sample runs enough calls to last about 0.2 s.
        reps = max(1, int(0.2 / max(timed(hand, x)[0], 1e-4)))
        med = interleaved({"hand": hand, "ours": ours}, (x,), rounds, reps)
        acts = sum(1 for k, kind in ours(x).kinds.items() if kind == "activation")
        rows.append({"backend": BACKEND, "model": name, "task": task, "activations": acts,
                     "hand_ms": med["hand"][0] * 1e3, "ours_ms": med["ours"][0] * 1e3,
                     "hand_cpu_ms": med["hand"][1] * 1e3, "ours_cpu_ms": med["ours"][1] * 1e3,
                     "ratio": med["ours"][0] / med["hand"][0],
                     "cpu_ratio": med["ours"][1] / med["hand"][1], "reps": reps})
        console.print(f"  {name}: {task} done ({load_note()})", style="dim")
    return rows


def _version() -> str:
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(BACKEND)
    if module is None:
        return BACKEND
    return f"{BACKEND} {__import__(module).__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CNN only")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32, help="small CNN batch size")
    parser.add_argument("--resnet-batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="ResNet50 input size")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--threads", type=int, default=0,
                        help="PyTorch intra-op threads (0: PyTorch's default). On a shared "
                             "machine, 1 avoids OpenMP threads waiting for a busy core")
    args = parser.parse_args()
    if args.threads and BACKEND == "torch":
        import torch

        torch.set_num_threads(args.threads)
    if BACKEND not in HAND:
        raise SystemExit(f"bench_core.py runs on tensorflow, jax or torch, not {BACKEND!r}.")
    console = Console(width=180)
    rng = np.random.default_rng(0)
    rows = bench(f"small CNN, batch {args.batch}", small_cnn(),
                 rng.random((args.batch, 32, 32, 3), dtype=np.float32), "conv2",
                 args.rounds, console)
    if not args.quick:
        rows += bench(f"ResNet50(weights=None) {args.size}x{args.size}, batch "
                      f"{args.resnet_batch}", resnet50(args.size),
                      rng.random((args.resnet_batch, args.size, args.size, 3),
                                 dtype=np.float32),
                      "conv4_block6_out", args.rounds, console)
    table = Table(title=f"gradprobe vs hand-written compiled {_version()} code (median of "
                        f"{args.rounds} interleaved rounds; {load_note()} at the end)")
    for col in ("model", "task", "act. grads", "hand-written ms", "gradprobe ms", "ratio",
                "hand CPU ms", "gradprobe CPU ms", "CPU ratio"):
        table.add_column(col, justify="left" if col in ("model", "task") else "right")
    for r in rows:
        task = r["task"] + (" *" if r["task"] == "all activations" and BACKEND != "tensorflow"
                            else "")
        table.add_row(r["model"], task, str(r["activations"]), f"{r['hand_ms']:.2f}",
                      f"{r['ours_ms']:.2f}", f"{r['ratio']:.3f}", f"{r['hand_cpu_ms']:.1f}",
                      f"{r['ours_cpu_ms']:.1f}", f"{r['cpu_ratio']:.3f}")
    console.print(table)
    if BACKEND != "tensorflow":
        console.print("* baseline: the hand-written gradient of every weight (no hand-written "
                      "form of every activation's gradient): the whole price of the "
                      "activation gradients.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
