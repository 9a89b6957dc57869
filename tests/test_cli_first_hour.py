"""The newcomer's first hour with the `gradprobe` command (issue 23): a loss that
expects probabilities is never silently given logits (`--from-logits`, the CLI's
refusal, `gp.loss`' ProbabilityWarning), the command starts without importing
the backend for --help and argument errors and prints no native log lines, and
`demo --force` leaves one run's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp
from gradprobe.cli import commands
from gradprobe.core import targets

SCRIPT = os.path.join(os.path.dirname(sys.executable), "gradprobe")
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _env(**extra):
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the command's own default applies
    env["PYTHONPATH"] = os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def run(*args, env=None):
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          env=env or _env())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A logits model and the same model with a softmax, float64 (exact oracle)."""
    d = tmp_path_factory.mktemp("first_hour")
    keras.utils.set_random_seed(1)
    inp = keras.Input((5,), dtype="float64")
    hidden = layers.Dense(8, activation="tanh", dtype="float64", name="hidden")(inp)
    logits = layers.Dense(4, dtype="float64", name="logits")(hidden)
    model = keras.Model(inp, logits, name="logits_model")
    probs = keras.Model(inp, layers.Softmax(dtype="float64", name="softmax")(logits),
                        name="softmax_model")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)) * 3
    y = np.array([0, 1, 2, 3, 1, 0])
    np.save(d / "x.npy", x)
    np.save(d / "y.npy", y)
    model.save(d / "logits.keras")
    probs.save(d / "softmax.keras")
    return d, x, y, model, probs


def _tape(model, x, y, from_logits):
    """The hand-written gradient of the summed per-example loss w.r.t. the input."""
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        per_example = keras.losses.sparse_categorical_crossentropy(
            tf.constant(y), model(xt), from_logits=from_logits)
        total = tf.reduce_sum(per_example)
    return per_example.numpy(), tape.gradient(total, xt).numpy()


def _close(got, ref):
    """Relative to the largest magnitude compared, float32-reported numbers."""
    scale = max(float(np.max(np.abs(ref))), 1e-300)
    return float(np.max(np.abs(np.asarray(got) - ref))) <= 1e-5 * scale


