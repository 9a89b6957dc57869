"""Helpers shared by the backend tests (tests/backends/test_*.py): array
comparison, the models several of them use, backend-neutral hand oracles (the
trapezoid rule, the Grad-CAM formulas), checks that are the same on every
backend, and `oracle()`: the hand-written gradient code of the active backend
(`jax.grad` or `torch.autograd.grad`) behind one small interface, for the
test_common_*.py modules that run on both. Imports no backend library (jax,
torch) at import time: `oracle()` imports the active backend's own library only."""

import keras
import numpy as np
import pytest
from keras import layers

import gradprobe as gp
from gradprobe.core import _patch
from tolerance import assert_close


def arr(t):
    """A NumPy array of a JAX array, a PyTorch tensor (detached, on the CPU) or an array."""
    if hasattr(t, "detach"):  # a torch.Tensor
        return t.detach().cpu().numpy()
    return np.asarray(t)


def close(a, b, tol=1e-5, what=""):
    """`a` equals `b` within `tol` times max(1, max |b|) (absolute below 1); see
    tests/tolerance.py, whose `assert_close(a, b, dtype)` derives `tol` from the dtype."""
    b = arr(b)
    scale = max(1.0, float(np.abs(b).max()) if b.size else 1.0)
    assert_close(arr(a), b, rtol=tol, scale=scale, what=what)


def rel_close(a, b, rtol=1e-6, what=""):
    """`a` equals `b` within `rtol` times max |b| (relative, for float64 oracles)."""
    assert_close(arr(a), arr(b), rtol=rtol, what=what, tiny=1e-12)


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


def sacred_state(model):
    """What the user's model must keep: its weights (NumPy copies), each layer's
    attribute names and its instance-level `call` (none)."""
    return {"weights": [arr(v.value).copy() for v in model.weights],
            "attrs": {id(layer): sorted(vars(layer)) for layer in model._flatten_layers()},
            "calls": [layer.__dict__.get("call") for layer in model._flatten_layers()]}


def assert_sacred_state(model, before, x=None, out_before=None):
    """The model is as `sacred_state` saw it `before`, no gradprobe wrapper is left
    active and, given `x` and `out_before`, model(x) is still `out_before`, bit for bit."""
    after = sacred_state(model)
    for a, b in zip(before["weights"], after["weights"]):
        np.testing.assert_array_equal(a, b)
    assert before["attrs"] == after["attrs"]
    assert all(c is None for c in after["calls"])  # no instance-level `call` left
    assert _patch.active_wrappers() == 0
    if x is not None:
        np.testing.assert_array_equal(arr(model(x)), out_before)


def tanh_mlp(name="mlp"):
    """Dense "h" (6, tanh) -> Dense "out" (4), on 5 features."""
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((5,)), layers.Dense(6, activation="tanh", name="h"),
                             layers.Dense(4, name="out")], name=name)

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


# ------------------------------------------------------ per-example models
def per_example_image_model():
    """Conv2D, BatchNormalization (inference, non-trivial statistics), a Dense
    layer called twice, a Dense head (functional), ReLU throughout. (No
    LayerNormalization: Keras computes its statistics in float32 on JAX, 1e-6 off
    in float64.)"""
    keras.utils.set_random_seed(11)
    inp = keras.Input((6, 6, 2))
    h = layers.Conv2D(3, 3, activation="relu", name="conv")(inp)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.Flatten()(h)
    h = layers.Dense(5, activation="relu", name="pre")(h)
    shared = layers.Dense(5, activation="relu", name="shared")
    h = shared(shared(h))
    model = keras.Model(inp, layers.Dense(3, name="head")(h))
    bn = model.get_layer("bn")
    rng = np.random.default_rng(3)
    bn.moving_mean.assign(rng.normal(size=3))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=3))
    return model


def relu_sequential():
    """Dense "h" (6, relu) -> Dense "out" (4), on 5 features."""
    keras.utils.set_random_seed(12)
    return keras.Sequential([keras.Input((5,)), layers.Dense(6, activation="relu", name="h"),
                             layers.Dense(4, name="out")])


def embedding_model():
    """Embedding "emb" (7 ids, 4) -> Flatten -> Dense "out" (3), on 5 ids."""
    keras.utils.set_random_seed(13)
    inp = keras.Input((5,), dtype="int32")
    h = layers.Embedding(7, 4, name="emb")(inp)
    h = layers.Flatten()(h)
    return keras.Model(inp, layers.Dense(3, name="out")(h))

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


