"""gp.gradients, the attribution functions, per-example gradients, statistics,
gp.functional and the higher-order functions under `keras.distribution` on JAX
(issue 25, item 3).

XLA's host device count must be set before JAX is imported, so the work runs in
a subprocess (`_jax_distribution_run.py`, on 4 host CPU devices) that builds the
same small models with and without a distribution: DataParallel, ModelParallel
with a LayoutMap sharding kernels over a "model" axis (and an activation), and
ModelParallel sharding a kernel over the batch axis itself. Oracle: the
single-device run of the same weights (itself checked against hand-written
jax.grad elsewhere), to float32 rounding (tests/tolerance.py), relative to the
largest gradient of the result (biases behind a normalisation are sums that
cancel to ~1e-8).

Skipped on other backends (`make test` runs tests/backends with KERAS_BACKEND=jax).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("keras.distribution on JAX: run with KERAS_BACKEND=jax", allow_module_level=True)

from tolerance import assert_close  # noqa: E402

MODES = ("dp", "mp", "fsdp")
HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def runs():
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, os.path.join(HERE, "_jax_distribution_run.py"),
                           *MODES], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def _leaves(tree, path=""):
    """(path, array) for every array of a nested dict of lists."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{path}/{k}")
    else:
        yield path, np.asarray(tree, dtype=np.float64)


CASES = ["gradients", "second", "eager", "one_example", "loss", "per_example", "attributions",
         "functional"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_results_equal_the_single_device_run(runs, mode):
    assert runs["devices"] == 4
    run = runs[mode]
    for case in CASES + (["dict_inputs"] if mode == "dp" else []) + \
            (["higher"] if mode != "fsdp" else []):
        single = dict(_leaves(run[case]["single"]))
        sharded = dict(_leaves(run[case]["sharded"]))
        assert sorted(single) == sorted(sharded), case
        scale = max(float(np.max(np.abs(a))) for a in single.values() if a.size)
        for path, expected in single.items():
            assert_close(sharded[path], expected, "float32", scale=scale,
                         what=f"{mode} {case}{path}")


@pytest.mark.slow
def test_inputs_and_gradients_keep_keras_layouts(runs):
    batch4, mesh22 = "{'batch': 4}", "{'batch': 2, 'model': 2}"
    dp, mp, fsdp = runs["dp"], runs["mp"], runs["fsdp"]
    # The batch is split along the distribution's batch axis, as Keras' trainer splits it.
    assert dp["input_sharding"] == f"('batch',) on {batch4}"
    assert mp["input_sharding"] == f"('batch',) on {mesh22}"
    # Variables keep their layouts, and each weight gradient has its variable's.
    assert mp["variables"]["conv/kernel"] == f"(None, None, None, 'model') on {mesh22}"
    assert mp["variables"]["dense/kernel"] == f"('model',) on {mesh22}"
    assert fsdp["variables"]["dense/kernel"] == f"('batch',) on {batch4}"
    for run in (dp, mp, fsdp):
        for key in ("conv.kernel", "dense.kernel", "dense.bias"):
            assert run["shardings"][key] == run["variables"][key.replace(".", "/")], key
    assert dp["shardings"]["conv.kernel"] == f"() on {batch4}"  # replicated: all-reduced
    # Input and activation gradients stay split over the batch (the LayoutMap's
    # ".../conv/output" layout also splits the conv activation's channels).
    assert dp["shardings"]["inputs"] == dp["shardings"]["conv"] == f"('batch',) on {batch4}"
    assert mp["shardings"]["conv"] == f"('batch', None, None, 'model') on {mesh22}"
    # Per-example weight gradients: the batch axis first, then the variable's layout
    # (unless the variable already uses the batch's mesh axis).
    assert mp["per_example_shardings"] == {
        "dense.kernel": f"('batch', 'model') on {mesh22}",
        "conv.kernel": f"('batch', None, None, None, 'model') on {mesh22}"}
    assert fsdp["per_example_shardings"]["dense.kernel"] == f"(None, 'batch') on {batch4}"


@pytest.mark.slow
def test_no_retrace_for_new_values(runs):
    for mode in MODES:  # gp.gradients, and every attribution method (chunked IG too)
        assert runs[mode]["retraces"] == 0, mode
        assert runs[mode]["attribution_retraces"] == 0, mode


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_statistics_of_sharded_gradients_are_reduced_on_their_devices(runs, mode):
    run = runs[mode]
    # Sharded gradients (the batch-split input and activation gradients, the
    # kernels a LayoutMap shards) are reduced where they lie; replicated ones are read.
    expected = {"dp": ["conv", "inputs"], "mp": ["conv", "conv.kernel", "dense.kernel", "inputs"],
                "fsdp": ["conv", "dense.kernel", "inputs"]}[mode]
    assert run["reduced"] == expected
    single, sharded = run["stats"]["single"], run["stats"]["sharded"]
    for key, stats in single["stats"].items():
        got = sharded["stats"][key]
        assert got["nonfinite"] == stats["nonfinite"] == 0, key
        assert got["zero_fraction"] == stats["zero_fraction"], key
        for name in ("norm", "mean_abs", "max_abs", "std"):
            assert_close(got[name], stats[name], "float32", what=f"{mode} {key} {name}")
    # The dead channel (the conv's last: its bias keeps the ReLU off) is found in
    # the sharded activation gradient as in the single-device one.
    assert sharded["findings"] == single["findings"]
    assert "dead conv" in single["findings"] and "dead conv.kernel" in single["findings"]


@pytest.mark.slow
def test_on_device_statistics_of_extreme_values(runs):
    device, host = runs["dp"]["edge_stats"]["device"], runs["dp"]["edge_stats"]["host"]
    assert device["nonfinite"] == host["nonfinite"] == 2
    assert device["zero_fraction"] == host["zero_fraction"] == 3 / 48
    assert device["shape"] == host["shape"] == [8, 6]
    for name in ("norm", "mean_abs", "max_abs", "std"):  # (squares of 3e30 overflow float32)
        assert np.isfinite(device[name]), name
        assert_close(device[name], host[name], "float32", what=name)
