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

import gradprobe as gp  # noqa: E402
from _dist_common import build_model, data  # noqa: E402


def run(strategy):
    with strategy.scope():
        model = build_model()
    x, y = data()
    monitor = gp.GradientMonitor()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    return {"steps": monitor.steps.tolist(),
            "history": {k.split("/", 1)[1]: {s: v.tolist() for s, v in h.items()}
                        for k, h in monitor.history.items()}}


devices = [d.name for d in tf.config.list_logical_devices("CPU")]
one = run(tf.distribute.OneDeviceStrategy(devices[0]))
two = run(tf.distribute.MirroredStrategy(devices[:2]))
json.dump({"devices": len(devices), "one": one, "two": two}, sys.stdout)
