"""Every pitfall ends in a GradprobeError that names the problem and the fix."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp
from oracle import fd_variable


@pytest.fixture(scope="module")
def cnn():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    h = layers.Conv2D(4, 3, activation="relu", name="conv_a")(inp)
    h = layers.Conv2D(4, 3, activation="relu", name="conv_b")(h)
    h = layers.Flatten(name="flatten")(h)
    out = layers.Dense(5, name="logits")(h)
    return keras.Model(inp, out, name="cnn")


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).random((2, 8, 8, 1)).astype("float32")


def test_is_value_error():
    assert issubclass(gp.GradprobeError, ValueError)


def test_unknown_layer_suggests_closest(cnn, x):
    with pytest.raises(gp.GradprobeError, match=r"no layer named 'conv_c'.*Did you mean.*'conv_a'"):
        gp.gradients(cnn, x, 0, "conv_c")


def test_a_keras_path_from_the_model_side_resolves(cnn, x):
    # Keras prints paths with the model's name first (v.path of a Sequential model:
    # "sequential/dense/kernel"); gradprobe's paths are relative to the model.
    g = gp.gradients(cnn, x, 0, ["cnn/conv_a", "cnn/conv_b.kernel"])
    assert list(g) == ["conv_a", "conv_b.kernel"]
    np.testing.assert_array_equal(g["cnn/conv_a"], gp.gradients(cnn, x, 0, "conv_a")["conv_a"])


def test_a_path_that_names_no_layer_says_how_paths_are_written(cnn, x):
    with pytest.raises(gp.GradprobeError) as err:
        gp.gradients(cnn, x, 0, "conv_a/kernel_x")
    message = str(err.value)
    assert "no layer named 'conv_a/kernel_x'" in message
    assert "relative to the model" in message and "'layer.variable'" in message
    assert "Did you mean 'conv_a'" in message


def test_input_layers_are_not_suggested_as_layers():
    inp = keras.Input((3,), name="digit")
    model = keras.Model(inp, layers.Dense(2, name="dense")(inp), name="digits_cnn")
    with pytest.raises(gp.GradprobeError) as err:
        gp.gradients(model, np.ones((1, 3), "float32"), 0, "digits_cnn/dense2")
    assert "'digit'" not in str(err.value), str(err.value)


def test_unknown_variable_lists_variables(cnn, x):
    with pytest.raises(gp.GradprobeError, match=r"no variable 'kernal'.*'kernel'"):
        gp.gradients(cnn, x, 0, "conv_a.kernal")
    with pytest.raises(gp.GradprobeError, match="no trainable weights"):
        gp.gradients(cnn, x, 0, "flatten.weights")


def test_ambiguous_bare_name_shows_paths(x):
    def block(name):
        i = keras.Input((8, 8, 1))
        return keras.Model(i, layers.Conv2D(1, 3, padding="same", name="conv")(i), name=name)

    inp = keras.Input((8, 8, 1))
    out = layers.Flatten()(layers.Add()([block("left")(inp), block("right")(inp)]))
    model = keras.Model(inp, layers.Dense(2)(out))
    with pytest.raises(gp.GradprobeError, match=r"ambiguous.*'left/conv'.*'right/conv'"):
        gp.gradients(model, x, 0, "conv")
    g = gp.gradients(model, x, 0, ["left/conv", "right/conv.kernel"])
    assert list(g) == ["left/conv", "right/conv.kernel"]
    kernel = model.get_layer("right").get_layer("conv").kernel
    # The target is linear in the kernel, so a central difference with a large step is exact.
    expected = np.zeros(kernel.shape)
    for idx in np.ndindex(*kernel.shape):
        expected[idx] = fd_variable(model, x, lambda y: y[:, 0], kernel, idx, eps=0.5)
    np.testing.assert_allclose(g["right/conv.kernel"].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert g["left/conv"].shape == (2, 8, 8, 1)


def test_target_index_out_of_range(cnn, x):
    with pytest.raises(gp.GradprobeError, match=r"\[0, 4\].*5 classes.*class 7 is out of "
                                                 r"range.*Received: target=7$"):
        gp.gradients(cnn, x, 7, "conv_a")
    with pytest.raises(gp.GradprobeError, match=r"class 9 is out of range.*target=\[0, 9\]$"):
        gp.gradients(cnn, x, [0, 9], "conv_a")
    with pytest.raises(gp.GradprobeError, match=r">= 0.*Received: target=-1$"):
        gp.gradients(cnn, x, -1, "conv_a")
    with pytest.raises(gp.GradprobeError, match=r"one class per example.*got 3.*"
                                                 r"target=\[0, 1, 2\]$"):
        gp.gradients(cnn, x, [0, 1, 2], "conv_a")
    with pytest.raises(gp.GradprobeError, match=r"int32.*target=1000000000000$"):
        gp.gradients(cnn, x, 10**12, "conv_a")
    # the last class is in range, and its score is the gradient of logits[:, 4]
    g = gp.gradients(cnn, x, 4, "logits.bias")
    np.testing.assert_allclose(g["logits.bias"].numpy(), [0, 0, 0, 0, 2], atol=1e-6)


def test_callable_target_wrong_shape(cnn, x):
    with pytest.raises(gp.GradprobeError, match=r"shape \(2, 5\).*scalar or one value per example"):
        gp.gradients(cnn, x, lambda y: y, "conv_a")


def test_non_scalar_target_forms(cnn, x):
    with pytest.raises(gp.GradprobeError, match=r"'predicted' \(the only string target\).*"
                                                 r"target='max'$"):
        gp.gradients(cnn, x, "max", "conv_a")
    with pytest.raises(gp.GradprobeError, match=r"gp.loss\(MeanSquaredError\(...\), y_true\)"):
        gp.gradients(cnn, x, keras.losses.MeanSquaredError(), "conv_a")
    with pytest.raises(gp.GradprobeError, match=r"an int class index.*target=1.5$"):
        gp.gradients(cnn, x, 1.5, "conv_a")


def test_integer_inputs_suggest_embedding():
    inp = keras.Input((4,), dtype="int32")
    h = layers.Embedding(10, 3, name="tok_emb")(inp)
    model = keras.Model(inp, layers.Dense(2)(layers.Flatten()(h)))
    ids = np.array([[1, 2, 3, 4]], "int32")
    with pytest.raises(gp.GradprobeError, match=r"integer inputs.*wrt='tok_emb'"):
        gp.gradients(model, ids, 0, "inputs")
    g = gp.gradients(model, ids, 0, ["tok_emb", "tok_emb.embeddings"])
    table = model.get_layer("tok_emb").embeddings
    expected = np.zeros(table.shape)  # linear in the table: exact central differences
    for idx in np.ndindex(*table.shape):
        expected[idx] = fd_variable(model, ids, lambda y: y[:, 0], table, idx, eps=0.5)
    np.testing.assert_allclose(g["tok_emb.embeddings"].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert not np.any(g["tok_emb.embeddings"].numpy()[[0, 5]])  # ids never used: zero rows
    assert g["tok_emb"].shape == (1, 4, 3)
    # a float sparse or ragged input is not an "integer input"
    for bad, kind in ((tf.sparse.from_dense(np.ones((1, 4), "float32")), "SparseTensor"),
                      (tf.ragged.constant([[1.0, 2.0, 3.0, 4.0]]), "RaggedTensor")):
        with pytest.raises(gp.GradprobeError, match=kind) as info:
            gp.gradients(model, bad, 0, "inputs")
        assert "integer" not in str(info.value)


def test_model_cannot_be_called_shows_expected_shape(cnn):
    bad = np.zeros((2, 5, 5, 3), "float32")
    with pytest.raises(gp.GradprobeError, match=r"could not be called.*expects input shape \(None, 8, 8, 1\)"):
        gp.gradients(cnn, bad, 0, "conv_a")


def test_disconnected_sources_named():
    inp = keras.Input((3,))
    h = layers.Dense(4, name="trunk")(inp)
    a = layers.Dense(2, name="head_a")(h)
    b = layers.Dense(2, name="head_b")(h)
    model = keras.Model(inp, [a, b])
    x = np.ones((2, 3), "float32")
    with pytest.raises(gp.GradprobeError,
                       match=r"'head_b' \(layer is not on the path to output 'head_a'\).*unconnected='zero'"):
        gp.gradients(model, x, 0, ["trunk", "head_b", "head_b.kernel"], output="head_a")
    g = gp.gradients(model, x, 0, ["trunk", "head_b", "head_b.kernel"], output="head_a",
                     unconnected="zero")
    assert g.unconnected == ("head_b", "head_b.kernel")
    assert not np.any(g["head_b"].numpy()) and not np.any(g["head_b.kernel"].numpy())
    with pytest.raises(gp.GradprobeError, match=r"2 outputs.*output="):
        gp.gradients(model, x, 0, "trunk")
    with pytest.raises(gp.GradprobeError, match="no output named 'c'"):
        gp.gradients(model, x, 0, "trunk", output="c")


def test_empty_and_bad_wrt(cnn, x):
    for empty in ([], (), None):
        with pytest.raises(gp.GradprobeError, match="`wrt` is empty"):
            gp.gradients(cnn, x, 0, empty)
    with pytest.raises(gp.GradprobeError, match="Cannot use 3"):
        gp.gradients(cnn, x, 0, [3])
    with pytest.raises(gp.GradprobeError, match="matches no layer"):
        gp.gradients(cnn, x, 0, "zzz*")
    with pytest.raises(gp.GradprobeError, match="Input layer"):
        gp.gradients(cnn, x, 0, cnn.layers[0].name)
    with pytest.raises(gp.GradprobeError, match=r"not part of this model.*Received: wrt=<Dense"):
        gp.gradients(cnn, x, 0, layers.Dense(3))


def test_call_index_errors():
    shared = layers.Dense(3, name="shared")
    inp = keras.Input((3,))
    model = keras.Model(inp, shared(shared(inp)))
    x = np.ones((2, 3), "float32")
    with pytest.raises(gp.GradprobeError, match=r"called 2 time.*'shared@0', 'shared@1'"):
        gp.gradients(model, x, 0, "shared@2")
    with pytest.raises(gp.GradprobeError, match="weights are shared"):
        gp.gradients(model, x, 0, "shared@1.kernel")


def test_rnn_cell_and_never_called_layer():
    class M(keras.Model):
        def __init__(self):
            super().__init__()
            self.rnn = layers.LSTM(3, name="lstm")
            self.unused = layers.Dense(2, name="unused")
            self.out = layers.Dense(2, name="out")

        def call(self, x):
            return self.out(self.rnn(x))

    model = M()
    x = np.ones((2, 4, 3), "float32")
    model(x)
    with pytest.raises(gp.GradprobeError, match=r"inside the time loop.*Select 'lstm'"):
        gp.gradients(model, x, 0, "lstm/lstm_cell")
    with pytest.raises(gp.GradprobeError, match="was never called"):
        gp.gradients(model, x, 0, "unused")
    with pytest.raises(gp.GradprobeError, match="never called"):
        gp.gradients(model, x, 0, "unused.kernel")
    g = gp.gradients(model, x, 0, ["lstm.kernel", "*"])
    assert "lstm/lstm_cell.kernel" in g and g["lstm.kernel"] is g["lstm/lstm_cell.kernel"]
    assert "unused" not in g and any("unused" in s for s in g.skipped)


def test_missing_key_suggests(cnn, x):
    g = gp.gradients(cnn, x, 0, "conv_a")
    with pytest.raises(KeyError, match="Did you mean 'conv_a'"):
        g["conv_aa"]
    assert "conv_b" not in g


def test_argument_validation(cnn, x):
    with pytest.raises(gp.GradprobeError,
                       match=r"`unconnected` to be one of 'raise', 'zero'.*unconnected='ignore'$"):
        gp.gradients(cnn, x, 0, "conv_a", unconnected="ignore")
    with pytest.raises(gp.GradprobeError, match=r"`compile`.*'auto', True, False.*compile='yes'$"):
        gp.gradients(cnn, x, 0, "conv_a", compile="yes")
    with pytest.raises(gp.GradprobeError, match=r"`model` to be a Keras 3 model.*model=<function"):
        gp.gradients(lambda t: t, x, 0, "conv_a")
    with pytest.raises(gp.GradprobeError, match=r"`inputs`.*Received: inputs=None$"):
        gp.gradients(cnn, None, 0, "conv_a")
    with pytest.raises(gp.GradprobeError, match=r"`y_true`.*2 entries but the inputs have 3 "
                                                 r"examples. Received: y_true=\[0, 1\]$"):
        gp.gradients(cnn, np.zeros((3, 8, 8, 1), "float32"),
                     gp.loss("sparse_categorical_crossentropy", [0, 1]), "conv_a")


def test_tf_keras_model_is_refused(x):
    """A tf_keras (Keras 2) model is recognised by its class's module, and refused
    with the way out, by every entry point (tf_keras is not installed here)."""
    legacy = type("Functional", (), {"__module__": "tf_keras.src.engine.functional",
                                     "__repr__": lambda self: "<tf_keras Functional>"})()
    for call in (lambda: gp.gradients(legacy, x, 0, "conv_a"), lambda: gp.saliency(legacy, x, 0),
                 lambda: gp.Tape(legacy), lambda: gp.jacobian(legacy, x, "conv_a")):
        with pytest.raises(gp.GradprobeError, match=r"tf_keras \(Keras 2\) models are not "
                                                     r"supported.*model=<tf_keras Functional>$"):
            call()


def test_errors_raised_while_tracing_are_not_compilation_failures(cnn, x):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "running eagerly" fallback
        with pytest.raises(gp.GradprobeError, match="scalar or one value per example"):
            gp.gradients(cnn, x, lambda y: y[:, :2], "conv_a", compile=True)
