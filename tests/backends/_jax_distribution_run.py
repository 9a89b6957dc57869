"""Run by test_jax_distribution.py in a subprocess (XLA's host device count must be
set before JAX is imported): gp.gradients, the attribution functions, per-example
gradients, statistics, gp.functional and the higher-order functions (gp.hvp,
gp.jacobian, gp.per_example_norms, gp.gradient_penalty) on a small CNN built under
`keras.distribution` on 4 host CPU devices, and the same calls on the same
weights built without a distribution. Prints JSON: for each case, the arrays of
both runs (as lists) and the shardings seen.

Usage: python _jax_distribution_run.py MODE [MODE ...], each MODE one of
  dp:   DataParallel over the 4 devices (variables replicated, batch split in 4).
  mp:   ModelParallel on a (batch 2, model 2) mesh; a LayoutMap shards the conv
        kernel's output channels and the dense kernel's input rows over "model",
        and relayouts the conv activation (".../conv/output").
  fsdp: ModelParallel on a 1-D mesh of 4 named "batch": the dense kernel sharded
        over the same axis as the batch.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradprobe as gp  # noqa: E402
from gradprobe.backends import jax as bk  # noqa: E402
from gradprobe.core.stats import tensor_stats  # noqa: E402

WRT = ["conv", "conv.kernel", "dense.kernel", "dense.bias", "inputs"]


def build():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        # (the last channel's bias keeps the ReLU off everywhere: a dead channel to find)
        keras.layers.Conv2D(4, 3, name="conv",
                            bias_initializer=keras.initializers.Constant([0.0, 0.0, 0.0, -50.0])),
        keras.layers.ReLU(name="relu"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(3, name="dense"),
    ], name="cnn")


def build_two_inputs():
    """Token ids and features, as a dict: an integer input leaf is placed too."""
    keras.utils.set_random_seed(1)
    ids = keras.Input((5,), dtype="int32", name="ids")
    feats = keras.Input((3,), name="feats")
    h = keras.layers.Flatten()(keras.layers.Embedding(11, 2, name="embed")(ids))
    h = keras.layers.Concatenate()([h, feats])
    out = keras.layers.Dense(2, activation="tanh", name="head")(h)
    return keras.Model({"ids": ids, "feats": feats}, out, name="two")


def distribution(mode):
    devices = keras.distribution.list_devices("cpu")
    if mode == "dp":
        return keras.distribution.DataParallel(devices=devices)
    if mode == "mp":
        mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), devices)
        layouts = keras.distribution.LayoutMap(mesh)
        layouts[".*conv/kernel"] = (None, None, None, "model")
        layouts[".*dense/kernel"] = ("model", None)
        layouts[".*conv/output"] = ("batch", None, None, "model")
        return keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
    mesh = keras.distribution.DeviceMesh((4,), ("batch",), devices)
    layouts = keras.distribution.LayoutMap(mesh)
    layouts[".*dense/kernel"] = ("batch", None)
    return keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")


def spec(x):
    """A sharding as text: its partition spec over the mesh, or "single"."""
    s = getattr(x, "sharding", None)
    if s is None or len(s.device_set) == 1:
        return "single"
    parts = list(s.spec)
    while parts and parts[-1] is None:  # (P("model") is P("model", None))
        parts.pop()
    return str(tuple(parts)) + " on " + str(dict(s.mesh.shape))


def arrays(g):
    return {k: np.asarray(v).tolist() for k, v in g.items()}


def run(mode):
    """Every case on a model built without a distribution and on the same weights
    built under `mode`'s distribution."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 6, 2)).astype("float32")
    x2 = rng.normal(size=(8, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, size=8)
    classes = [0, 1, 2, 0, 1, 2, 0, 1]
    dist = distribution(mode)
    keras.distribution.set_distribution(None)
    single = build()
    keras.distribution.set_distribution(dist)
    sharded = build()
    out = {"variables": {v.path.split("/", 1)[1]: spec(v.value) for v in sharded.variables}}

    def both(name, fn, models=(single, sharded)):
        """fn(model) without, then under, the distribution: {"single", "sharded"}."""
        keras.distribution.set_distribution(None)
        a = fn(models[0])
        keras.distribution.set_distribution(dist)
        out[name] = {"single": a, "sharded": fn(models[1])}

    def plain(model):
        g = gp.gradients(model, x, classes, WRT)
        if model is sharded:
            out["shardings"] = {k: spec(v) for k, v in g.items()}
            out["input_sharding"] = spec(gp.functional(model, x, classes, "inputs").inputs)
            before = bk.trace_count
            gp.gradients(model, x2, classes, WRT)
            out["retraces"] = bk.trace_count - before
        return arrays(g)

    def per_example(model):
        g = gp.gradients(model, x, classes, ["dense.kernel", "conv.kernel"], per_example=True)
        if model is sharded:
            out["per_example_shardings"] = {k: spec(v) for k, v in g.items()}
        return arrays(g)

    def stats(model):
        g = gp.gradients(model, x, classes, WRT)
        if model is sharded:  # which gradients the statistics reduce on their devices
            out["reduced"] = sorted(k for k, v in g.items()
                                    if bk.reduced_stats(v) is not None)
        return {"stats": {k: {s: v for s, v in d.items() if s != "shape"}
                          for k, d in g.stats().items()},
                "findings": sorted(f.kind + " " + f.key for f in g.diagnose())}

    def functional(model):
        form = gp.functional(model, x, classes, wrt=["conv", "dense.kernel"])
        probes, variables = jax.grad(form.objective, argnums=(0, 1))(*form.args)
        return arrays({**probes, **variables})

    both("gradients", plain)
    both("second", lambda m: arrays(gp.gradients(m, x2, classes, WRT)))
    both("eager", lambda m: arrays(gp.gradients(m, x, classes, WRT, compile=False)))
    both("one_example", lambda m: arrays(gp.gradients(m, x[:1], 2, WRT)))
    both("loss", lambda m: arrays(gp.gradients(
        m, x, gp.loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True), y),
        "*.weights")))
    both("per_example", per_example)
    both("stats", stats)
    def attributions(model, inputs=x):
        maps = {
            "saliency": gp.saliency(model, inputs, classes),
            "integrated_gradients": gp.integrated_gradients(model, inputs, classes, steps=8),
            # (in chunks of 12 rows: sliced and padded on the devices)
            "integrated_gradients_chunked": gp.integrated_gradients(
                model, inputs, classes, steps=8, batch_size=12),
            "smoothgrad": gp.smoothgrad(model, inputs, classes, samples=4, seed=1),
            "grad_cam": gp.grad_cam(model, inputs, classes, "conv"),
        }
        if model is sharded and inputs is x:
            before = bk.trace_count
            attributions(model, x2)
            out["attribution_retraces"] = bk.trace_count - before
        return {k: v.numpy().tolist() for k, v in maps.items()}

    both("attributions", attributions)
    both("functional", functional)
    if mode != "fsdp":  # (the higher-order functions and layer attributions: two modes)
        ones = np.ones((3, 3, 2, 4), "float32")
        both("higher", lambda m: {
            "hvp": np.asarray(gp.hvp(m, x, classes, "conv.kernel", {"conv.kernel": ones})[
                "conv.kernel"]).tolist(),
            "jacobian": np.asarray(gp.jacobian(m, x, "dense", "inputs")).tolist(),
            "per_example_norms": np.asarray(gp.per_example_norms(m, x, classes).total).tolist(),
            "gradient_penalty": np.asarray(gp.gradient_penalty(m, x, classes)).tolist(),
            "integrated_gradients_layer": gp.integrated_gradients(
                m, x, classes, layer="conv", steps=4).numpy().tolist(),
            "grad_cam_plus_plus": gp.grad_cam_plus_plus(m, x, classes, "conv").numpy().tolist(),
        })
    if mode == "dp":
        keras.distribution.set_distribution(None)
        two_single = build_two_inputs()
        keras.distribution.set_distribution(dist)
        two_sharded = build_two_inputs()
        inputs = {"ids": rng.integers(0, 11, size=(8, 5)).astype("int32"),
                  "feats": rng.normal(size=(8, 3)).astype("float32")}
        both("dict_inputs", lambda m: arrays(gp.gradients(
            m, inputs, 1, ["embed", "embed.embeddings", "head.kernel", "inputs:feats"])),
            (two_single, two_sharded))
        # Statistics of a sharded array with NaN, Inf, exact zeros and entries whose
        # squares overflow float32, on its devices and on the host (float64).
        edge = rng.normal(size=(8, 6)).astype("float32") * 3e30
        edge[0, 0], edge[1, 1], edge[2, :3] = np.inf, np.nan, 0.0
        placed = jax.device_put(edge, dist.get_data_layout(edge.shape).backend_layout)
        out["edge_stats"] = {"device": bk.reduced_stats(placed),
                             "host": tensor_stats(edge)}
    keras.distribution.set_distribution(None)
    return out


json.dump({"devices": jax.device_count(), **{mode: run(mode) for mode in sys.argv[1:]}},
          sys.stdout)
