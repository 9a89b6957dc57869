"""Every trainable variable is reachable (issue 12, items 1 and 5): variables owned
by non-leaf layers and by the model itself, under one stable key each, and
per-example norms of all of them, against hand-written tapes and per-example loops."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp
from oracle import assert_close


class PatchEmbed(layers.Layer):
    """ViT-like: a projection, a class token added with add_weight next to sublayers,
    and a position embedding over arange(n)[None] broadcast over the batch."""

    def __init__(self, tokens, dim, **kwargs):
        super().__init__(**kwargs)
        self.tokens, self.dim = tokens, dim
        self.proj = layers.Dense(dim, name="proj")
        self.pos = layers.Embedding(tokens + 1, dim, name="pos")

    def build(self, shape):
        self.class_token = self.add_weight(shape=(1, 1, self.dim), name="class_token",
                                           initializer="random_normal")
        self.proj.build(shape)
        self.pos.build((1, self.tokens + 1))

    def call(self, x):
        t = self.proj(x)
        cls = tf.repeat(tf.cast(self.class_token, t.dtype), tf.shape(x)[0], axis=0)
        t = tf.concat([cls, t], axis=1)
        return t + self.pos(tf.range(self.tokens + 1)[None])


class TinyViT(keras.Model):
    """A subclassed model with its own add_weight variables (one frozen)."""

    def __init__(self):
        super().__init__(name="tiny_vit")
        self.embed = PatchEmbed(4, 6, name="embed")
        self.norm = layers.LayerNormalization(name="norm")
        self.head = layers.Dense(3, name="head")

    def build(self, shape):
        self.embed.build(shape)
        self.norm.build((None, 5, 6))
        self.head.build((None, 6))
        self.temperature = self.add_weight(shape=(), name="temperature", initializer="ones")
        self.offset = self.add_weight(shape=(3,), name="offset", initializer="zeros",
                                      trainable=False)

    def call(self, x):
        h = self.norm(self.embed(x))
        return self.head(h[:, 0]) * self.temperature + self.offset


def _vit(seed=0):
    keras.utils.set_random_seed(seed)
    model = TinyViT()
    x = np.random.default_rng(seed).normal(size=(3, 4, 5))
    model(x)
    return model, x


def _functional():
    """A Functional model with a custom layer (sublayers + its own variable) and a
    nested Sequential."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((4, 5))
    h = PatchEmbed(4, 6, name="block1")(inp)
    h = layers.Flatten()(h)
    inner = keras.Sequential([layers.Dense(7, activation="tanh", name="d1")], name="inner")
    out = layers.Dense(2, name="out")(inner(h))
    return keras.Model(inp, out), np.random.default_rng(1).normal(size=(3, 4, 5))


def _tape(model, x, target_fn, variables):
    with tf.GradientTape() as t:
        obj = tf.reduce_sum(target_fn(model(tf.constant(x))))
    grads = t.gradient(obj, [v.value for v in variables])
    return {id(v): tf.convert_to_tensor(gr) for v, gr in zip(variables, grads)}


@pytest.mark.parametrize("build", [_vit, _functional])
def test_star_weights_is_exactly_trainable_variables(float64, build):
    model, x = build()
    g = gp.gradients(model, x, 1, "*.weights")
    got = [id(v) for v in g.variables.values()]
    assert len(got) == len(set(got)) == len(g)
    assert set(got) == {id(v) for v in model.trainable_variables}
    ref = _tape(model, x, lambda y: y[:, 1], model.trainable_variables)
    for key, var in g.variables.items():
        assert_close(g[key], ref[id(var)], 1e-12, key)


