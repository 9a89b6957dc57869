"""`gp.activation_patching` (the patched variants stacked along the batch axis: a
whole layer x position sweep in one or a few forward passes) against a loop of
one `gp.intervene` call per (layer, position), and `gp.attribution_patching`
(one clean forward, one corrupted forward, one backward pass), on a small
transformer (2 attention blocks, width 32, 16 tokens, batch 4). The batched and
looped tables are checked equal; interleaved rounds, median seconds per table.

Usage: python benchmarks/bench_patching.py [--rounds N] [--steps N] [--batch N]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import gradprobe as gp  # noqa: E402
from _common import interleaved, load_note  # noqa: E402

LAYERS = ["embed", "block0", "block1", "ln", "logits"]


def transformer(steps: int, vocab: int = 50, width: int = 32) -> keras.Model:
    keras.utils.set_random_seed(0)
    ids = keras.Input((steps,), dtype="int32")
    h = layers.Embedding(vocab, width, name="embed")(ids)
    for i in range(2):
        a = layers.MultiHeadAttention(4, width // 4, name=f"attn{i}")(h, h, use_causal_mask=True)
        h = layers.Add(name=f"block{i}")([h, a])
    h = layers.LayerNormalization(name="ln")(h)
    return keras.Model(ids, layers.Dense(vocab, name="logits")(h))


def loop(model, clean, corrupted, target, steps):
    """One gp.intervene call per (layer, position): the baseline."""
    g = gp.gradients(model, clean, target, LAYERS, unconnected="zero")
    base = np.asarray(keras.ops.convert_to_numpy(
        gp.intervene(model, corrupted, set={"embed": lambda a: a}, target=target).target))
    out = np.zeros((len(LAYERS), steps))
    for i, name in enumerate(LAYERS):
        source = g.activations[name]
        for p in range(steps):
            mask = np.zeros((1, steps, 1), bool)
            mask[0, p] = True
            m = keras.ops.convert_to_tensor(mask)

            def patch(a, source=source, m=m):
                return keras.ops.where(m, keras.ops.cast(source, a.dtype), a)

            r = gp.intervene(model, corrupted, set={name: patch}, target=target)
            out[i, p] = np.mean(keras.ops.convert_to_numpy(r.target) - base)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    model = transformer(args.steps)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 50, size=(args.batch, args.steps)).astype("int32")
    corrupted = clean.copy()
    corrupted[:, args.steps // 2] = (clean[:, args.steps // 2] + 1) % 50
    target = gp.at(-1, [int(t) for t in clean[:, 0]])

    def exact(batch_size=256):
        return gp.activation_patching(model, clean, corrupted, target, LAYERS,
                                      positions="all", batch_size=batch_size)

    def estimate():
        return gp.attribution_patching(model, clean, corrupted, target, LAYERS,
                                       positions="all")

    batched = exact()
    looped = loop(model, clean, corrupted, target, args.steps)
    scale = float(np.abs(batched.effects).max())
    np.testing.assert_allclose(batched.effects, looped, atol=1e-4 * max(scale, 1e-3))
    agreement = estimate().agreement(batched)
    fns = {
        "loop: gp.intervene per (layer, position)": lambda: loop(model, clean, corrupted,
                                                                 target, args.steps),
        "gp.activation_patching (256 rows a pass)": exact,
        "gp.activation_patching (batch_size=None)": lambda: exact(None),
        "gp.attribution_patching": estimate,
    }
    times = interleaved(fns, (), args.rounds)
    base = times["loop: gp.intervene per (layer, position)"][0]
    variants = len(LAYERS) * args.steps
    table = Table(title=f"patching, {keras.backend.backend()}, {variants} variants x batch "
                        f"{args.batch}: median seconds per table ({load_note()})")
    for col in ("variant", "wall (s)", "CPU (s)", "speed-up vs loop"):
        table.add_column(col)
    for label, (wall, cpu) in times.items():
        table.add_row(label, f"{wall:.3f}", f"{cpu:.3f}", f"{base / wall:.1f}x")
    Console().print(table)
    print(f"attribution vs exact: pearson {agreement.pearson:.3f}, spearman "
          f"{agreement.spearman:.3f}, max |difference| {agreement.max_abs_error:.3g} "
          f"(largest |effect| {agreement.scale:.3g})")


if __name__ == "__main__":
    main()
