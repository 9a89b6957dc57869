"""Run by test_monitor: the same training with and without MirroredStrategy on
two logical CPU devices; prints the monitor records as JSON."""

import json
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradprobe as gp  # noqa: E402


def run(strategy):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6, 6, 1)),
                                  keras.layers.Conv2D(3, 3, activation="tanh", name="conv"),
                                  keras.layers.Flatten(), keras.layers.Dense(2, name="out")])
        model.compile(keras.optimizers.SGD(0.05),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.random((32, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 2, size=32)
    monitor = gp.GradientMonitor()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    return {"steps": monitor.steps.tolist(),
            "history": {k.split("/", 1)[1]: {s: v.tolist() for s, v in h.items()}
                        for k, h in monitor.history.items()}}


devices = [d.name for d in tf.config.list_logical_devices("CPU")]
one = run(tf.distribute.OneDeviceStrategy(devices[0]))
two = run(tf.distribute.MirroredStrategy(devices[:2]))
json.dump({"devices": len(devices), "one": one, "two": two}, sys.stdout)
