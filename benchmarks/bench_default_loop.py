"""The speed users get: each public function called with default arguments in a loop.

Runs under the backend that `KERAS_BACKEND` selects. A user's loop keeps the
previous result until the next call returns (`g = gp.gradients(...)` in a `for`
loop) and runs with the garbage collector on; so does this benchmark. For each
model and function it calls, on a fresh copy of the model each time (same
weights), `--calls` times in a row:

* `default`: the public function with its default arguments (`compile="auto"`
  for `gp.gradients`);
* `compile=True` and `compile=False` (`gp.gradients` only);
* `hand-written`: the backend's hand-written compiled code for the same
  gradient (benchmarks/bench_core.py's baselines: a probe model and a tape in a
  `tf.function`, `jax.jit(jax.value_and_grad)`, `torch.autograd.grad`).
  Saliency's baseline is the input gradient, Grad-CAM's the gradient of its
  layer's activation, Integrated Gradients' the input gradient of all its
  interpolated inputs in one call; what gradprobe adds (abs/max, the weighted
  sum, the trapezoid sum) is part of its price.

The table gives, per variant, the total time of the first 1, 3 and 10 calls
(first-call costs included: tracing, compiling) and the median of the calls
after the third (the steady state), and the ratios to the hand-written code
(target: steady state <= 1.10; `compile="auto"` never worse than the better of
`True` and `False` by more than 10% at 3 calls or more). On JAX and PyTorch (and on the
keras-hub BERT classifier everywhere) the "all activations" baseline is the
gradient of every weight (less work; see bench_core.py).

Usage: KERAS_BACKEND=<tensorflow|jax|torch> python benchmarks/bench_default_loop.py
       [--quick] [--calls N] [--size S] [--batch B] [--models mlp,cnn,bert,resnet]
       [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import gradprobe as gp  # noqa: E402
from _common import CLASS, load_note, resnet50, small_cnn  # noqa: E402
from bench_core import HAND, SYNC, _version  # noqa: E402

BACKEND = keras.backend.backend()
IG_STEPS = 50  # integrated_gradients' default


def mlp() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((64,))
    h = keras.layers.Dense(256, activation="relu", name="d0")(inp)
    h = keras.layers.Dense(256, activation="relu", name="d1")(h)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(h), name="mlp")


def bert(size: int | None = None) -> keras.Model:
    """A keras-hub `BertTextClassifier` from a small config (2 layers, hidden 128,
    sequence 64, vocabulary 1000; no weights downloaded), 4 classes."""
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=1000, num_layers=2, num_heads=2,
                                             hidden_dim=128, intermediate_dim=512,
                                             max_sequence_length=64)
    return keras_hub.models.BertTextClassifier(backbone, num_classes=4, preprocessor=None)


def bert_inputs(batch: int) -> dict:
    ids = np.random.default_rng(0).integers(1, 1000, size=(batch, 64)).astype("int32")
    return {"token_ids": ids, "segment_ids": np.zeros_like(ids),
            "padding_mask": np.ones_like(ids)}


MODELS = {
    # name -> (builder(size), input shape(size), deep layer, spatial layer or None)
    "mlp": (lambda size: mlp(), lambda size: (64,), "d1", None),
    "cnn": (lambda size: small_cnn(), lambda size: (32, 32, 3), "conv2", "conv2"),
    "resnet": (resnet50, lambda size: (size, size, 3), "conv4_block6_out", "conv5_block3_out"),
    "bert": (bert, None, None, None),  # token ids: the gradients of activations and weights
}


def functions(deep: str, spatial: str | None, ig: bool = True) -> dict:
    """name -> (gradprobe call(model, x, **options), hand task, takes compile=)."""
    out = {
        "gradients: one deep activation": (
            lambda m, x, **kw: gp.gradients(m, x, CLASS, deep, **kw), "one deep activation",
            True),
        "gradients: all activations": (
            lambda m, x, **kw: gp.gradients(m, x, CLASS, "*", **kw), "all activations", True),
        "gradients: all weights": (
            lambda m, x, **kw: gp.gradients(m, x, CLASS, "*.weights", **kw), "all weights",
            True),
        "gradients: input": (
            lambda m, x, **kw: gp.gradients(m, x, CLASS, "inputs", **kw), "input", True),
        "saliency": (lambda m, x: gp.saliency(m, x, CLASS), "input", False),
    }
    if deep is None:  # token ids: no input gradient, no deep cut for the baseline
        out = {k: out[k] for k in ("gradients: all activations", "gradients: all weights")}
        out["gradients: all activations"] = (out["gradients: all activations"][0],
                                             "all weights", True)
        return out
    if ig:  # 50 steps x the batch: left out on ResNet50 (half a minute a call on 2 cores)
        out["integrated_gradients"] = (
            lambda m, x: gp.integrated_gradients(m, x, CLASS, progress=False), "ig", False)
    if spatial is not None:
        out["grad_cam"] = (lambda m, x: gp.grad_cam(m, x, CLASS, spatial),
                           "one deep activation", False)
    return out


def _parts(result):
    """The tensors a call returns, to wait for them."""
    if isinstance(result, gp.Gradients):
        return [dict(result), dict(result.activations), result.outputs]
    if isinstance(result, gp.Attribution):
        return [result.values]
    return result


def hand_call(model: keras.Model, task: str, deep: str):
    """The hand-written baseline of `task` (an Integrated Gradients baseline for "ig")."""
    if task != "ig":
        return HAND[BACKEND](model, task, deep)
    grad = HAND[BACKEND](model, "input", deep)
    alphas = (np.arange(IG_STEPS, dtype="float32") + 0.5) / IG_STEPS

    def ig(x):
        x = keras.ops.convert_to_tensor(x)
        path = keras.ops.reshape(
            keras.ops.convert_to_tensor(alphas)[:, None] * keras.ops.reshape(x, (1, -1)),
            (-1, *x.shape[1:]))
        g, y = grad(path)
        return keras.ops.sum(keras.ops.reshape(g, (IG_STEPS, *x.shape)), axis=0) * x / IG_STEPS, y

    return ig


def variant(label: str, model: keras.Model, call, task: str, deep: str):
    """The function of one column: `x -> result`."""
    if label == "hand-written":
        return hand_call(model, task, deep)
    if label == "default":
        return lambda x: call(model, x)
    return lambda x: call(model, x, compile=label == "compile=True")


def loop(fn, x, calls: int) -> list[float]:
    """Wall seconds of each of `calls` calls, each result kept until the next call
    returns, as in a user's loop, with the garbage collector on."""
    sync = SYNC[BACKEND]
    times, result = [], None
    for _ in range(calls):
        t0 = time.perf_counter()
        new = fn(x)
        sync(_parts(new))
        times.append(time.perf_counter() - t0)
        result = new  # the previous result is dropped only now
    del result
    return times


