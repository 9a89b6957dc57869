"""The five seed scenarios (../shared/seeds/; TensorFlow versions in
tests/test_seeds.py) on the JAX backend: each written with gradprobe and
checked against hand-written JAX code (`jax.grad` of the rest of the model with
respect to an intermediate value, or of `stateless_call` with respect to a
weight; jitted, which is faster than eager here). Seed 003's chained gradients
go through `gp.functional`. Models are smaller than the seeds' (fewer filters,
smaller images).

Run with `KERAS_BACKEND=jax python -m pytest tests/backends`.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("JAX backend tests: run with KERAS_BACKEND=jax", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from backend_helpers import (  # noqa: E402
    ComplexModel,
    SimpleConvModel,
    SimpleModel,
    close,
    lstm_attention_model,
    seed000_model,
    two_layer,
)
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype("float32"))


def weight_grads(model, variables, x, objective):
    """jax.grad of objective(stateless_call(...)) for some trainable variables."""
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    pos = [[id(v) for v in model.trainable_variables].index(id(w)) for w in variables]

    def f(ws):
        vals = list(tv)
        for p, w in zip(pos, ws):
            vals[p] = w
        return objective(model.stateless_call(vals, ntv, x)[0])

    return jax.jit(jax.grad(f))([tv[p] for p in pos])


# --------------------------------------------------------------------- seed 000
def test_seed000_activation_weights_and_pitfalls():
    model = seed000_model()
    x = normal(1, (3, 6))
    hidden, out = model.get_layer("hidden"), model.get_layer("out")
    h = hidden(x)
    g = gp.gradients(model, x, target=2, wrt="hidden")
    close(g["hidden"], jax.grad(lambda a: jnp.sum(out(a)[:, 2]))(h), 1e-6)
    # weights, with a reduction target
    g = gp.gradients(model, x, target=lambda y: jnp.sum(y), wrt="hidden.weights")
    ref = weight_grads(model, [hidden.kernel, hidden.bias], x, jnp.sum)
    close(g["hidden.kernel"], ref[0], 1e-6)
    close(g["hidden.bias"], ref[1], 1e-6)
    # A non-scalar target is an error, not an implicit sum; kinds and shapes differ.
    with pytest.raises(gp.GradprobeError, match="scalar or one value per example"):
        gp.gradients(model, x, target=lambda y: y, wrt="hidden")
    g = gp.gradients(model, x, target=0, wrt=["hidden", "hidden.kernel"])
    assert g.kinds["hidden"] == "activation" and g.kinds["hidden.kernel"] == "weight"
    assert g["hidden"].shape == (3, 8) and g["hidden.kernel"].shape == (6, 8)


# --------------------------------------------------------------------- seed 001
def test_seed001_subclassed_cnn_and_rnn_transformer_states():
    keras.utils.set_random_seed(1)
    model = SimpleModel()
    x = normal(7, (2, 12, 12, 1))
    model(x)
    c1 = model.conv1(x)

    def rest(c):
        return model.dense1(model.flatten(model.pool2(model.conv2(model.pool1(c)))))

    expected = jax.jit(jax.grad(lambda c: jnp.sum(rest(c)[:, 3])))(c1)
    both = gp.gradients(model, x, target=3, wrt=[model.conv1, model.conv2])
    assert both[model.conv1.name].shape == (2, 12, 12, 8)
    close(both[model.conv1.name], expected, 1e-5)
    assert both[model.conv2.name].shape == (2, 6, 6, 16)

    model = lstm_attention_model()
    x = normal(1, (2, 6, 4))
    lstm_out = model.get_layer("lstm")(x)
    mha, ln, gap, out = (model.get_layer(n) for n in ("mha", "ln", "gap", "out"))

    def head(l_, a_):
        return jnp.sum(out(gap(ln(l_ + a_)))[:, 1])

    a = mha(lstm_out, lstm_out)
    exp_l = jax.jit(jax.grad(lambda l_: head(l_, mha(l_, l_))))(lstm_out)
    exp_a = jax.jit(jax.grad(lambda a_: head(lstm_out, a_)))(a)
    g = gp.gradients(model, x, target=1, wrt=["lstm", "mha"])
    close(g["lstm"], exp_l, 1e-5)
    close(g["mha"], exp_a, 1e-5)


# --------------------------------------------------------------------- seed 002
def test_seed002_loss_wrt_output_kernel_bias_and_intermediate():
    keras.utils.set_random_seed(3)
    model = SimpleConvModel()
    x = normal(2, (1, 14, 14, 1))
    y = normal(3, (1, 12, 12, 8))
    loss_fn = keras.losses.MeanSquaredError()
    model(x)
    out = model(x)
    g = gp.gradients(model, x, gp.loss(loss_fn, y),
                     wrt=[model.conv, model.conv.kernel, model.conv.bias])
    name = model.conv.name
    close(g[name], jax.grad(lambda o: loss_fn(y, o))(out), 1e-5)
    ref = weight_grads(model, [model.conv.kernel, model.conv.bias], x, lambda o: loss_fn(y, o))
    close(g[f"{name}.kernel"], ref[0], 1e-5)
    close(g[f"{name}.bias"], ref[1], 1e-5)
    assert np.isclose(float(g.target), float(loss_fn(y, out)))

    keras.utils.set_random_seed(4)
    model = ComplexModel()
    x = normal(4, (1, 18, 18, 1))
    labels = np.array([7])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model(x)
    inter = model.pool2(model.conv2(model.pool1(model.conv1(x))))
    exp_inter = jax.jit(jax.grad(lambda i: loss_fn(labels, model.dense2(model.dense1(
        model.flatten(i))))))(inter)
    exp_kernel = weight_grads(model, [model.conv2.kernel], x, lambda o: loss_fn(labels, o))[0]
    g = gp.gradients(model, x, gp.loss(loss_fn, labels), wrt=[model.pool2, model.conv2.kernel])
    close(g[model.pool2.name], exp_inter, 1e-5)
    close(g[f"{model.conv2.name}.kernel"], exp_kernel, 1e-5)
    stats = g.stats()
    assert np.isclose(stats[model.pool2.name]["norm"], np.linalg.norm(np.asarray(exp_inter)),
                      rtol=1e-5)


# --------------------------------------------------------------------- seed 003
def test_seed003_example1_layer1_output_and_layer2_weights():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    w1, w2 = normal(12, (2, 3)), normal(34, (3, 2))
    model = two_layer(w1, w2)
    exp_l1, exp_w2 = jax.grad(lambda l1, w: jnp.sum(l1 @ w), argnums=(0, 1))(x @ w1, w2)
    g = gp.gradients(model, x, lambda y: jnp.sum(y), ["layer1", "layer2.kernel"])
    close(g["layer1"], exp_l1, 1e-6)
    close(g["layer2.kernel"], exp_w2, 1e-6)
    # the same through the functional form
    form = gp.functional(model, x, lambda y: jnp.sum(y), ["layer1", "layer2.kernel"])
    dp, dv = jax.grad(form.objective, argnums=(0, 1))(*form.args)
    close(dp["layer1"], exp_l1, 1e-6)
    close(dv["layer2.kernel"], exp_w2, 1e-6)


def test_seed003_gradient_used_in_a_second_loss_through_the_functional_form():
    """Examples 2 and 3 (made shape-consistent, as in tests/test_seeds.py): the
    gradient at layer 1 of loss1 = sum(layer1_output^2) enters loss 2, which is
    differentiated with respect to both weights, with that gradient (a) a
    constant, (b) differentiated through."""
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    w1, w2 = normal(56, (2, 3)), normal(78, (3, 2))
    model = two_layer(w1, w2)

    def hand_written(w1_, w2_, through):
        def loss1(l1):
            return jnp.sum(l1 ** 2)

        l1 = x @ w1_
        grad1 = jax.grad(loss1)(l1)
        if not through:
            grad1 = jax.lax.stop_gradient(grad1)
        out = l1 @ w2_
        return jnp.sum(out) + jnp.sum(grad1 * out[:, :1])

    form = gp.functional(model, x, lambda y: jnp.sum(y),
                         ["layer1", "layer1.kernel", "layer2.kernel"])
    probes, variables, inputs = form.args

    def loss2(variables, through):
        def loss1(p):
            return jnp.sum(form(p, variables, inputs)[1]["activations"]["layer1"] ** 2)

        grad1 = jax.grad(loss1)(probes)["layer1"]
        if not through:
            grad1 = jax.lax.stop_gradient(grad1)
        out = form(probes, variables, inputs)[1]["outputs"]
        return jnp.sum(out) + jnp.sum(grad1 * out[:, :1])

    results = {}
    for through in (False, True):
        exp = jax.grad(hand_written, argnums=(0, 1))(w1, w2, through)
        got = jax.grad(loss2)(variables, through)
        close(got["layer1.kernel"], exp[0], 1e-5, f"w1 through={through}")
        close(got["layer2.kernel"], exp[1], 1e-5, f"w2 through={through}")
        results[through] = np.asarray(got["layer1.kernel"])
    assert not np.allclose(results[False], results[True])  # the scenario tells them apart

    # Example 3's intent: loss3 = sum(transpose(grad1) @ layer2_output), d loss3 / d w2.
    def hand3(w2_):
        l1 = x @ w1
        return jnp.sum(jax.grad(lambda a: jnp.sum(a ** 2))(l1).T @ (l1 @ w2_))

    def loss3(variables):
        grad1 = jax.grad(lambda p: jnp.sum(
            form(p, variables, inputs)[1]["activations"]["layer1"] ** 2))(probes)["layer1"]
        return jnp.sum(grad1.T @ form(probes, variables, inputs)[1]["outputs"])

    close(jax.grad(loss3)(variables)["layer2.kernel"], jax.grad(hand3)(w2), 1e-5)


# --------------------------------------------------------------------- seed 004
def test_seed004_input_intermediate_and_custom_activation():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((5,)), layers.Dense(units=10, activation="relu")])
    x = normal(5, (1, 5))
    g = gp.gradients(model, x, lambda y: jnp.sum(y), "inputs")
    close(g["inputs"], jax.grad(lambda xx: jnp.sum(model(xx)))(x), 1e-6)
    close(g.outputs, model(x), 1e-6)

    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((10,)), layers.Dense(units=32, activation="relu"),
                              layers.Dense(units=16, activation="relu"), layers.Dense(units=5)])
    x = normal(6, (1, 10))
    first, second = model.layers[0], model.layers[1]
    l1 = first(x)
    g = gp.gradients(model, x, lambda a: jnp.sum(a), [second, first], output=second.name)
    close(g[second.name], jnp.ones((1, 16)), 1e-6)  # d sum(a) / d a
    close(g[first.name], jax.grad(lambda a: jnp.sum(second(a)))(l1), 1e-6)

    class CustomActivation(layers.Layer):
        def call(self, inputs):
            return keras.ops.square(inputs)

    model = keras.Sequential([keras.Input((5,)), layers.Dense(units=16), CustomActivation(),
                              layers.Dense(units=5)])
    x = normal(7, (1, 5))
    custom = model.layers[1].name
    g = gp.gradients(model, x, lambda a: jnp.sum(a), [custom, model.layers[0]], output=custom)
    close(g[custom], jnp.ones((1, 16)), 1e-6)
    close(g[model.layers[0].name], 2 * model.layers[0](x), 1e-5)  # d(sum x^2)/dx = 2x
