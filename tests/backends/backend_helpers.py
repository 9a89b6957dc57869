"""Helpers shared by the backend tests (tests/backends/test_*.py): array
comparison, the models several of them use, backend-neutral hand oracles (the
trapezoid rule, the Grad-CAM formulas) and checks that are the same on every
backend. Imports no backend library (jax, torch): the modules that use it skip
themselves under another backend first."""

import keras
import numpy as np
import pytest
from keras import layers

import gradprobe as gp


def arr(t):
    """A NumPy array of a JAX array, a PyTorch tensor (detached, on the CPU) or an array."""
    if hasattr(t, "detach"):  # a torch.Tensor
        return t.detach().cpu().numpy()
    return np.asarray(t)


def close(a, b, tol=1e-5, what=""):
    """`a` equals `b` within `tol` times max(1, max |b|) (absolute below 1)."""
    a, b = arr(a).astype(np.float64), arr(b).astype(np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = max(1.0, float(np.abs(b).max()) if b.size else 1.0)
    err = float(np.abs(a - b).max()) if a.size else 0.0
    assert err <= tol * scale, f"{what}: max error {err} (scale {scale})"


def rel_close(a, b, rtol=1e-6, what=""):
    """`a` equals `b` within `rtol` times max |b| (relative, for float64 oracles)."""
    a, b = arr(a).astype(np.float64), arr(b).astype(np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = max(float(np.abs(b).max()), 1e-12)
    err = float(np.abs(a - b).max())
    assert err <= rtol * scale, f"{what}: max error {err} (scale {scale})"


class Twice(keras.Model):
    """A subclassed model calling one Dense layer twice."""

    def __init__(self):
        super().__init__(name="twice")
        self.shared = layers.Dense(3, activation="tanh", name="shared")
        self.head = layers.Dense(2, name="head")

    def call(self, x):
        return self.head(self.shared(self.shared(x)) * 2.0)


def snapshot(model):
    """A copy of every weight of `model`, as NumPy arrays."""
    return [arr(v.value).copy() for v in model.weights]


def assert_untouched(model, before):
    """The weights equal the `snapshot` `before`, and no layer has an instance-level `call`."""
    for a, b in zip(before, snapshot(model)):
        np.testing.assert_array_equal(a, b)
    assert all(layer.__dict__.get("call") is None for layer in model._flatten_layers())


# ------------------------------------------------------- attribution oracles
def cnn(activation="sigmoid"):
    """Conv2D "conv" (3 filters) -> Flatten "gap" -> Dense "out" (4), on (6, 6, 2) inputs."""
    # (sigmoid, not tanh, and Flatten, not global average pooling: keras.ops.tanh and
    # keras.ops.mean compute float64 values in float32 on JAX, see test_jax.py)
    keras.utils.set_random_seed(7)
    return keras.Sequential([
        keras.Input((6, 6, 2)), layers.Conv2D(3, 3, activation=activation, name="conv"),
        layers.Flatten(name="gap"), layers.Dense(4, name="out")])


def trapezoid(steps):
    """The points (alphas) and weights of the trapezoid rule on [0, 1] with `steps` points."""
    k = np.arange(steps)
    w = np.full(steps, 1.0 / (steps - 1))
    w[[0, -1]] *= 0.5
    return k / (steps - 1), w


def cam_formulas(A, dA):
    """Grad-CAM and Grad-CAM++ maps by hand from activations `A` (N, H, W, C) and their
    gradients `dA` (NumPy arrays), before normalization and upsampling."""
    cam = np.maximum((dA.mean(axis=(1, 2), keepdims=True) * A).sum(-1), 0)
    g2, g3 = dA ** 2, dA ** 3
    denom = 2 * g2 + A.sum(axis=(1, 2), keepdims=True) * g3
    alpha = np.divide(g2, denom, out=np.zeros_like(g2), where=denom != 0)
    w = (alpha * np.maximum(dA, 0)).sum(axis=(1, 2), keepdims=True)
    pp = np.maximum((w * A).sum(-1), 0)
    return cam, pp


def normalized(cam):
    """Each map scaled to [0, 1] (an all-equal map to zeros)."""
    lo = cam.min(axis=(1, 2), keepdims=True)
    hi = cam.max(axis=(1, 2), keepdims=True)
    return np.divide(cam - lo, hi - lo, out=np.zeros_like(cam), where=hi > lo)


def check_grad_cam_layer(assert_sacred):
    """gp.grad_cam_layer picks the last spatial layer connected to the output (a
    shared layer's call, a layer as the output) and refuses a model without one;
    the same on every backend. `assert_sacred(model, before)` is the calling
    module's check that the model is untouched."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 2))
    shared = layers.Conv2D(2, 1, name="shared")
    h = layers.Conv2D(3, 3, activation="relu", name="conv")(shared(inp))
    h = shared(layers.Conv2D(2, 1, name="c2")(h))  # the second call of "shared"
    side = layers.Conv2D(2, 3, name="side")(inp)  # output 1 only
    y = layers.Dense(4, name="out")(layers.GlobalAveragePooling2D(name="gap")(h))
    model = keras.Model(inp, [y, side])
    before = snapshot(model)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 2)).astype("float32")
    assert gp.grad_cam_layer(model, x, output=0) == "shared@1"  # not "side", not "gap"
    assert gp.grad_cam_layer(model, x, output=1) == "side"
    assert gp.grad_cam_layer(model, x, output="c2") == "c2"  # a layer as the output
    no_maps = keras.Sequential([keras.Input((4,)), layers.Dense(3)])
    with pytest.raises(gp.GradprobeError, match="no layer with a spatial"):
        gp.grad_cam_layer(no_maps, np.ones((2, 4), "float32"))
    assert_sacred(model, before)


# ------------------------------------------------------------ higher order
def mlp(seed=0):
    """Dense "l1" (4, sigmoid) -> Dense "l2" (2, sigmoid), on 3 features."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((3,))
    h = layers.Dense(4, activation="sigmoid", name="l1")(inp)
    return keras.Model(inp, layers.Dense(2, activation="sigmoid", name="l2")(h))


def conv_mlp():
    """Conv1D "conv" -> Flatten "flat" -> Dense "mid" (6) -> Dense "out" (2), on (4, 3) inputs."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((4, 3))
    h = layers.Conv1D(5, 2, activation="sigmoid", name="conv")(inp)
    h = layers.Flatten(name="flat")(h)
    return keras.Model(inp, layers.Dense(2, name="out")(
        layers.Dense(6, activation="sigmoid", name="mid")(h)))


class Critic(keras.Model):
    """A WGAN critic: Dense(8, sigmoid) -> Dense(1)."""

    def __init__(self):
        super().__init__()
        self.d1 = layers.Dense(8, activation="sigmoid")
        self.d2 = layers.Dense(1)

    def call(self, x):
        return self.d2(self.d1(x))


# ------------------------------------------------ the seed scenarios' models
def seed000_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    hidden = layers.Dense(8, activation="relu", name="hidden")(inp)
    return keras.Model(inp, layers.Dense(4, activation="softmax", name="out")(hidden))


class SimpleModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv1 = layers.Conv2D(8, (3, 3), activation="relu", padding="same")
        self.pool1 = layers.MaxPool2D((2, 2))
        self.conv2 = layers.Conv2D(16, (3, 3), activation="relu", padding="same")
        self.pool2 = layers.MaxPool2D((2, 2))
        self.flatten = layers.Flatten()
        self.dense1 = layers.Dense(10, activation="softmax")

    def call(self, x):
        return self.dense1(self.flatten(self.pool2(self.conv2(self.pool1(self.conv1(x))))))


def lstm_attention_model():
    """LSTM "lstm" -> MultiHeadAttention "mha" + residual -> LayerNormalization "ln" ->
    GlobalAveragePooling1D "gap" -> Dense "out" (3), on (6, 4) inputs."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((6, 4))
    h = layers.LSTM(5, return_sequences=True, name="lstm")(inp)
    att = layers.MultiHeadAttention(2, 4, name="mha")(h, h)
    h2 = layers.LayerNormalization(name="ln")(layers.Add(name="res")([h, att]))
    return keras.Model(inp, layers.Dense(3, name="out")(layers.GlobalAveragePooling1D(name="gap")(h2)))


class SimpleConvModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = layers.Conv2D(filters=8, kernel_size=3, activation="relu")

    def call(self, x):
        return self.conv(x)


class ComplexModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv1 = layers.Conv2D(8, 3, activation="relu")
        self.pool1 = layers.MaxPooling2D()
        self.conv2 = layers.Conv2D(16, 3, activation="relu")
        self.pool2 = layers.MaxPooling2D()
        self.flatten = layers.Flatten()
        self.dense1 = layers.Dense(32, activation="relu")
        self.dense2 = layers.Dense(10)

    def call(self, x):
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.dense2(self.dense1(self.flatten(x)))


def two_layer(w1, w2):
    """Dense "layer1" (3) -> Dense "layer2" (2), no biases, kernels set to `w1`, `w2`."""
    inp = keras.Input((2,))
    h = layers.Dense(3, use_bias=False, name="layer1")(inp)
    model = keras.Model(inp, layers.Dense(2, use_bias=False, name="layer2")(h))
    model.get_layer("layer1").kernel.assign(w1)
    model.get_layer("layer2").kernel.assign(w2)
    return model
