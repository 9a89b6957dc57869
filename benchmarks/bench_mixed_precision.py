"""gp.gradients of a `mixed_float16` model against hand-written loss-scaled code, on
the current backend (TensorFlow, JAX or PyTorch).

The small CNN of `_common.py` built under `mixed_float16` (its last layer in
float32, as Keras recommends); the gradient of the class score with respect to
every trainable weight. Rows:

* `hand-written, scale 2**15`: the code a user writes with a fixed loss scale:
  one forward pass, one backward pass seeded with 2**15, unscaled in float32
  (`tf.function` + tape with `output_gradients`, `jax.jit` of a `jax.vjp`
  pullback, `torch.autograd.grad` with `grad_outputs`);
* `hand-written, measured scale`: what gradprobe does, written by hand: a first
  backward pass at scale 1, the power of two that brings the largest gradient to
  about 2**14, a second backward pass at that scale, unscaled in float32, a
  non-finite source kept from the first pass;
* `gradprobe`: `gp.gradients(model, x, 0, "*.weights")`;
* `gradprobe, float32 twin`: the same weights in a float32 model (on a CPU,
  float16 arithmetic is emulated: this row says what mixed precision costs
  there, not what it saves on a GPU).

Every variant is checked against the hand-written measured-scale gradients
before timing. Calls are interleaved in rounds (on JAX each waits for its
results); medians of wall and CPU time.

Usage: KERAS_BACKEND=<tensorflow|jax|torch> python benchmarks/bench_mixed_precision.py
       [--rounds N] [--batch B]
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

BACKEND = keras.backend.backend()
HEADROOM = 2.0 ** 14


def mixed_cnn() -> keras.Model:
    """`small_cnn` under mixed_float16, with its logits layer in float32."""
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = small_cnn()
    finally:
        keras.config.set_dtype_policy(old)
    twin = small_cnn()
    # (the logits layer in float32: rebuild it under that policy, same weights)
    inp = model.inputs[0]
    h = model.get_layer("fc").output
    logits = keras.layers.Dense(10, name="logits", dtype="float32")(h)
    model = keras.Model(inp, logits, name="small_cnn_mixed")
    model.set_weights(twin.get_weights())
    return model, twin


def exponent(peak: float) -> float:
    """The power of two of the measured scale (NumPy, for the hand-written code)."""
    if not np.isfinite(peak):
        peak = 2.0 ** 16
    if peak == 0:
        return 15.0
    return float(np.clip(np.floor(np.log2(HEADROOM / peak)), -14, 15))


def handwritten(model: keras.Model):
    """`{"fixed": fn, "measured": fn}`: x -> float32 weight gradients."""
    variables = model.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def backward(x, measured):
            with tf.GradientTape(persistent=True) as tape:
                y = model(x, training=False)
                obj = tf.reduce_sum(y[:, CLASS])
            if not measured:
                scale = tf.constant(2.0 ** 15)
                gs = tape.gradient(obj, variables, output_gradients=tf.cast(scale, obj.dtype))
                return [tf.cast(g, tf.float32) / scale for g in gs]
            first = [tf.cast(g, tf.float32) for g in tape.gradient(obj, variables)]
            peak = tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(g)) for g in first]))
            peak = tf.where(tf.math.is_finite(peak), peak, 2.0 ** 16)
            peak = tf.where(peak > 0, peak, HEADROOM * 2.0 ** -15)
            scale = tf.pow(2.0, tf.clip_by_value(
                tf.floor(tf.math.log(HEADROOM / peak) / np.log(2.0)), -14.0, 15.0))
            second = tape.gradient(obj, variables, output_gradients=tf.cast(scale, obj.dtype))
            out = []
            for g1, g2 in zip(first, second):
                g2 = tf.cast(g2, tf.float32) / scale
                out.append(tf.where(tf.reduce_all(tf.math.is_finite(g2)), g2, g1))
            return out

        fixed = tf.function(lambda x: backward(x, False), reduce_retracing=True)
        measured = tf.function(lambda x: backward(x, True), reduce_retracing=True)
        return {"fixed": fixed, "measured": measured}
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        def backward(tv, ntv, x, measured):
            def objective(t):
                return jnp.sum(model.stateless_call(t, ntv, x)[0][:, CLASS])

            obj, pullback = jax.vjp(objective, tv)
            if not measured:
                scale = jnp.float32(2.0 ** 15)
                (gs,) = pullback(scale.astype(obj.dtype))
                return [g.astype(jnp.float32) / scale for g in gs]
            (first,) = pullback(jnp.ones_like(obj))
            first = [g.astype(jnp.float32) for g in first]
            peak = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in first]))
            peak = jnp.where(jnp.isfinite(peak), peak, 2.0 ** 16)
            peak = jnp.where(peak > 0, peak, HEADROOM * 2.0 ** -15)
            scale = 2.0 ** jnp.clip(jnp.floor(jnp.log2(HEADROOM / peak)), -14, 15)
            (second,) = pullback(scale.astype(obj.dtype))
            return [jnp.where(jnp.all(jnp.isfinite(g2 / scale)), g2.astype(jnp.float32) / scale,
                              g1) for g1, g2 in zip(first, second)]

        fixed = jax.jit(lambda tv, ntv, x: backward(tv, ntv, x, False))
        measured = jax.jit(lambda tv, ntv, x: backward(tv, ntv, x, True))

        def bind(fn):
            def run(x):
                return fn([v.value for v in variables],
                          [v.value for v in model.non_trainable_variables], x)
            return run

        return {"fixed": bind(fixed), "measured": bind(measured)}
    import torch

    def backward(x, measured):
        weights = [v.value for v in variables]
        obj = model(x, training=False)[:, CLASS].sum()
        if not measured:
            gs = torch.autograd.grad(obj, weights, grad_outputs=torch.full_like(obj, 2.0 ** 15))
            return [g.float() / 2.0 ** 15 for g in gs]
        first = [g.float() for g in torch.autograd.grad(obj, weights, retain_graph=True)]
        e = exponent(float(max(g.abs().max() for g in first)))
        scale = 2.0 ** e
        second = torch.autograd.grad(obj, weights, grad_outputs=torch.full_like(obj, scale))
        out = []
        for g1, g2 in zip(first, second):
            g2 = g2.float() / scale
            out.append(g2 if bool(torch.isfinite(g2).all()) else g1)
        return out

    return {"fixed": lambda x: backward(x, False), "measured": lambda x: backward(x, True)}


def waited(fn):
    """`fn` that returns once its results are computed (JAX dispatches asynchronously)."""
    if BACKEND != "jax":
        return fn
    import jax

    def run(x):
        out = fn(x)
        return jax.block_until_ready(dict(out) if isinstance(out, gp.Gradients) else out)

    return run


def as_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    model, twin = mixed_cnn()
    x = keras.ops.convert_to_tensor(
        np.random.default_rng(0).normal(size=(args.batch, 32, 32, 3)).astype("float32"))
    hand = handwritten(model)

    def ours(x):
        return gp.gradients(model, x, CLASS, "*.weights")

    def ours_twin(x):
        return gp.gradients(twin, x, CLASS, "*.weights")

    want = [as_numpy(g) for g in hand["measured"](x)]
    got = ours(x)
    keys = {id(v): k for k, v in got.variables.items()}
    for v, w in zip(model.trainable_variables, want):  # the same numbers first
        g = as_numpy(got[keys[id(v)]])
        assert g.dtype == np.float32
        scale = float(np.abs(w).max()) or 1.0
        assert float(np.abs(g - w).max()) <= 16 * 2.0 ** -10 * scale, keys[id(v)]
    fns = {"hand-written, scale 2**15": hand["fixed"],
           "hand-written, measured scale": hand["measured"],
           "gradprobe": ours, "gradprobe, float32 twin": ours_twin}
    fns = {k: waited(fn) for k, fn in fns.items()}
    for fn in fns.values():  # warm-up (compilation)
        for _ in range(3):
            fn(x)
    med = interleaved(fns, (x,), args.rounds)
    base = med["hand-written, measured scale"]
    table = Table(title=f"mixed_float16 small CNN, all weights, {BACKEND}, batch {args.batch}, "
                        f"median of {args.rounds} interleaved rounds ({load_note()})")
    for col in ("variant", "ms", "CPU ms", "/ measured-scale hand-written (wall)",
                "(CPU)"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for label, (wall, cpu) in med.items():
        table.add_row(label, f"{wall * 1e3:.2f}", f"{cpu * 1e3:.1f}", f"{wall / base[0]:.2f}",
                      f"{cpu / base[1]:.2f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
