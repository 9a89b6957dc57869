"""Run by test_monitor as one of two workers of a MultiWorkerMirroredStrategy
cluster on localhost (TF_CONFIG set by the test); writes the monitor's records as
JSON to argv[1]. A second argument (`nomonitor`) trains without the monitor, to
show that Keras' own fit fails under this strategy (keras-team/keras#20585)."""

import json
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import gradprobe as gp  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
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
data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # fit(numpy) fails under MWMS
monitor = gp.GradientMonitor() if len(sys.argv) < 3 else None
model.fit(data, epochs=1, verbose=0, callbacks=[monitor] if monitor else [])
with open(sys.argv[1], "w") as f:
    json.dump({"steps": monitor.steps.tolist(),
               "history": {k: {s: v.tolist() for s, v in h.items()}
                           for k, h in monitor.history.items()}}, f)
