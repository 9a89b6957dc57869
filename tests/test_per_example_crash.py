"""A process crash in a backend path is never acceptable: `per_example=True` over a
keras-hub BertBackbone (EinsumDense layers) with TensorFlow's oneDNN kernels on used to
abort or segfault inside `tf.vectorized_map` (heap corruption, at random). gradprobe
recognises the case before running and takes the Jacobian of the batched pass, with the
reason in `per_example_fallbacks`. Each case runs in its own process, with oneDNN on and
off set before TensorFlow is imported, so a crash fails the test instead of the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("keras_hub")

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

SCRIPT = r"""
import json, sys
import keras, keras_hub, numpy as np
import gradprobe as gp

keras.utils.set_random_seed(7)
bb = keras_hub.models.BertBackbone(vocabulary_size=20, num_layers=1, num_heads=2,
                                   hidden_dim=8, intermediate_dim=16, max_sequence_length=16,
                                   dtype="float64")
ids = np.random.default_rng(0).integers(1, 20, size=(3, 16)).astype("int32")
x = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": np.ones_like(ids)}

def target(y):
    return keras.ops.sum(y["pooled_output"], axis=-1)

g = gp.gradients(bb, x, target, "*.weights", per_example=True)
rows = []  # the oracle: one example at a time
for i in range(3):
    one = {k: v[i:i + 1] for k, v in x.items()}
    rows.append(gp.gradients(bb, one, target, "*.weights").numpy())
# the error relative to each gradient's largest entry; a gradient that is zero in exact
# arithmetic (the key bias, which the softmax cancels) against the largest of them all
scale = max(float(np.abs(r[k]).max()) for r in rows for k in g)
err = max(float(np.abs(np.asarray(g[k]) - np.stack([r[k] for r in rows])).max())
          / max(float(np.abs(np.stack([r[k] for r in rows])).max()), 1e-9 * scale) for k in g)
refused = ""
try:
    gp.gradients(bb, x, target, "*.weights", per_example="vectorized_map")
except gp.GradprobeError as e:
    refused = str(e)
print(json.dumps({"methods": sorted(set(g.per_example_method.values())),
                  "fallbacks": sorted(set(g.per_example_fallbacks.values())),
                  "err": err, "refused": refused}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ["1", "0"])
def test_bert_per_example_never_crashes(onednn):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, KERAS_BACKEND="tensorflow",
               PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    for _ in range(2):  # the crash came at random: twice
        out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                             timeout=600, env=env)
        assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
        found = json.loads(out.stdout.strip().splitlines()[-1])
        assert found["err"] < 1e-10, found  # float64: the same numbers as one at a time
        if onednn == "1":
            assert found["methods"] == ["jacobian"], found
            assert any("EinsumDense" in f and "TF_ENABLE_ONEDNN_OPTS=0" in f
                       for f in found["fallbacks"]), found
            assert "per_example='vectorized_map'" in found["refused"], found
            assert "Received:" in found["refused"], found
        else:
            assert found["methods"] == ["vectorized_map"], found
            assert found["refused"] == "", found