# --------------------------------------------------- per-backend hand oracles
def oracle():
    """The hand-written gradient code of the active Keras backend: a `JaxOracle`
    (`jax.grad`) on JAX, a `TorchOracle` (`torch.autograd.grad`) on PyTorch. The
    tests written once for both backends (test_common_*.py) compute every expected
    gradient through it, so the oracle stays the backend's own autograd and never
    goes through gradprobe. Imports `jax` or `torch` here, under that backend only."""
    backend = keras.backend.backend()
    if backend == "jax":
        return JaxOracle()
    if backend == "torch":
        return TorchOracle()
    raise AssertionError(f"no hand oracle for the {backend!r} backend")


def skip_unless_jax_or_torch():
    """Skips the calling test module (at import) unless Keras runs on JAX or PyTorch."""
    if keras.backend.backend() not in ("jax", "torch"):
        pytest.skip("JAX/PyTorch backend tests: run with KERAS_BACKEND=jax or KERAS_BACKEND=torch",
                    allow_module_level=True)


class _Oracle:
    """What the two oracles share: everything here is written with the backend's
    own array operations (`tensor`, `grad`) and `model.stateless_call`."""

    def tensors(self, x):
        """`x` (an array or a structure of arrays) as backend tensors."""
        return keras.tree.map_structure(self.tensor, x)

    def normal(self, seed, shape):
        """A float32 tensor of standard normal values, drawn by NumPy from `seed`."""
        return self.tensor(np.random.default_rng(seed).normal(size=shape).astype("float32"))

    def pick(self, y, cls):
        """y[i, cls[i]] for every row i (a vector)."""
        return y[self.tensor(np.arange(y.shape[0])), self.tensor(np.asarray(cls))]

    def class_objective(self, model, cls):
        """x -> sum over examples of output[i, cls[i]], through stateless_call."""
        tv, ntv = self.values(model)
        return lambda x: self.pick(model.stateless_call(tv, ntv, x)[0], cls).sum()

    def weight_grads(self, model, variables, x, objective, training=False, jit=False):
        """The gradients of objective(stateless_call(...)) with respect to some
        trainable `variables` (a list, in that order), as NumPy arrays."""
        tv, ntv = self.values(model)
        ids = [id(v) for v in model.trainable_variables]
        pos = [ids.index(id(w)) for w in variables]
        kw = {"training": True} if training else {}  # (a subclass `call` may not take it)
        x = self.tensors(x)

        def f(ws):
            vals = list(tv)
            for p, w in zip(pos, ws):
                vals[p] = w
            return objective(model.stateless_call(vals, ntv, x, **kw)[0])

        return self.grad(f, jit=jit)([tv[p] for p in pos])

    def weight_grad(self, model, var, x, objective, training=False):
        """`weight_grads` of one variable."""
        return self.weight_grads(model, [var], x, objective, training)[0]

    def example_grads(self, model, x, value_of, training=False, jit=False):
        """{variable path: (batch, *shape)}: the gradient of `value_of(output, i)` for
        each example `i` of `x` run alone (a batch of one) through `stateless_call`
        (the per-example oracle)."""
        tv, ntv = self.values(model)
        kw = {"training": True} if training else {}
        rows = []
        for i in range(len(x)):
            xi = self.tensor(x[i:i + 1])

            def f(ws, xi=xi, i=i):
                return value_of(model.stateless_call(ws, ntv, xi, **kw)[0], i).sum()

            rows.append(self.grad(f, jit=jit)(tv))
        return {v.path: np.stack([r[j] for r in rows])
                for j, v in enumerate(model.trainable_variables)}

    def input_grad(self, model, x, objective):
        """The gradient of objective(stateless_call(x)) with respect to the input `x`."""
        tv, ntv = self.values(model)
        return self.grad(lambda v: objective(model.stateless_call(tv, ntv, v)[0]))(x)


