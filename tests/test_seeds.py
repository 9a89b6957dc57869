"""Every scenario of the five seed documents (../shared/seeds/), written with
gradprobe in a line or two and checked against correct hand-written tape code.
The broken seed examples are shown to give the right answer or a clear error."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradprobe as gp
from oracle import assert_close
from tolerance import F32


# --------------------------------------------------------------------- seed 000
def _seed000_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inp)
    out = keras.layers.Dense(4, activation="softmax", name="out")(hidden)
    return keras.Model(inp, out)


def test_seed000_activations_via_probe_model():
    model = _seed000_model()
    x = tf.random.stateless_normal((3, 6), seed=(1, 2))
    # Hand-written: probe model + tape.watch on the hidden activation.
    probe = keras.Model(model.inputs, [model.get_layer("hidden").output, model.output])
    with tf.GradientTape() as tape:
        hidden_output, predictions = probe(x)
        tape.watch(hidden_output)
        score = predictions[:, 2]
    expected = tape.gradient(score, hidden_output)
    g = gp.gradients(model, x, target=2, wrt="hidden")
    assert g["hidden"].shape == hidden_output.shape
    assert_close(g["hidden"], expected, F32)


def test_seed000_weights_and_reduction_target():
    model = _seed000_model()
    x = tf.random.stateless_normal((3, 6), seed=(3, 4))
    layer = model.get_layer("hidden")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x))
    expected = tape.gradient(loss, layer.trainable_variables)
    g = gp.gradients(model, x, target=lambda y: tf.reduce_sum(y), wrt="hidden.weights")
    assert_close(g["hidden.kernel"], expected[0], F32)
    assert_close(g["hidden.bias"], expected[1], F32)


def test_seed000_pitfalls_are_errors_or_handled():
    model = _seed000_model()
    x = tf.random.stateless_normal((3, 6), seed=(5, 6))
    # Non-scalar target: an error that says how to reduce it, not an implicit sum.
    with pytest.raises(gp.GradprobeError, match="scalar or one value per example"):
        gp.gradients(model, x, target=lambda y: y, wrt="hidden")
    # Activations vs weights are different keys with different shapes.
    g = gp.gradients(model, x, target=0, wrt=["hidden", "hidden.kernel"])
    assert g.kinds["hidden"] == "activation" and g.kinds["hidden.kernel"] == "weight"
    assert g["hidden"].shape == (3, 8) and g["hidden.kernel"].shape == (6, 8)
    # No watch needed and nothing is built outside a tape: real values, not None.
    hidden, out = model.get_layer("hidden"), model.get_layer("out")
    with tf.GradientTape() as tape:
        h = hidden(x)
        tape.watch(h)
        score = out(h)[:, 0]
    exp_h, exp_k = tape.gradient(score, [h, hidden.kernel.value])
    assert_close(g["hidden"], exp_h, F32)
    assert_close(g["hidden.kernel"], exp_k, F32)


# --------------------------------------------------------------------- seed 001
class SimpleModel(tf.keras.Model):
    def __init__(self):
        super().__init__()
        self.conv1 = tf.keras.layers.Conv2D(32, (3, 3), activation="relu", padding="same")
        self.pool1 = tf.keras.layers.MaxPool2D((2, 2))
        self.conv2 = tf.keras.layers.Conv2D(64, (3, 3), activation="relu", padding="same")
        self.pool2 = tf.keras.layers.MaxPool2D((2, 2))
        self.flatten = tf.keras.layers.Flatten()
        self.dense1 = tf.keras.layers.Dense(10, activation="softmax")

    def call(self, x):
        x = self.conv1(x)
        x = self.pool1(x)
        x = self.conv2(x)
        x = self.pool2(x)
        x = self.flatten(x)
        return self.dense1(x)


def get_intermediate_gradient(model, input_tensor, target_class):
    """The seed's hand-written function, verbatim."""
    with tf.GradientTape() as tape:
        tape.watch(input_tensor)
        conv1_out = model.conv1(input_tensor)
        pool1_out = model.pool1(conv1_out)
        conv2_out = model.conv2(pool1_out)
        pool2_out = model.pool2(conv2_out)
        flatten_out = model.flatten(pool2_out)
        output_probs = model.dense1(flatten_out)
        target_prob = output_probs[:, target_class]
    return tape.gradient(target_prob, conv1_out)