def bench(model_name: str, size: int, batch: int, calls: int, console) -> list[dict]:
    build, shape, deep, spatial = MODELS[model_name]
    if shape is None:
        x = {k: keras.ops.convert_to_tensor(v) for k, v in bert_inputs(batch).items()}
    else:
        x = keras.ops.convert_to_tensor(
            np.random.default_rng(0).random((batch, *shape(size)), dtype=np.float32))
    rows = []
    for name, (call, task, takes_compile) in functions(deep, spatial, model_name != "resnet").items():
        labels = ["default", "compile=True", "compile=False"] if takes_compile else ["default"]
        labels.append("hand-written")
        row = {"backend": BACKEND, "model": f"{model_name} b{batch}", "function": name}
        for label in labels:
            model = build(size)  # a fresh model: first calls are first calls
            gc.collect()
            times = loop(variant(label, model, call, task, deep), x, calls)
            row[label] = {"first": times[0], "first3": sum(times[:3]),
                          "first10": sum(times[:10]),
                          "steady": statistics.median(times[3:]) if calls > 3 else times[-1],
                          "calls": times}
            del model
        rows.append(row)
        console.print(f"  {row['model']}: {name} done ({load_note()})", style="dim")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="without ResNet50")
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--size", type=int, default=224, help="ResNet50 input size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", default="mlp,cnn,bert,resnet")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if BACKEND not in HAND:
        raise SystemExit(f"bench_default_loop.py runs on tensorflow, jax or torch, not "
                         f"{BACKEND!r}.")
    console = Console(width=200)
    models = [m for m in args.models.split(",") if not (args.quick and m == "resnet")]
    # The process's own first-call costs (imports, the backend's first trace) would land
    # on whichever row runs first: one throwaway round on another MLP pays them.
    bench("mlp", args.size, args.batch, 2, Console(quiet=True))
    rows = []
    for m in models:
        rows += bench(m, args.size, args.batch, args.calls, console)
    table = Table(title=f"Default arguments in a loop, {args.calls} calls, previous result "
                        f"kept, collector on, {_version()} ({load_note()} at the end). "
                        "ms: first call / first 3 / first 10 / steady (median after the 3rd)")
    for col in ("model", "function", "default", "compile=True", "compile=False",
                "hand-written", "steady ratio", "auto vs best at 3 / 10"):
        table.add_column(col, justify="left" if col in ("model", "function") else "right")

    def cell(v):
        if v is None:
            return "-"
        return (f"{v['first'] * 1e3:.0f} / {v['first3'] * 1e3:.0f} / {v['first10'] * 1e3:.0f}"
                f" / {v['steady'] * 1e3:.1f}")

    for r in rows:
        d, h = r["default"], r["hand-written"]
        r["steady_ratio"] = d["steady"] / h["steady"]
        best = [r[k] for k in ("compile=True", "compile=False") if k in r]
        vs = "-"
        if best:
            r["auto_vs_best3"] = d["first3"] / min(b["first3"] for b in best)
            r["auto_vs_best10"] = d["first10"] / min(b["first10"] for b in best)
            vs = f"{r['auto_vs_best3']:.2f} / {r['auto_vs_best10']:.2f}"
        table.add_row(r["model"], r["function"], cell(d), cell(r.get("compile=True")),
                      cell(r.get("compile=False")), cell(h), f"{r['steady_ratio']:.3f}", vs)
    console.print(table)
    if BACKEND != "tensorflow":
        console.print("On JAX and PyTorch the 'all activations' baseline is the gradient of "
                      "every weight (less work).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
