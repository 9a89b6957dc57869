"""Attribution through an embedding on a masked LSTM text classifier (issue 15):
gradient x activation, saliency and Integrated Gradients at the embedding's output
against a hand-written tape, padding positions at exactly zero, token-id baselines."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp
from tolerance import assert_close


@pytest.fixture(scope="module")
def lstm():
    keras.utils.set_random_seed(0)
    ids_in = keras.Input((6,), dtype="int32", name="ids")
    emb = layers.Embedding(12, 4, mask_zero=True, name="emb")
    h = layers.LSTM(5, name="lstm")(emb(ids_in))
    model = keras.Model(ids_in, layers.Dense(3, name="out")(h))
    ids = np.array([[3, 5, 7, 0, 0, 0], [1, 2, 3, 4, 5, 6], [9, 0, 0, 0, 0, 0]], "int32")
    return model, emb, ids


def _tape(model, emb, ids, embedded, cls=1):
    """d out[:, cls] / d (embedding output), with the padding mask the model uses."""
    e = tf.constant(embedded)
    mask = tf.constant(ids != 0)
    with tf.GradientTape() as t:
        t.watch(e)
        h = model.get_layer("lstm")(e, mask=mask)
        y = model.get_layer("out")(h)[:, cls]
    return t.gradient(y, e).numpy(), y.numpy()


def test_gradient_x_activation_and_saliency_at_the_embedding(lstm):
    model, emb, ids = lstm
    e = emb(ids).numpy()
    grad, _ = _tape(model, emb, ids, e)
    gxa = gp.gradient_x_input(model, ids, 1, layer="emb")
    assert gxa.layer == "emb"
    assert_close(np.asarray(gxa), grad * e, "float32")
    assert np.all(np.asarray(gxa)[ids == 0] == 0.0)
    assert_close(gxa.reduce("sum"), (grad * e).sum(-1), "float32")
    assert_close(gxa.reduce("l2"), np.linalg.norm(grad * e, axis=-1), "float32")
    sal = gp.saliency(model, ids, 1, layer="emb")
    assert_close(np.asarray(sal), np.abs(grad).max(-1), "float32")
    with pytest.raises(gp.GradprobeError, match="how"):
        gxa.reduce("mean")
    with pytest.raises(gp.GradprobeError, match="needs floating-point inputs"):
        gp.saliency(model, ids, 1)


def test_integrated_gradients_from_a_token_id_baseline(lstm):
    model, emb, ids = lstm
    # The baseline: every real token replaced by token 11 (a stand-in for [MASK]),
    # padding kept where it is, so the masked positions stay masked.
    base_ids = np.where(ids != 0, 11, 0).astype("int32")
    steps = 64
    ig = gp.integrated_gradients(model, ids, 1, layer="emb", baseline=base_ids, steps=steps,
                                 batch_size=48, progress=False)
    e, b = emb(ids).numpy(), emb(base_ids).numpy()
    alphas = np.linspace(0.0, 1.0, steps)
    weights = np.full(steps, 1.0 / (steps - 1))
    weights[[0, -1]] *= 0.5
    total = np.zeros_like(e)
    for a, w in zip(alphas, weights):
        g, _ = _tape(model, emb, ids, b + a * (e - b))
        total += w * g
    want = (e - b) * total
    np.testing.assert_allclose(np.asarray(ig), want, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(ig)[ids == 0] == 0.0)
    _, f_x = _tape(model, emb, ids, e)
    _, f_b = _tape(model, emb, ids, b)
    np.testing.assert_allclose(np.asarray(ig.delta), want.reshape(3, -1).sum(1) - (f_x - f_b),
                               atol=1e-5)
    assert np.all(np.abs(np.asarray(ig.delta)) < 0.01 * np.abs(f_x - f_b) + 1e-4)