@pytest.mark.parametrize("kind", ["logits", "softmax"])
def test_loss_choice_matches_a_hand_written_tape(saved, kind):
    d, x, y, model, probs = saved
    from_logits = kind == "logits"
    out = run("inspect", str(d / f"{kind}.keras"), "--input", str(d / "x.npy"),
              "--labels", str(d / "y.npy"), "--loss", "sparse_categorical_crossentropy",
              *(["--from-logits"] if from_logits else []), "--wrt", "inputs", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    values, grad = _tape(model if from_logits else probs, x, y, from_logits)
    assert _close(got["target"], values)
    (source,) = got["sources"]
    assert _close([source["norm"], source["max_abs"]],
                  np.array([np.linalg.norm(grad), np.max(np.abs(grad))]))
    assert source["zero_fraction"] == 0.0


@pytest.mark.parametrize("kind, flag, needles", [
    ("logits", [], ["--loss sparse_categorical_crossentropy", "outside [0, 1]",
                    "pass --from-logits"]),
    ("softmax", ["--from-logits"], ["--from-logits", "sums to 1", "drop --from-logits"]),
])
def test_wrong_from_logits_is_refused_in_one_line(saved, kind, flag, needles):
    d = saved[0]
    out = run("inspect", str(d / f"{kind}.keras"), "--input", str(d / "x.npy"),
              "--labels", str(d / "y.npy"), "--loss", "sparse_categorical_crossentropy",
              *flag)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradprobe: error: "), out.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_from_logits_argument_errors(saved):
    d = saved[0]
    common = [str(d / "logits.keras"), "--input", str(d / "x.npy")]
    for args, needle in [([], "--from-logits applies to --loss"),
                         (["--labels", str(d / "y.npy"), "--loss", "mse"], "takes no from_logits")]:
        out = run("inspect", *common, "--from-logits", *args)
        assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr
        assert needle in out.stderr
    assert "--from-logits" in run("inspect", "--help").stdout


@pytest.mark.parametrize("compile", ["auto", False])
def test_gp_loss_warns_on_logits_and_not_on_probabilities(saved, compile):
    _, x, y, model, probs = saved
    with pytest.warns(targets.ProbabilityWarning) as record:
        gp.gradients(model, x, gp.loss("sparse_categorical_crossentropy", y), "inputs",
                     compile=compile)
    message = str(record[0].message)
    for needle in ("sparse_categorical_crossentropy", "outside [0, 1]", "from_logits=True"):
        assert needle in message
    assert record[0].message.loss == "sparse_categorical_crossentropy"
    with warnings.catch_warnings():
        warnings.simplefilter("error", targets.ProbabilityWarning)
        for fn in ("sparse_categorical_crossentropy",
                   keras.losses.SparseCategoricalCrossentropy()):
            gp.gradients(probs, x, gp.loss(fn, y), "inputs", compile=compile)
        gp.gradients(model, x, gp.loss(
            keras.losses.SparseCategoricalCrossentropy(from_logits=True), y), "inputs",
            compile=compile)


def test_no_check_and_no_warning_inside_a_traced_function(saved):
    _, x, y, model, _ = saved

    @tf.function
    def inside(xt):
        return gp.gradients(model, xt, gp.loss("sparse_categorical_crossentropy", y),
                            "inputs")["inputs"]

    with warnings.catch_warnings():
        warnings.simplefilter("error", targets.ProbabilityWarning)
        inside(tf.constant(x))


def test_probability_problem_forms_and_tolerance():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(8, 1000)).astype("float32") * 5
    softmax = keras.ops.convert_to_numpy(keras.ops.softmax(z))  # float32 rounding of 1000 terms
    for fn in ("categorical_crossentropy", "sparse_categorical_crossentropy"):
        loss_fn = keras.losses.get(fn)
        assert targets.probability_problem(loss_fn, softmax) is None
        assert targets.probability_problem(loss_fn, z) is not None
        halved = targets.probability_problem(loss_fn, softmax * 0.9)  # in [0, 1], sums 0.9
        assert halved is not None and "not 1" in str(halved)
    sig = 1 / (1 + np.exp(-z[:, :3]))
    assert targets.probability_problem(keras.losses.BinaryCrossentropy(), sig) is None
    assert targets.probability_problem(keras.losses.binary_crossentropy, z) is not None
    partial = __import__("functools").partial(keras.losses.binary_crossentropy,
                                              from_logits=True)
    assert targets.probability_problem(partial, z) is None
    assert targets.probability_problem(keras.losses.mean_squared_error, z) is None


# ------------------------------------------------------------------ start-up
def test_help_and_argument_errors_import_no_backend():
    code = (
        "import sys\n"
        "from gradprobe.cli import main\n"
        "for argv in (['--help'], ['inspect', '--help'], ['demo', '--help'], ['inspect'],\n"
        "             ['nonsense']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "import gradprobe\n"
        "print(sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_command_prints_no_native_log_lines(saved):
    d = saved[0]
    out = run("inspect", str(d / "logits.keras"), "--input", str(d / "x.npy"), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == ""
    json.loads(out.stdout)


def test_native_log_filter(capfd):
    noise = ("WARNING: All log messages before absl::InitializeLog() is called are written "
             "to STDERR\n"
             "I0000 00:00:1796491032.814802    5758 port.cc:153] oneDNN custom operations\n"
             "E0000 00:00:1796491035.715541    5758 cuda_platform.cc:52] failed call to cuInit\n")
    fatal = "F0000 00:00:1796491035.715541    5758 x.cc:1] Check failed\n"
    with commands.filtered_native_logs(3):
        os.write(2, (noise + "a real message\n" + fatal).encode())
    assert capfd.readouterr().err == "a real message\n" + fatal
    with commands.filtered_native_logs(1):  # a level the user set: errors stay
        os.write(2, noise.encode())
    assert capfd.readouterr().err == noise.splitlines(keepends=True)[2]
    with commands.filtered_native_logs(0):
        os.write(2, noise.encode())
    assert capfd.readouterr().err == noise


def test_a_layer_path_in_the_cli_is_one_line_with_the_fix(saved):
    d = saved[0]
    ok = run("inspect", str(d / "logits.keras"), "--input", str(d / "x.npy"), "--target", "1",
             "--wrt", "logits_model/hidden")
    assert ok.returncode == 0, ok.stderr
    assert "hidden" in ok.stdout
    bad = run("inspect", str(d / "logits.keras"), "--input", str(d / "x.npy"), "--target", "1",
              "--wrt", "hidden/kernel_x")
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert "no layer named 'hidden/kernel_x'" in lines[0] and "relative to the model" in lines[0]