def test_seed001_subclassed_cnn_feature_maps():
    keras.utils.set_random_seed(1)
    model = SimpleModel()
    dummy_input = tf.random.stateless_normal((2, 28, 28, 1), seed=(7, 8))
    model(dummy_input)
    expected = get_intermediate_gradient(model, dummy_input, 3)
    g = gp.gradients(model, dummy_input, target=3, wrt=model.conv1)
    assert g[model.conv1.name].shape == (2, 28, 28, 32)
    assert_close(g[model.conv1.name], expected, 1e-5)
    # Several layers at once, in one backward pass.
    both = gp.gradients(model, dummy_input, target=3, wrt=[model.conv1, model.conv2])
    assert_close(both[model.conv1.name], expected, 1e-5)
    assert both[model.conv2.name].shape == (2, 14, 14, 64)


def test_seed001_rnn_and_transformer_states():
    keras.utils.set_random_seed(2)
    inp = keras.Input((6, 4))
    h = keras.layers.LSTM(5, return_sequences=True, name="lstm")(inp)
    att = keras.layers.MultiHeadAttention(2, 4, name="mha")(h, h)
    h2 = keras.layers.LayerNormalization(name="ln")(keras.layers.Add(name="res")([h, att]))
    out = keras.layers.Dense(3, name="out")(keras.layers.GlobalAveragePooling1D()(h2))
    model = keras.Model(inp, out)
    x = tf.random.stateless_normal((2, 6, 4), seed=(1, 1))
    with tf.GradientTape() as tape:
        lstm_out = model.get_layer("lstm")(x)
        tape.watch(lstm_out)
        a = model.get_layer("mha")(lstm_out, lstm_out)
        y = model.get_layer("out")(model.layers[-2](model.get_layer("ln")(lstm_out + a)))
        score = y[:, 1]
    expected = tape.gradient(score, [lstm_out, a])
    g = gp.gradients(model, x, target=1, wrt=["lstm", "mha"])
    assert_close(g["lstm"], expected[0], 1e-5)
    assert_close(g["mha"], expected[1], 1e-5)


