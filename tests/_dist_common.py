"""The model and data shared by the tf.distribute scripts run by test_monitor."""

import keras
import numpy as np

LR = 0.05
BATCH = 8


def build_model():
    """A small CNN, compiled; call it inside the strategy's scope."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 1)),
                              keras.layers.Conv2D(3, 3, activation="tanh", name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="out")])
    model.compile(keras.optimizers.SGD(LR),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def data():
    rng = np.random.default_rng(0)
    return rng.random((32, 6, 6, 1)).astype("float32"), rng.integers(0, 2, size=32)
