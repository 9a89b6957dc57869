"""Run by test_monitor: the same training with OneDeviceStrategy and with
MirroredStrategy on two logical CPU devices, and the gradient norms of the same
steps computed by hand (tf.GradientTape, SGD applied by hand); prints JSON."""

import json
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import gradprobe as gp  # noqa: E402
from _dist_common import BATCH, LR, build_model, data  # noqa: E402


def run(strategy):
    with strategy.scope():
        model = build_model()
    x, y = data()
    monitor = gp.GradientMonitor()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    # The history is keyed "conv.kernel"; a lookup by the Keras path finds it too.
    return {"steps": monitor.steps.tolist(),
            "history": {v.path.split("/", 1)[1]: {s: a.tolist() for s, a in
                                                  monitor.history[v.path].items()}
                        for v in model.trainable_weights}}


def by_hand():
    model = build_model()
    x, y = data()
    norms = {v.path.split("/", 1)[1]: [] for v in model.trainable_weights}
    for step in range(len(x) // BATCH):
        xb, yb = x[BATCH * step:BATCH * (step + 1)], y[BATCH * step:BATCH * (step + 1)]
        with tf.GradientTape() as tape:
            loss = model.loss(yb, model(xb, training=True))
        grads = tape.gradient(loss, [v.value for v in model.trainable_weights])
        for v, g in zip(model.trainable_weights, grads):
            norms[v.path.split("/", 1)[1]].append(float(np.linalg.norm(g.numpy())))
            v.assign(v - LR * g)
    return norms


devices = [d.name for d in tf.config.list_logical_devices("CPU")]
one = run(tf.distribute.OneDeviceStrategy(devices[0]))
two = run(tf.distribute.MirroredStrategy(devices[:2]))
json.dump({"devices": len(devices), "one": one, "two": two, "hand": by_hand()}, sys.stdout)