# --------------------------------------------------------------------- seed 002
class SimpleConvModel(tf.keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = tf.keras.layers.Conv2D(filters=32, kernel_size=3, activation="relu")

    def call(self, x):
        return self.conv(x)


def test_seed002_examples_1_and_2_loss_wrt_output_kernel_bias():
    keras.utils.set_random_seed(3)
    model = SimpleConvModel()
    input_data = tf.random.normal((1, 28, 28, 1))
    target = tf.random.normal((1, 26, 26, 32))
    loss_fn = tf.keras.losses.MeanSquaredError()
    model(input_data)
    with tf.GradientTape(persistent=True) as tape:
        output = model(input_data)
        loss = loss_fn(target, output)
    exp_out = tape.gradient(loss, output)
    exp_k = tape.gradient(loss, model.conv.weights[0])
    exp_b = tape.gradient(loss, model.conv.weights[1])

    g = gp.gradients(model, input_data, gp.loss(loss_fn, target),
                     wrt=[model.conv, model.conv.kernel, model.conv.bias])
    name = model.conv.name
    assert_close(g[name], exp_out, 1e-5)
    assert_close(g[f"{name}.kernel"], exp_k, 1e-5)
    assert_close(g[f"{name}.bias"], exp_b, 1e-5)
    assert np.isclose(float(g.target), float(loss))


class ComplexModel(tf.keras.Model):
    def __init__(self):
        super().__init__()
        self.conv1 = tf.keras.layers.Conv2D(32, 3, activation="relu")
        self.pool1 = tf.keras.layers.MaxPooling2D()
        self.conv2 = tf.keras.layers.Conv2D(64, 3, activation="relu")
        self.pool2 = tf.keras.layers.MaxPooling2D()
        self.flatten = tf.keras.layers.Flatten()
        self.dense1 = tf.keras.layers.Dense(128, activation="relu")
        self.dense2 = tf.keras.layers.Dense(10)

    def call(self, x):
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.flatten(x)
        x = self.dense1(x)
        return self.dense2(x)


def test_seed002_example3_intermediate_outside_tape():
    keras.utils.set_random_seed(4)
    model = ComplexModel()
    input_data = tf.random.normal((1, 28, 28, 1))
    target = tf.constant([7])
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model(input_data)

    # As written in the seed: the intermediate is recomputed outside the tape -> None.
    with tf.GradientTape(persistent=True) as tape:
        output = model(input_data)
        loss = loss_fn(target, output)
    intermediate_output = model.pool2(model.conv2(model.pool1(model.conv1(input_data))))
    assert tape.gradient(loss, intermediate_output) is None

    # Correct hand-written code: the intermediate is computed inside the tape.
    with tf.GradientTape(persistent=True) as tape:
        inter = model.pool2(model.conv2(model.pool1(model.conv1(input_data))))
        loss = loss_fn(target, model.dense2(model.dense1(model.flatten(inter))))
    exp_inter = tape.gradient(loss, inter)
    exp_kernel = tape.gradient(loss, model.conv2.weights[0])

    g = gp.gradients(model, input_data, gp.loss(loss_fn, target),
                     wrt=[model.pool2, model.conv2.kernel])
    assert_close(g[model.pool2.name], exp_inter, 1e-5)
    assert_close(g[f"{model.conv2.name}.kernel"], exp_kernel, 1e-5)
    # Reading magnitudes for vanishing/exploding gradients.
    stats = g.stats()
    assert np.isclose(stats[model.pool2.name]["norm"], np.linalg.norm(exp_inter.numpy()),
                      rtol=1e-5)
    # diagnosis: one source of each kind, so no ratio finding; dead units are the
    # channels (kernel columns) whose hand-written gradient is exactly zero
    expected = {}
    for key, ref in ((model.pool2.name, exp_inter.numpy()),
                     (f"{model.conv2.name}.kernel", exp_kernel.numpy())):
        dead = int(np.sum(np.all(ref == 0, axis=tuple(range(ref.ndim - 1)))))
        if dead:
            expected[key] = dead / ref.shape[-1]
    found = {f.key: f.value for f in g.diagnose()}
    assert {f.kind for f in g.diagnose()} <= {"dead"}
    assert found == pytest.approx(expected)


# --------------------------------------------------------------------- seed 003
def _two_layer(l1, l2):
    inp = keras.Input((2,))
    h = keras.layers.Dense(3, use_bias=False, name="layer1")(inp)
    out = keras.layers.Dense(2, use_bias=False, name="layer2")(h)
    model = keras.Model(inp, out)
    model.get_layer("layer1").kernel.assign(l1)
    model.get_layer("layer2").kernel.assign(l2)
    return model


def test_seed003_example1_layer1_output_and_layer2_weights():
    input_tensor = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    layer1_weights = tf.Variable(tf.random.stateless_normal((2, 3), seed=(1, 2)))
    layer2_weights = tf.Variable(tf.random.stateless_normal((3, 2), seed=(3, 4)))
    with tf.GradientTape() as tape:
        tape.watch(input_tensor)
        layer1_output = tf.matmul(input_tensor, layer1_weights)
        layer2_output = tf.matmul(layer1_output, layer2_weights)
        loss = tf.reduce_sum(layer2_output)
    exp = tape.gradient(loss, [layer1_output, layer2_weights])

    model = _two_layer(layer1_weights, layer2_weights)
    g = gp.gradients(model, input_tensor, lambda y: tf.reduce_sum(y), ["layer1", "layer2.kernel"])
    assert_close(g["layer1"], exp[0], F32)
    assert_close(g["layer2.kernel"], exp[1], F32)


def test_seed003_gradient_used_in_a_second_loss():
    """Examples 2 and 3: the gradient at layer 1 (of loss1 = sum(layer1_output^2))
    enters loss 2, which is differentiated w.r.t. layer 2's weights. Both crash as
    written (example 2 multiplies a (2, 3) gradient by a (2, 2) output; example 3
    multiplies incompatible matrices and calls tape3.gradient on a value computed
    outside tape3), so their intent is checked with consistent shapes."""
    input_tensor = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    w1 = tf.Variable(tf.random.stateless_normal((2, 3), seed=(5, 6)))
    w2 = tf.Variable(tf.random.stateless_normal((3, 2), seed=(7, 8)))
    model = _two_layer(w1, w2)
    kernel2 = model.get_layer("layer2").kernel

    # Hand-written example 2, with the product made shape-consistent.
    with tf.GradientTape() as tape1:
        layer1_output = tf.matmul(input_tensor, w1)
        loss1 = tf.reduce_sum(tf.square(layer1_output))
    grad1 = tape1.gradient(loss1, layer1_output)
    with tf.GradientTape() as tape2:
        layer2_output = tf.matmul(layer1_output, w2)
        loss2 = tf.reduce_sum(layer2_output) + tf.reduce_sum(grad1 * tf.matmul(layer1_output, w2)[:, :1])
    expected2 = tape2.gradient(loss2, w2)

    # With respect to w1 the two readings differ: grad1 = 2 * x @ w1 depends on w1.
    with tf.GradientTape() as tape2:  # (a) grad1 as a constant (computed outside)
        l1 = tf.matmul(input_tensor, w1)
        loss2 = tf.reduce_sum(tf.matmul(l1, w2)) + tf.reduce_sum(grad1 * tf.matmul(l1, w2)[:, :1])
    const_w1 = tape2.gradient(loss2, w1)
    with tf.GradientTape() as tape2:  # (b) grad1 differentiated through
        with tf.GradientTape() as tape1:
            l1 = tf.matmul(input_tensor, w1)
            inner = tf.reduce_sum(tf.square(l1))
        g_in = tape1.gradient(inner, l1)
        loss2 = tf.reduce_sum(tf.matmul(l1, w2)) + tf.reduce_sum(g_in * tf.matmul(l1, w2)[:, :1])
    through_w1 = tape2.gradient(loss2, w1)
    assert not np.allclose(const_w1, through_w1)  # the scenario tells them apart

    kernel1 = model.get_layer("layer1").kernel
    for differentiable, exp_w1 in ((False, const_w1), (True, through_w1)):
        # gradprobe: the layer-1 gradient of loss1 (target on layer1's own output).
        with tf.GradientTape(persistent=True) as outer:
            g1 = gp.gradients(model, input_tensor, lambda a: tf.reduce_sum(tf.square(a)),
                              "layer1", output="layer1", differentiable=differentiable)["layer1"]
            layer2_out = model(input_tensor)
            loss2 = tf.reduce_sum(layer2_out) + tf.reduce_sum(g1 * layer2_out[:, :1])
        assert_close(g1, grad1, F32)
        assert_close(outer.gradient(loss2, kernel2.value), expected2, F32)
        assert_close(outer.gradient(loss2, kernel1.value), exp_w1, F32, str(differentiable))

    # Example 3's intent, consistent shapes: custom_layer(grad1, layer2_input) =
    # matmul(transpose(grad1), layer2_input); loss3 = its sum; d loss3 / d w2.
    with tf.GradientTape() as tape4:
        with tf.GradientTape() as tape3:
            tape3.watch(input_tensor)
            l1 = tf.matmul(input_tensor, w1)
            l1_loss = tf.reduce_sum(tf.square(l1))
        grad3 = tape3.gradient(l1_loss, l1)
        loss3 = tf.reduce_sum(tf.matmul(tf.transpose(grad3), tf.matmul(l1, w2)))
    expected3 = tape4.gradient(loss3, w2)
    with tf.GradientTape() as outer:
        g = gp.gradients(model, input_tensor, lambda a: tf.reduce_sum(tf.square(a)), "layer1",
                         output="layer1")
        loss3 = tf.reduce_sum(tf.matmul(tf.transpose(g["layer1"]), model(input_tensor)))
    assert_close(outer.gradient(loss3, kernel2.value), expected3, F32)


# --------------------------------------------------------------------- seed 004
def test_seed004_input_gradient_of_activation_sum():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.layers.Dense(units=10, activation="relu", input_shape=(5,))])
    inputs = tf.random.normal((1, 5))
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        activations = model(inputs)
        loss = tf.reduce_sum(activations)
    expected = tape.gradient(loss, inputs)
    g = gp.gradients(model, inputs, lambda y: tf.reduce_sum(y), "inputs")
    assert_close(g["inputs"], expected, F32)
    assert_close(g.outputs, activations, F32)


