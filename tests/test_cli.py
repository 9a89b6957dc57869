"""The `gradprobe` console script, run for real in a subprocess: its --json
numbers equal gp.gradients in this process; unsafe models and pickled arrays are
refused; user errors are one line and exit code 1, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp
from cli_custom import SmallNet

SCRIPT = os.path.join(os.path.dirname(sys.executable), "gradprobe")


def run(*args, check_code=0):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__),
                                           os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == check_code, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    return out


def own_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's native start-up log lines."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith(("WARNING: All log", "I0000", "E0000",
                                                      "W0000", "To enable the following"))]


def _models():
    keras.utils.set_random_seed(0)
    seq = keras.Sequential([keras.Input((6, 6, 1)), layers.Conv2D(3, 3, name="conv"),
                            layers.Flatten(), layers.Dense(4, name="logits")], name="seq")
    inp = keras.Input((6, 6, 1))
    fun = keras.Model(inp, layers.Dense(4, name="logits")(layers.Flatten()(
        layers.Conv2D(3, 3, activation="tanh", name="conv")(inp))), name="fun")
    sub = SmallNet(name="sub")
    sub(np.zeros((1, 6, 6, 1), "float32"))
    return {"sequential": seq, "functional": fun, "subclassed": sub}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    x = np.random.default_rng(0).random((3, 6, 6, 1)).astype("float32")
    np.save(d / "x.npy", x)
    np.savez(d / "x.npz", images=x)
    np.save(d / "y.npy", np.array([0, 1, 2]))
    paths = {}
    for name, model in _models().items():
        paths[name] = str(d / f"{name}.keras")
        model.save(paths[name])
    return d, x, paths


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_json_matches_gp_gradients(saved, kind):
    d, x, paths = saved
    extra = ["--import", "cli_custom"] if kind == "subclassed" else []
    out = run("inspect", paths[kind], "--input", str(d / "x.npy"), "--target", "2", "--json",
              *extra)
    got = json.loads(out.stdout)
    model = keras.saving.load_model(paths[kind])
    g = gp.gradients(model, x, 2, ["inputs", "*", "*.weights"], unconnected="zero")
    assert np.allclose(got["target"], np.asarray(g.target), rtol=1e-5)
    stats = g.stats()
    assert [s["name"] for s in got["sources"]] == list(stats)
    for s in got["sources"]:
        ref = stats[s["name"]]
        assert s["kind"] == g.kinds[s["name"]] and tuple(s["shape"]) == ref["shape"]
        for field in ("norm", "mean_abs", "max_abs", "std", "zero_fraction", "nonfinite"):
            assert np.isclose(s[field], ref[field], rtol=1e-5, atol=1e-8), (s["name"], field)
    assert isinstance(got["findings"], list)


def test_table_npz_loss_and_help(saved):
    d, x, paths = saved
    out = run("inspect", paths["functional"], "--input", f"{d / 'x.npz'}:images",
              "--loss", "sparse_categorical_crossentropy", "--labels", str(d / "y.npy"),
              "--wrt", "conv,logits.kernel")
    assert "conv" in out.stdout and "logits.kernel" in out.stdout
    assert "usage: gradprobe inspect" in run("inspect", "--help").stdout


def test_unsafe_model_and_pickled_array_are_refused(tmp_path, saved):
    d, x, _ = saved
    inp = keras.Input((6, 6, 1))
    lam = keras.Model(inp, layers.Dense(2)(layers.Flatten()(layers.Lambda(lambda t: t * 2)(inp))))
    path = str(tmp_path / "lambda.keras")
    lam.save(path)
    out = run("inspect", path, "--input", str(d / "x.npy"), check_code=1)
    lines = own_lines(out.stderr)
    assert len(lines) == 1 and "--unsafe-load" in lines[0] and "Traceback" not in out.stderr
    out = run("inspect", path, "--input", str(d / "x.npy"), "--unsafe-load", "--json",
              "--target", "0")
    assert json.loads(out.stdout)["sources"]

    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out = run("inspect", saved[2]["functional"],
              "--input", str(tmp_path / "pickled.npy"), check_code=1)
    lines = own_lines(out.stderr)
    assert len(lines) == 1 and "pickled" in lines[0]


@pytest.mark.parametrize("args,message", [
    (["missing.keras", "--input", "X"], "does not exist"),
    (["{d}/x.npy", "--input", "{d}/x.npy"], "not a .keras or .h5"),
    (["{m}", "--input", "{d}/nope.npy"], "does not exist"),
    (["{m}", "--input", "{d}/x.txt"], "unsupported input file type"),
    (["{m}", "--input", "{d}/bad_shape.npy"], "do not fit the model"),
    (["{m}", "--input", "{d}/x.npy", "--wrt", "convv"], "no layer named 'convv'"),
    (["{m}", "--input", "{d}/x.npy", "--target", "9"], "out of range"),
])
def test_user_errors_are_one_line(saved, args, message):
    d, _, paths = saved
    np.save(d / "bad_shape.npy", np.zeros((2, 5, 5, 1), "float32"))
    (d / "x.txt").write_text("1 2 3")
    args = [a.format(d=d, m=paths["functional"]) for a in args]
    out = run("inspect", *args, check_code=1)
    lines = own_lines(out.stderr)
    assert len(lines) == 1 and message in lines[0], lines
    assert "Traceback" not in out.stderr


def test_unregistered_class_names_the_import_flag(saved):
    d, _, paths = saved
    out = run("inspect", paths["subclassed"], "--input", str(d / "x.npy"), check_code=1)
    lines = own_lines(out.stderr)
    assert len(lines) == 1 and "--import MODULE" in lines[0]


def test_usage_errors_exit_2():
    run("inspect", check_code=2)
    run("frobnicate", check_code=2)


def test_gradcam_writes_the_overlays_gp_computes(saved, tmp_path):
    from PIL import Image

    _, _, paths = saved
    rng = np.random.default_rng(1)
    images = []
    for i in range(2):
        f = tmp_path / f"img{i}.png"
        Image.fromarray((rng.random((6, 6)) * 255).astype("uint8")).save(f)
        images.append(str(f))
    out_dir = tmp_path / "cams"
    out = run("gradcam", paths["functional"], *images, "--target", "1", "--out", str(out_dir))
    assert "using layer 'conv'" in out.stdout
    model = keras.saving.load_model(paths["functional"])
    x = np.stack([np.asarray(Image.open(f).convert("L"), np.float32)[..., None] / 255.0
                  for f in images])
    cams = np.asarray(gp.grad_cam(model, x, 1, "conv"))
    for i in range(2):
        written = np.asarray(Image.open(out_dir / f"img{i}_gradcam.png").convert("RGB"))
        assert np.array_equal(written, gp.plot.overlay(x[i], cams[i]))
    out = run("gradcam", paths["functional"], images[0], "--layer", "logits", "--out",
              str(out_dir), check_code=1)
    assert "spatial feature maps" in own_lines(out.stderr)[0]
    out = run("gradcam", paths["functional"], str(tmp_path / "none.png"), "--out",
              str(out_dir), check_code=1)
    assert "does not exist" in own_lines(out.stderr)[0]


def _report_data(path) -> dict:
    import re

    with open(path, encoding="utf-8") as f:
        html = f.read()
    assert "http://" not in html and "https://" not in html
    assert all(src.startswith("data:image/png;base64,")
               for src in re.findall(r'src="([^"]*)"', html))
    return json.loads(re.search(r'id="gradprobe-data">(.*?)</script>', html, re.S).group(1))


@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
def test_report_matches_gp_gradients_with_histories(saved, tmp_path, kind):
    d, x, paths = saved
    y = np.array([0, 1, 2])
    trained = keras.saving.load_model(paths["functional"])
    trained.compile(keras.optimizers.SGD(0.01),
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    grads_csv, log_csv = tmp_path / "grads.csv", tmp_path / "log.csv"
    trained.fit(x, y, batch_size=1, epochs=2, verbose=0,
                callbacks=[gp.GradientMonitor(csv=str(grads_csv)),
                           keras.callbacks.CSVLogger(str(log_csv))])
    extra = ["--import", "cli_custom"] if kind == "subclassed" else []
    out_path = tmp_path / "out" / "report.html"
    out = run("report", paths[kind], "--input", str(d / "x.npy"), "--loss",
              "sparse_categorical_crossentropy", "--labels", str(d / "y.npy"), "--history",
              str(grads_csv), "--history", str(log_csv), "--out", str(out_path), *extra)
    assert out.stdout.strip().endswith(str(out_path))
    data = _report_data(out_path)
    model = keras.saving.load_model(paths[kind])
    g = gp.gradients(model, x, gp.loss("sparse_categorical_crossentropy", y),
                     ["inputs", "*", "*.weights"], unconnected="zero")
    stats = g.stats()
    assert [s["name"] for s in data["sources"]] == list(stats)
    for s in data["sources"]:
        for field in ("norm", "mean_abs", "max_abs", "std", "zero_fraction"):
            assert np.isclose(s[field], stats[s["name"]][field], rtol=1e-5, atol=1e-8)
    assert data["figures"] == ["gradient-flow", "attribution-maps", "training-curves",
                               "gradient-history"]


@pytest.mark.parametrize("args,message", [
    (["--out", "{d}/r.txt"], "must name an .html file"),
    (["--history", "{d}/x.npy", "--out", "{d}/r.html"], "neither a GradientMonitor CSV"),
    (["--history", "{d}/none.csv", "--out", "{d}/r.html"], "does not exist"),
    (["--labels", "{d}/y2.npy", "--loss", "mse", "--out", "{d}/r.html"], "--labels has 2"),
    (["--out", "{d}/x.npy/r.html"], "is a file, not a directory"),
])
def test_report_user_errors(saved, args, message):
    d, _, paths = saved
    np.save(d / "y2.npy", np.array([0, 1]))
    args = [a.format(d=d) for a in args]
    out = run("report", paths["sequential"], "--input", str(d / "x.npy"), *args, check_code=1)
    lines = own_lines(out.stderr)
    assert len(lines) == 1 and message in lines[0], lines


def test_demo_user_errors(saved):
    d, _, _ = saved
    for args, message in [(["--epochs", "0"], "--epochs must be at least 1"),
                          (["--out", str(d / "x.npy")], "is a file; pass a directory")]:
        lines = own_lines(run("demo", *args, check_code=1).stderr)
        assert len(lines) == 1 and message in lines[0], lines


def test_every_command_has_help():
    for command in ("demo", "inspect", "gradcam", "report"):
        assert f"usage: gradprobe {command}" in run(command, "--help").stdout
    assert "--epochs" in run("demo", "--help").stdout


def test_saved_model_directory_gives_input_gradients(saved, tmp_path):
    d, x, paths = saved
    model = keras.saving.load_model(paths["functional"])
    export = tmp_path / "exported"
    model.export(str(export), verbose=False)
    out = run("inspect", str(export), "--input", str(d / "x.npy"), "--target", "1", "--json",
              "--wrt", "inputs")
    got = json.loads(out.stdout)
    g = gp.gradients(model, x, 1, "inputs")
    assert [s["name"] for s in got["sources"]] == ["inputs"]
    assert np.isclose(got["sources"][0]["norm"], g.stats()["inputs"]["norm"], rtol=1e-5)
    assert np.allclose(got["target"], np.asarray(g.target), rtol=1e-5)
    assert any("only its input and output" in line for line in own_lines(out.stderr))
    (tmp_path / "empty").mkdir()
    out = run("inspect", str(tmp_path / "empty"), "--input", str(d / "x.npy"), check_code=1)
    assert "not a SavedModel" in own_lines(out.stderr)[0]
    tf.saved_model.save(tf.Module(), str(tmp_path / "no_signature"))
    out = run("inspect", str(tmp_path / "no_signature"), "--input", str(d / "x.npy"),
              check_code=1)
    lines = own_lines(out.stderr)
    assert len(lines) == 1 and "serving_default" in lines[0], lines


def test_legacy_h5_model(saved, tmp_path):
    d, x, paths = saved
    model = keras.saving.load_model(paths["sequential"])
    h5 = str(tmp_path / "legacy.h5")
    model.save(h5)
    got = json.loads(run("inspect", h5, "--input", str(d / "x.npy"), "--target", "3",
                         "--json").stdout)
    g = gp.gradients(model, x, 3, ["inputs", "*", "*.weights"], unconnected="zero")
    stats = g.stats()
    assert [s["name"] for s in got["sources"]] == list(stats)
    for s in got["sources"]:
        assert np.isclose(s["norm"], stats[s["name"]]["norm"], rtol=1e-5, atol=1e-8)
