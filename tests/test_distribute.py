"""gp.gradients on a model built under tf.distribute.MirroredStrategy (two logical
CPU devices, which must be configured before TensorFlow starts: a subprocess,
`_mirrored_gradients_run.py`), called outside and inside `strategy.scope()`:
equal to the same weights on one device. (The monitor under MirroredStrategy is
tests/test_monitor.py's; keras.distribution on JAX is
tests/backends/test_jax_distribution.py's.)"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tolerance import assert_close


@pytest.mark.slow
def test_mirrored_model_gradients_equal_one_device_inside_and_outside_the_scope():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                        "_mirrored_gradients_run.py")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert result["devices"] == 2 and result["mirrored"] == "MirroredVariable"
    single = result["single"]
    for where in ("outside_scope", "inside_scope"):
        for case, expected in single.items():
            got = result[where][case]
            pairs = [(k, got[k], expected[k]) for k in expected] if isinstance(expected, dict) \
                else [("", got, expected)]
            for key, a, e in pairs:
                assert_close(np.asarray(a), np.asarray(e), "float32", what=f"{where} {case} {key}")