def test_seed004_intermediate_dense_and_custom_activation():
    class CustomActivation(keras.layers.Layer):
        def call(self, inputs):
            return tf.square(inputs)

    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.layers.Dense(units=32, activation="relu", input_shape=(10,)),
                              keras.layers.Dense(units=16, activation="relu"),
                              keras.layers.Dense(units=5)])
    inputs = tf.random.normal((1, 10))
    with tf.GradientTape() as tape:
        layer1_output = model.layers[0](inputs)
        layer2_output = model.layers[1](layer1_output)
        loss = tf.reduce_sum(layer2_output)
    expected = tape.gradient(loss, layer2_output)
    second = model.layers[1].name
    g = gp.gradients(model, inputs, lambda a: tf.reduce_sum(a), second, output=second)
    assert_close(g[second], expected, F32)
    # And a quantity the seed could not reach: the same pseudo-loss w.r.t. layer 1.
    g = gp.gradients(model, inputs, lambda a: tf.reduce_sum(a), model.layers[0], output=second)
    with tf.GradientTape() as tape:
        layer1_output = model.layers[0](inputs)
        tape.watch(layer1_output)
        loss = tf.reduce_sum(model.layers[1](layer1_output))
    assert_close(g[model.layers[0].name], tape.gradient(loss, layer1_output), F32)

    model = keras.Sequential([keras.layers.Dense(units=16, input_shape=(5,)), CustomActivation(),
                              keras.layers.Dense(units=5)])
    inputs = tf.random.normal((1, 5))
    with tf.GradientTape() as tape:
        first = model.layers[0](inputs)
        custom_out = model.layers[1](first)
        loss = tf.reduce_sum(custom_out)
    expected = tape.gradient(loss, custom_out)
    custom = model.layers[1].name
    g = gp.gradients(model, inputs, lambda a: tf.reduce_sum(a), [custom, model.layers[0]],
                     output=custom)
    assert_close(g[custom], expected, F32)
    assert_close(g[model.layers[0].name], 2 * first, 1e-5)  # d(sum x^2)/dx = 2x
