"""Attribution with `gp.at` sequence targets: chunked, repeated and noisy copies keep
each example's position and class (hand-computed on a linear model)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

import gradprobe as gp
from tolerance import assert_close


def _linear():
    keras.utils.set_random_seed(4)
    # The bias makes class 0 win near the zero baseline, so that a class chosen
    # again on interpolated copies would differ from the original prediction.
    model = keras.Sequential([keras.Input((5, 3)), layers.Dense(
        4, name="logits", bias_initializer=keras.initializers.Constant([0.6, 0.0, 0.0, 0.0]))])
    x = np.random.default_rng(4).normal(size=(3, 5, 3)).astype("float32")
    return model, x, model.get_layer("logits").kernel.numpy()


def _expected(x, kernel, positions, classes):
    """d logits[i, p_i, c_i] / d x: kernel[:, c_i] at position p_i, zero elsewhere."""
    g = np.zeros_like(x)
    for i, (p, c) in enumerate(zip(positions, classes)):
        g[i, p] = kernel[:, c]
    return g


@pytest.mark.parametrize("batch_size", [None, 1, 4])
def test_integrated_gradients_with_per_example_positions(batch_size):
    model, x, kernel = _linear()
    positions, classes = [1, 4, 0], [2, 0, 3]
    ig = gp.integrated_gradients(model, x, gp.at(positions, classes), steps=8,
                                 batch_size=batch_size, progress=False)
    want = x * _expected(x, kernel, positions, classes)  # linear: IG = x * gradient
    assert_close(np.asarray(ig), want, "float32")
    np.testing.assert_allclose(np.asarray(ig.delta), 0.0, atol=1e-5)


def test_predicted_class_at_the_position_is_fixed_on_the_original_inputs():
    model, x, kernel = _linear()
    y = np.asarray(model(x))
    classes = y[:, -1].argmax(-1)
    grad = _expected(x, kernel, [4, 4, 4], classes)
    sal = gp.saliency(model, x, gp.at(-1), batch_size=2)
    assert_close(np.asarray(sal), np.abs(grad).max(axis=-1), "float32")
    # Large noise: the noisy copies' own arg-max classes differ, but each copy keeps
    # its example's class, and a linear model's gradient does not depend on x.
    sg = gp.smoothgrad(model, x, gp.at(-1), samples=16, noise=5.0, seed=0, batch_size=5,
                       absolute=False, reduce_channels=None, progress=False)
    assert_close(np.asarray(sg), grad, "float32")
    # Near the zero baseline every class scores about the same: IG must still use
    # the class predicted at position 2 of the original inputs.
    classes2 = y[:, 2].argmax(-1)
    ig = gp.integrated_gradients(model, x, gp.at(2), steps=6, batch_size=4, progress=False)
    assert_close(np.asarray(ig), x * _expected(x, kernel, [2, 2, 2], classes2), "float32")
