"""A registered subclassed model, imported by the CLI tests with --import cli_custom."""

import keras
from keras import layers


@keras.saving.register_keras_serializable(package="gradprobe_cli_tests")
class SmallNet(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.conv = layers.Conv2D(3, 3, activation="relu", name="conv")
        self.flat = layers.Flatten(name="flat")
        self.out = layers.Dense(4, name="logits")

    def call(self, x):
        return self.out(self.flat(self.conv(x)))