class JaxOracle(_Oracle):
    """Hand-written `jax.grad` (`jax.hessian`, `jax.jvp`, `jax.jacrev`) code. `tol`,
    `tight`: the tolerances of float64 oracles on JAX, which agree with gradprobe to
    rounding."""

    name = "jax"
    tol = 1e-10
    tight = 1e-12  # (the Jacobians and penalties: few float64 operations each)

    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.library = f"JAX {jax.__version__}"  # as the HTML report names the backend

    def tensor(self, x):
        return self.jnp.asarray(arr(x))

    def values(self, model):
        return ([v.value for v in model.trainable_variables],
                [v.value for v in model.non_trainable_variables])

    def grad(self, fn, jit=False):
        """value -> jax.grad of the scalar fn(v) at `value` (an array, or a list of
        arrays: a list of gradients), as NumPy; `jit`: jitted (faster for big models)."""
        g = self.jax.grad(fn)
        if jit:
            g = self.jax.jit(g)

        def at(value):
            if isinstance(value, (list, tuple)):
                return [np.asarray(r) for r in g([self.tensor(v) for v in value])]
            return np.asarray(g(self.tensor(value)))

        return at

    def hessian(self, fn, jit=False):
        """value -> jax.hessian of the scalar fn(v) at the array `value`, as NumPy."""
        h = self.jax.hessian(fn)
        if jit:
            h = self.jax.jit(h)
        return lambda value: np.asarray(h(self.tensor(value)))

    def hvp(self, fn):
        """(values, vectors) -> the product of the Hessian of the scalar fn(list of
        arrays) at `values` with `vectors` (lists), as NumPy: jax.jvp of jax.grad."""

        def at(values, vectors):
            _, out = self.jax.jvp(self.jax.grad(fn), ([self.tensor(v) for v in values],),
                                  ([self.tensor(v) for v in vectors],))
            return [np.asarray(r) for r in out]

        return at

    def jacobian(self, fn):
        """value -> jax.jacrev of fn (array -> array) at `value`, as NumPy."""
        j = self.jax.jacrev(fn)
        return lambda value: np.asarray(j(self.tensor(value)))

    def log_softmax(self, y):
        return self.jax.nn.log_softmax(y, axis=-1)

    def sigmoid(self, y):
        return self.jax.nn.sigmoid(y)

    def amax(self, y, axis):
        return self.jnp.max(y, axis=axis)

    def resize_bilinear(self, maps, size):
        """(N, H, W) maps resized to `size` by bilinear interpolation (half-pixel centers)."""
        return np.asarray(self.jax.image.resize(self.tensor(maps), (maps.shape[0], *size),
                                                "linear"))


class TorchOracle(_Oracle):
    """Hand-written `torch.autograd.grad` (double backward,
    `torch.autograd.functional`) code. `tol`, `tight`: the tolerances of float64
    oracles on PyTorch, where Keras' float64 matmul is about 4e-8 off."""

    name = "torch"
    tol = 1e-6
    tight = 1e-6

    def __init__(self):
        import torch

        self.torch = torch
        self.library = f"PyTorch {torch.__version__}"  # as the HTML report names the backend

    def tensor(self, x):
        return self.torch.as_tensor(arr(x))

    def values(self, model):
        return ([v.value.detach() for v in model.trainable_variables],
                [v.value.detach() for v in model.non_trainable_variables])

    def grad(self, fn, jit=False):
        """value -> torch.autograd.grad of the scalar fn(v) at `value` (an array, or a
        list of arrays: a list of gradients), as NumPy; `jit` is for JAX only."""

        def at(value):
            many = isinstance(value, (list, tuple))
            vs = [self.tensor(v).clone().requires_grad_(True) for v in (value if many else [value])]
            out = [arr(r) for r in self.torch.autograd.grad(fn(vs if many else vs[0]), vs)]
            return out if many else out[0]

        return at

    def hessian(self, fn, jit=False):
        """value -> torch.autograd.functional.hessian of the scalar fn(v) at the array
        `value`, as NumPy."""
        return lambda value: arr(self.torch.autograd.functional.hessian(fn, self.tensor(value)))

    def hvp(self, fn):
        """(values, vectors) -> the product of the Hessian of the scalar fn(list of
        tensors) at `values` with `vectors` (lists), as NumPy: double backward."""

        def at(values, vectors):
            vs = [self.tensor(v).clone().requires_grad_(True) for v in values]
            gs = self.torch.autograd.grad(fn(vs), vs, create_graph=True)
            dot = sum((g * self.tensor(u)).sum() for g, u in zip(gs, vectors))
            return [arr(r) for r in self.torch.autograd.grad(dot, vs)]

        return at

    def jacobian(self, fn):
        """value -> torch.autograd.functional.jacobian of fn (tensor -> tensor) at
        `value`, as NumPy."""
        return lambda value: arr(self.torch.autograd.functional.jacobian(fn, self.tensor(value)))

    def log_softmax(self, y):
        return self.torch.log_softmax(y, dim=-1)

    def sigmoid(self, y):
        return self.torch.sigmoid(y)

    def amax(self, y, axis):
        return self.torch.amax(y, dim=axis)

    def resize_bilinear(self, maps, size):
        """(N, H, W) maps resized to `size` by bilinear interpolation (half-pixel centers,
        as TensorFlow)."""
        resized = self.torch.nn.functional.interpolate(
            self.tensor(maps)[:, None], size=size, mode="bilinear", align_corners=False)
        return arr(resized[:, 0])
