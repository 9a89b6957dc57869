"""Run by test_distribute.py: gp.gradients, per-example gradients and saliency on
a model built under MirroredStrategy (two logical CPU devices), called outside
and inside `strategy.scope()`, compiled and eager, and the same calls on the same
weights built without a strategy; prints JSON (arrays as lists)."""

import json
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import keras  # noqa: E402

import gradprobe as gp  # noqa: E402

WRT = ["conv", "conv.kernel", "dense.weights", "inputs"]


def build():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6, 6, 2)),
                             keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                             keras.layers.Flatten(), keras.layers.Dense(3, name="dense")])


def calls(model):
    out = {}
    for compile_ in (True, False):
        g = gp.gradients(model, x, [0, 1, 2, 0], WRT, compile=compile_)
        out[f"gradients compile={compile_}"] = {k: v.tolist() for k, v in g.numpy().items()}
    g = gp.gradients(model, x, [0, 1, 2, 0], "dense.kernel", per_example=True)
    out["per_example"] = g.numpy()["dense.kernel"].tolist()
    out["saliency"] = gp.saliency(model, x, 1).numpy().tolist()
    return out


x = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32")
devices = [d.name for d in tf.config.list_logical_devices("CPU")]
strategy = tf.distribute.MirroredStrategy(devices[:2])
single = build()
with strategy.scope():
    mirrored = build()
result = {"devices": len(devices),
          "mirrored": type(mirrored.layers[0].kernel.value).__name__,
          "single": calls(single), "outside_scope": calls(mirrored)}
with strategy.scope():
    result["inside_scope"] = calls(mirrored)
json.dump(result, sys.stdout)
