"""Run by test_monitor as one of two workers of a MultiWorkerMirroredStrategy
cluster on localhost (TF_CONFIG set by the test); writes the monitor's records as
JSON to argv[1]. A second argument (`nomonitor`) trains without the monitor, to
show that Keras' own fit fails under this strategy (keras-team/keras#20585)."""

import json
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf  # noqa: E402

import gradprobe as gp  # noqa: E402
from _dist_common import build_model, data  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = build_model()
x, y = data()
data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # fit(numpy) fails under MWMS
monitor = gp.GradientMonitor() if len(sys.argv) < 3 else None
model.fit(data, epochs=1, verbose=0, callbacks=[monitor] if monitor else [])
with open(sys.argv[1], "w") as f:
    json.dump({"steps": monitor.steps.tolist(),
               "history": {k: {s: v.tolist() for s, v in h.items()}
                           for k, h in monitor.history.items()}}, f)
