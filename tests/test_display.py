"""Keys and display (issue 12, item 7): two selectors of one source both work as
keys; `summary()` shortens long keys in the middle and never prints two rows alike."""

from __future__ import annotations

import re

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import gradprobe as gp
from gradprobe.core.result import shorten_keys
from gradprobe.core.selectors import LayerTree, resolve
from oracle import assert_close
from tolerance import F32


class Attention(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.query_dense = layers.Dense(4, name="query_dense")
        self.output_dense = layers.Dense(4, name="attention_output_dense")

    def call(self, x):
        return self.output_dense(tf.tanh(self.query_dense(x)))


class TransformerLayer(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.self_attention = Attention(name="self_attention_with_rotary_embedding")

    def call(self, x):
        return x + self.self_attention(x)


class Stack(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [TransformerLayer(name=f"transformer_decoder_layer_{i}") for i in range(12)]

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Backbone(keras.Model):
    """keras-hub-like long nested paths that differ only in the middle."""

    def __init__(self):
        super().__init__(name="gemma_causal_lm")
        self.backbone = Stack(name="gemma_backbone")
        self.head = layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.backbone(x))


def test_summary_shortens_in_the_middle_and_rows_stay_distinct():
    keras.utils.set_random_seed(0)
    model = Backbone()
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    model(x)
    g = gp.gradients(model, x, 0, ["*", "*.kernel"])
    assert len(g) == 2 * (12 * 2 + 1)
    assert max(map(len, g)) > 90  # really long keys
    lines: list[str] = []
    g.summary(print_fn=lines.append, findings=False)
    rows = [line.split("│")[1].strip() for line in lines[0].splitlines()
            if line.startswith("│")]
    assert len(rows) == len(g)  # one line per key: nothing wrapped
    assert len(set(rows)) == len(rows)  # never two identical rows
    for key, shown in zip(g, rows):
        # "…" stands for what was left out: the row still spells its own key
        pattern = ".*".join(re.escape(part) for part in shown.split("…"))
        assert re.fullmatch(pattern, key), (key, shown)
        if len(key) > 48:
            assert "…" in shown and len(shown) <= 48, (key, shown)
        else:
            assert shown == key
    # the block index and the variable survive: the rows of block 1 and block 10 differ
    assert any(r.endswith("query_dense.kernel") for r in rows)


def test_shorten_keys_edge_cases():
    assert shorten_keys(["d", "a/b"]) == {"d": "d", "a/b": "a/b"}
    keys = ["root/" + "x" * 30 + "/a/" + "y" * 20 + "/k", "root/" + "x" * 30 + "/b/" + "y" * 20
            + "/k", "root/" + "x" * 30 + "/a/" + "y" * 20]
    shown = shorten_keys(keys, limit=30)
    assert len(set(shown.values())) == 3
    assert all(v.startswith("root/") for v in shown.values())


def _nested():
    keras.utils.set_random_seed(1)
    inner = keras.Sequential([layers.Dense(3, activation="tanh", name="d1")], name="inner")
    inp = keras.Input((4,))
    return keras.Model(inp, layers.Dense(2, name="out")(inner(inp)))


def test_two_selectors_of_one_source_both_work_as_keys():
    model = _nested()
    x = np.random.default_rng(1).normal(size=(3, 4)).astype("float32")
    sources = resolve(LayerTree(model), ["inner/d1", "d1", "inner/d1.kernel", "d1.kernel"])
    assert [(s.requested, s.also) for s in sources] == [("inner/d1", ("d1",)),
                                                       ("inner/d1.kernel", ("d1.kernel",))]
    g = gp.gradients(model, x, 1, ["inner/d1", "d1", "d1.kernel", "inner/d1.kernel"])
    assert list(g) == ["inner/d1", "inner/d1.kernel"]
    # oracle: a hand-written tape through the same weights
    d1, out = model.get_layer("inner").get_layer("d1"), model.get_layer("out")
    with tf.GradientTape(persistent=True) as t:
        h = d1(tf.constant(x))
        t.watch(h)
        y = out(h)[:, 1]
    ref_h, ref_k = t.gradient(y, h), t.gradient(y, d1.kernel.value)
    for name in ("inner/d1", "d1"):
        assert_close(g[name], ref_h, F32, name)
    for name in ("inner/d1.kernel", "d1.kernel"):
        assert_close(g[name], ref_k, F32, name)
    assert "d1" in g and "nope" not in g


def test_result_aliases_from_meta():
    """The result answers every alias capture reports, and a bare name by suffix."""
    grads = {"inner/d1@0": tf.ones(2), "inner/d1@1": tf.zeros(2), "out": tf.fill([2], 3.0)}
    meta = {"order": list(grads), "kinds": dict.fromkeys(grads, "activation"),
            "aliases": {"inner/d1": ["inner/d1@0", "inner/d1@1"], "o": ["out"],
                        "last": ["out"]}}
    g = gp.Gradients(grads, meta, grads, None, None)
    assert float(g["o"][0]) == float(g["last"][0]) == 3.0
    assert float(g["d1@1"][0]) == 0.0 and float(g["d1@0"][0]) == 1.0
    for name in ("d1", "inner/d1"):
        try:
            g[name]
        except KeyError as e:
            assert "inner/d1@0" in str(e) and "inner/d1@1" in str(e)
        else:
            raise AssertionError(f"{name!r} names two calls and must ask which")
