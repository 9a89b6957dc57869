"""A catalog of layer types, each placed in every kind of model.

`build(case, kind)` returns `(model, inputs, layer, path, call_indices, output)`:
the model, a float64 batch (or int ids), the layer under test, its path in the
model, which calls of it the forward pass makes, and the output to select.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras import layers, ops

KINDS = ["sequential", "functional", "subclassed", "nested_model", "custom_layer",
         "shared", "multi_output"]


@keras.saving.register_keras_serializable(package="gradprobe_tests")
class ScaleShift(layers.Layer):
    """A custom layer with its own weights."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="w")
        self.b = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="b")

    def call(self, x):
        return ops.tanh(x * self.w + self.b)


@keras.saving.register_keras_serializable(package="gradprobe_tests")
class Square(layers.Layer):
    """A custom activation layer (seed 004, example 3)."""

    def call(self, x):
        return ops.square(x)


class Looped(keras.Model):
    """A layer called in a loop body (keras.ops.fori_loop: a lax loop on JAX), for
    the tests that such a layer is never probed."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.pre = layers.Dense(4, name="pre")
        self.step = layers.Dense(4, activation="tanh", name="step")
        self.out = layers.Dense(3, name="out")

    def call(self, x):
        h = self.pre(x)
        h = keras.ops.fori_loop(0, 3, lambda i, h: self.step(h), h)
        return self.out(h)


def _single(layer, x):
    return layer(x)


def _pair(layer, x):
    return layer([x, ops.tanh(x)])


def _self_attention(layer, x):
    return layer(x, x)


@dataclass
class Case:
    name: str
    shape: tuple
    make: Callable[[], Any]
    apply: Callable[[Any, Any], Any] = _single
    int_input: int = 0  # vocabulary size for integer inputs
    training: bool = False
    kinds: list[str] = field(default_factory=lambda: list(KINDS))


def _bn():
    return layers.BatchNormalization(moving_mean_initializer="random_normal",
                                      moving_variance_initializer="ones",
                                      gamma_initializer="random_normal")


CASES = [
    Case("dense", (6,), lambda: layers.Dense(5, activation="tanh")),
    Case("conv1d", (7, 3), lambda: layers.Conv1D(4, 3, activation="tanh")),
    Case("conv2d", (6, 6, 2), lambda: layers.Conv2D(3, 3, activation="tanh")),
    Case("conv3d", (4, 4, 4, 2), lambda: layers.Conv3D(2, 2, activation="tanh")),
    Case("depthwise_conv2d", (6, 6, 2),
         lambda: layers.DepthwiseConv2D(3, depth_multiplier=2, activation="tanh")),
    Case("separable_conv2d", (6, 6, 2), lambda: layers.SeparableConv2D(3, 3, activation="tanh")),
    Case("conv2d_transpose", (4, 4, 2), lambda: layers.Conv2DTranspose(3, 3, strides=2)),
    Case("batchnorm_inference", (5,), _bn),
    Case("batchnorm_training", (5,), _bn, training=True),
    Case("layernorm", (4, 5), lambda: layers.LayerNormalization(gamma_initializer="random_normal")),
    Case("dropout", (6,), lambda: layers.Dropout(0.5)),
    Case("maxpool2d", (6, 6, 2), lambda: layers.MaxPooling2D()),
    Case("avgpool1d", (8, 3), lambda: layers.AveragePooling1D(2)),
    Case("global_avgpool2d", (5, 5, 3), lambda: layers.GlobalAveragePooling2D()),
    Case("embedding", (5,), lambda: layers.Embedding(11, 4), int_input=11),
    Case("simple_rnn", (5, 3), lambda: layers.SimpleRNN(4)),
    Case("lstm", (5, 3), lambda: layers.LSTM(4, return_sequences=True)),
    Case("gru", (5, 3), lambda: layers.GRU(4)),
    Case("bidirectional", (5, 3), lambda: layers.Bidirectional(layers.LSTM(3))),
    Case("multi_head_attention", (4, 6),
         lambda: layers.MultiHeadAttention(num_heads=2, key_dim=3), apply=_self_attention,
         kinds=[k for k in KINDS if k != "sequential"]),
    Case("reshape", (12,), lambda: layers.Reshape((3, 4))),
    Case("flatten", (3, 4), lambda: layers.Flatten()),
    Case("concatenate", (4,), lambda: layers.Concatenate(), apply=_pair,
         kinds=[k for k in KINDS if k != "sequential"]),
    Case("add", (4,), lambda: layers.Add(), apply=_pair,
         kinds=[k for k in KINDS if k != "sequential"]),
    Case("custom_weights", (5,), lambda: ScaleShift()),
    Case("custom_activation", (5,), lambda: Square()),
]


class Block(layers.Layer):
    """A custom layer holding the layer under test."""

    def __init__(self, inner, apply, **kw):
        super().__init__(**kw)
        self.inner = inner
        self._apply = apply

    def call(self, x):
        return self._apply(self.inner, x)


class SubModel(keras.Model):
    def __init__(self, inner, apply, **kw):
        super().__init__(**kw)
        self.inner = inner
        self._apply = apply
        self.flat = layers.Flatten()
        self.head = layers.Dense(3, activation="tanh", name="head")

    def call(self, x):
        return self.head(self.flat(self._apply(self.inner, x)))


class SubBlockModel(keras.Model):
    def __init__(self, block, **kw):
        super().__init__(**kw)
        self.block = block
        self.flat = layers.Flatten()
        self.head = layers.Dense(3, activation="tanh", name="head")

    def call(self, x):
        return self.head(self.flat(self.block(x)))


def build(case: Case, kind: str, batch: int = 3, seed: int = 0):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    layer = case.make()
    layer_name = layer.name
    dtype = "int32" if case.int_input else "float64"

    def data(n):
        if case.int_input:
            return rng.integers(0, case.int_input, size=(n, *case.shape)).astype("int32")
        return rng.normal(size=(n, *case.shape))

    x = data(batch)
    calls, output, path = [0], None, layer_name
    if kind == "sequential":
        model = keras.Sequential([keras.Input(case.shape, dtype=dtype), layer, layers.Flatten(),
                                  layers.Dense(3, activation="tanh", name="head")])
    elif kind == "functional":
        inp = keras.Input(case.shape, dtype=dtype)
        out = layers.Dense(3, activation="tanh", name="head")(layers.Flatten()(case.apply(layer, inp)))
        model = keras.Model(inp, out)
    elif kind == "subclassed":
        model = SubModel(layer, case.apply)
        model(x)
    elif kind == "nested_model":
        inner_in = keras.Input(case.shape, dtype=dtype)
        inner = keras.Model(inner_in, case.apply(layer, inner_in), name="backbone")
        inp = keras.Input(case.shape, dtype=dtype)
        out = layers.Dense(3, activation="tanh", name="head")(layers.Flatten()(inner(inp)))
        model = keras.Model(inp, out)
        path = f"backbone/{layer_name}"
    elif kind == "custom_layer":
        model = SubBlockModel(Block(layer, case.apply, name="block"))
        model(x)
        path = f"block/{layer_name}"
    elif kind == "shared":
        a = keras.Input(case.shape, dtype=dtype, name="a")
        b = keras.Input(case.shape, dtype=dtype, name="b")
        fa = layers.Flatten()(case.apply(layer, a))
        fb = layers.Flatten()(case.apply(layer, b))
        out = layers.Dense(3, activation="tanh", name="head")(layers.Concatenate()([fa, fb]))
        model = keras.Model([a, b], out)
        x = [x, data(batch)]
        calls = [0, 1]
    elif kind == "multi_output":
        inp = keras.Input(case.shape, dtype=dtype)
        h = layers.Flatten()(case.apply(layer, inp))
        out_a = layers.Dense(3, activation="tanh", name="head_a")(h)
        out_b = layers.Dense(2, activation="tanh", name="head_b")(h)
        model = keras.Model(inp, [out_a, out_b])
        output = "head_b"
    else:  # pragma: no cover
        raise ValueError(kind)
    return model, x, layer, path, calls, output