def test_non_leaf_and_model_variables_have_one_stable_key(float64):
    model, x = _vit()
    g = gp.gradients(model, x, 0, "*.weights")
    assert g.variables["embed.class_token"] is model.embed.class_token
    assert g.variables["tiny_vit.temperature"] is model.temperature
    assert "tiny_vit.offset" not in g  # not trainable: not in "*.weights"
    ref = _tape(model, x, lambda y: y[:, 0], [model.embed.class_token, model.temperature])
    for key in ("embed.class_token", "tiny_vit.temperature"):
        # the key itself, a glob on the variable name and the variable object agree
        alone = gp.gradients(model, x, 0, key)
        by_glob = gp.gradients(model, x, 0, "*." + key.split(".")[1])
        by_obj = gp.gradients(model, x, 0, g.variables[key])
        assert list(alone) == list(by_glob) == list(by_obj) == [key]
        for r in (alone, by_glob, by_obj):
            assert_close(r[key], ref[id(g.variables[key])], 1e-12, key)
    # a non-trainable variable of the model is still reachable by name
    assert list(gp.gradients(model, x, 0, "*.offset")) == ["tiny_vit.offset"]
    # freezing a layer removes exactly its variables from "*.weights"
    model.head.trainable = False
    # engine's plan cache keys on the layers and the number of weights, not on
    # trainable flags (reported to its owner); start from a clean cache here.
    gp.clear_cache()
    try:
        frozen = gp.gradients(model, x, 0, "*.weights")
        assert {id(v) for v in frozen.variables.values()} == \
            {id(v) for v in model.trainable_variables}
        assert "head.kernel" not in frozen
    finally:
        model.head.trainable = True


def test_glob_patterns_reach_non_leaf_owners(float64):
    model, x = _functional()
    g = gp.gradients(model, x, 0, "block1*.weights")
    assert set(g) == {"block1.class_token", "block1/proj.kernel", "block1/proj.bias",
                      "block1/pos.embeddings"}
    assert set(gp.gradients(model, x, 0, "inner/*.weights")) == {"inner/d1.kernel",
                                                                  "inner/d1.bias"}
    with pytest.raises(gp.GradprobeError, match="block1.class_token"):
        gp.gradients(model, x, 0, "*.nothing_like_this")


def _loop_norms(model, x, labels, variables):
    """Per-example gradient norms from a Python loop of hand-written tapes."""
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as t:
            out = model(tf.constant(x[i:i + 1]))
            obj = tf.reduce_sum(out[:, labels[i]])
        rows.append([np.linalg.norm(tf.convert_to_tensor(gr).numpy())
                     for gr in t.gradient(obj, [v.value for v in variables])])
    return {id(v): np.array(col) for v, col in zip(variables, zip(*rows))}


@pytest.mark.parametrize("method", ["auto", "ghost", "vectorized"])
def test_per_example_norms_cover_every_variable_and_broadcast_layers(float64, method):
    model, x = _vit()
    labels = [0, 2, 1]
    n = gp.per_example_norms(model, x, labels, method=method)
    g = gp.gradients(model, x, labels, "*.weights")
    assert set(n) == set(g)
    ref = _loop_norms(model, x, labels, model.trainable_variables)
    for key, var in g.variables.items():
        assert_close(n[key], ref[id(var)], 1e-9, f"{method} {key}")
    assert_close(n.total, np.sqrt(sum(r ** 2 for r in ref.values())), 1e-9)
    if method != "vectorized":
        # the position embedding runs on arange(n)[None]: one row shared by the batch
        assert n.method["embed/pos.embeddings"] == "vectorized"
        assert "shared by the batch of 3" in n.fallbacks["embed/pos.embeddings"]
        assert "model's own" in n.fallbacks["tiny_vit.temperature"]
        assert "PatchEmbed has no ghost-norm identity" in n.fallbacks["embed.class_token"]
        assert n.method["embed/proj.kernel"] != "vectorized"


def test_per_example_gradients_of_broadcast_layer_match_loop(float64):
    model, x = _vit()
    labels = [2, 0, 1]
    g = gp.gradients(model, x, labels, ["embed/pos.embeddings", "embed.class_token"],
                     per_example=True)
    for i in range(len(x)):
        ref = _tape(model, x[i:i + 1], lambda y, i=i: y[:, labels[i]],
                    [model.embed.pos.embeddings, model.embed.class_token])
        assert_close(g["embed/pos.embeddings"][i],
                     ref[id(model.embed.pos.embeddings)], 1e-12)
        assert_close(g["embed.class_token"][i], ref[id(model.embed.class_token)], 1e-12)
