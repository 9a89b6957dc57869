"""The `gradprobe` console script, run for real in a subprocess: its --json
numbers equal gp.gradients in this process; unsafe models and pickled arrays are
refused; user errors are one line and exit code 1, never a traceback; no file is
ever replaced without --force, and a failing command writes nothing."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import struct
import subprocess
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp
from cli_custom import SmallNet
from tolerance import assert_close

SCRIPT = os.path.join(os.path.dirname(sys.executable), "gradprobe")


def run(*args, check_code=0, env=None, prefix=()):
    """Runs the console script; `env` adds variables, `prefix` is a launcher command."""
    extra = dict(env or {})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), extra.pop("PYTHONPATH", ""),
                                         os.environ.get("PYTHONPATH", "")])
    env.update(extra)
    out = subprocess.run([*prefix, SCRIPT, *args], capture_output=True, text=True, timeout=300,
                         env=env)
    if check_code is not None:
        assert out.returncode == check_code, (out.returncode, out.stdout[-2000:],
                                              out.stderr[-3000:])
    return out


def run_all(cases: list[dict]) -> list[subprocess.CompletedProcess]:
    """`run(**case)` for each case, three at a time (each pays a TensorFlow start)."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda case: run(*case["args"], check_code=None,
                                              env=case.get("env"), prefix=case.get("prefix", ())),
                             cases))


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
    assert_close(got["target"], np.asarray(g.target), "float32")
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
              "--loss", "sparse_categorical_crossentropy", "--from-logits",
              "--labels", str(d / "y.npy"), "--wrt", "conv,logits.kernel")
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
              str(tmp_path / "cams2"), check_code=1)
    assert "spatial feature maps" in own_lines(out.stderr)[0]
    assert not (tmp_path / "cams2").exists()  # a failing command writes nothing
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
    if kind == "subclassed":  # an existing file is replaced with --overwrite (--force)
        out_path.parent.mkdir()
        out_path.write_text("an older report")
        extra.append("--overwrite")
    out = run("report", paths[kind], "--input", str(d / "x.npy"), "--loss",
              "sparse_categorical_crossentropy", "--from-logits", "--labels",
              str(d / "y.npy"), "--history",
              str(grads_csv), "--history", str(log_csv), "--out", str(out_path), *extra)
    assert out.stdout.strip().endswith(str(out_path))
    data = _report_data(out_path)
    model = keras.saving.load_model(paths[kind])
    g = gp.gradients(model, x, gp.loss(functools.partial(
        keras.losses.sparse_categorical_crossentropy, from_logits=True), y),
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
    users = d / "user-folder"
    users.mkdir(exist_ok=True)
    (users / "model.keras").write_bytes(b"the user's model")
    for args, message in [(["--epochs", "0"], "--epochs must be at least 1"),
                          (["--out", str(d / "x.npy")], "is a file; pass a directory"),
                          (["--out", str(users)], "is not empty (model.keras); the demo writes "
                                                  "into a new or empty folder")]:
        lines = own_lines(run("demo", *args, check_code=1).stderr)
        assert len(lines) == 1 and message in lines[0], lines
    assert os.listdir(users) == ["model.keras"]
    assert (users / "model.keras").read_bytes() == b"the user's model"


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
    assert_close(got["target"], np.asarray(g.target), "float32")
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


# ---------------------------------------------------------------- damaged and hostile inputs
def blank_png(path, width: int, height: int) -> None:
    """A valid black 1-bit PNG of any size, a few KB on disk (zeros compress well)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte, then 8 pixels a byte
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0,
                                                                    0, 0, 0))
                + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def corrupt_member(src, dst, member: str) -> None:
    """A copy of a zip archive with bytes of one (stored) member flipped: its CRC fails."""
    raw = bytearray(pathlib.Path(src).read_bytes())
    with zipfile.ZipFile(src) as z:
        info = z.getinfo(member)
    assert info.compress_type == zipfile.ZIP_STORED and info.compress_size > 200
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + 100
    raw[start:start + 64] = bytes(b ^ 0xFF for b in raw[start:start + 64])
    pathlib.Path(dst).write_bytes(bytes(raw))


# Drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (prctl PR_CAPBSET_DROP) before exec, so
# that file permissions hold for root too; exit 97 when the process may not drop them.
DROP_FILE_OVERRIDE = """import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if os.geteuid() == 0 and any(libc.prctl(24, cap, 0, 0, 0) for cap in (1, 2)):
    sys.exit(97)
os.execv(sys.argv[1], sys.argv[1:])
"""


def unprivileged_prefix() -> list[str]:
    prefix = [sys.executable, "-c", DROP_FILE_OVERRIDE]
    if subprocess.run([*prefix, "/bin/true"]).returncode != 0:
        pytest.skip("cannot drop root's file-permission override here")
    return prefix


def assert_one_line(out, *needles):
    lines = own_lines(out.stderr)
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("gradprobe: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_damaged_inputs_are_one_line_and_debug_shows_the_traceback(saved, tmp_path):
    d, _, paths = saved
    model = paths["functional"]
    with open(model, "rb") as f:
        whole = f.read()
    (tmp_path / "truncated.keras").write_bytes(whole[:len(whole) // 2])
    corrupt_member(model, tmp_path / "corrupt.keras", "model.weights.h5")
    np.savez(tmp_path / "empty.npz")
    blank_png(tmp_path / "huge.png", 20000, 20000)
    assert os.path.getsize(tmp_path / "huge.png") < 200_000
    from PIL import Image

    Image.new("L", (6, 6), 128).save(tmp_path / "small.png")
    (tmp_path / "raising.py").write_text("raise RuntimeError('broken at import')\n")
    cases = {
        "corrupt .keras": dict(args=["inspect", str(tmp_path / "corrupt.keras"), "--input",
                                     str(d / "x.npy")],
                               needles=["corrupt .keras archive", "'model.weights.h5'"]),
        "truncated .keras": dict(args=["inspect", str(tmp_path / "truncated.keras"), "--input",
                                       str(d / "x.npy")],
                                 needles=["not a zip archive", "truncated"]),
        "empty .npz": dict(args=["report", model, "--input", str(tmp_path / "empty.npz"),
                                 "--out", str(tmp_path / "empty-npz" / "r.html")],
                           needles=["'" + str(tmp_path / "empty.npz") + "' holds no arrays"]),
        "20000x20000 PNG": dict(args=["gradcam", model, str(tmp_path / "small.png"),
                                      str(tmp_path / "huge.png"), "--out",
                                      str(tmp_path / "huge-cams")],
                                needles=["400,000,000 pixels", "--max-image-pixels 400000000"]),
        "--import raising": dict(args=["inspect", model, "--input", str(d / "x.npy"),
                                       "--import", "raising"],
                                 env={"PYTHONPATH": str(tmp_path)},
                                 needles=["--import raising failed: RuntimeError: broken"]),
        "--debug": dict(args=["inspect", model, "--input", str(tmp_path / "empty.npz"),
                              "--debug"]),
    }
    results = dict(zip(cases, run_all(list(cases.values()))))
    for name, case in cases.items():
        out = results[name]
        if name == "--debug":
            assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr
            assert own_lines(out.stderr)[-1].endswith("holds no arrays")
            continue
        line = assert_one_line(out, *case["needles"])
        assert "File not found" not in line
    # a failing command writes nothing: no report, no overlay folder
    assert not (tmp_path / "empty-npz").exists() and not (tmp_path / "huge-cams").exists()


def test_permission_errors_are_one_line(saved, tmp_path):
    d, x, paths = saved
    prefix = unprivileged_prefix()
    locked = tmp_path / "locked.npy"
    np.save(locked, x)
    locked.chmod(0)
    sealed = tmp_path / "sealed"
    sealed.mkdir()
    from PIL import Image

    Image.new("L", (6, 6), 128).save(tmp_path / "small.png")
    sealed.chmod(0o555)
    try:
        unreadable, unwritable = run_all([
            dict(args=["inspect", paths["functional"], "--input", str(locked)], prefix=prefix),
            dict(args=["gradcam", paths["functional"], str(tmp_path / "small.png"), "--out",
                       str(sealed / "cams")], prefix=prefix)])
    finally:
        locked.chmod(0o644)
        sealed.chmod(0o755)
    assert_one_line(unreadable, "cannot read --input file", "Permission denied")
    assert_one_line(unwritable, "no permission to write into", str(sealed))
    assert os.listdir(sealed) == []


# ---------------------------------------------------------------- never overwrite
def test_gradcam_same_names_refusal_and_force(saved, tmp_path, capsys):
    """d1/same.png and d2/same.png give two overlays; the second image is 10000x10000 (PIL
    would warn) and the model archive has a member Keras warns about: stderr stays empty.
    Run again (in this process), it refuses and leaves the files as they were; --force
    replaces them."""
    from PIL import Image

    from gradprobe.cli import commands as cli

    d, _, paths = saved
    model_path = str(tmp_path / "extra-member.keras")
    with zipfile.ZipFile(paths["functional"]) as src, zipfile.ZipFile(model_path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
        dst.writestr("../outside.txt", b"not part of a model")
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    small = (np.random.default_rng(3).random((6, 6)) * 255).astype("uint8")
    Image.fromarray(small).save(tmp_path / "d1" / "same.png")
    blank_png(tmp_path / "d2" / "same.png", 10000, 10000)
    images = [str(tmp_path / "d1" / "same.png"), str(tmp_path / "d2" / "same.png")]
    out_dir = tmp_path / "cams"
    args = ["gradcam", model_path, *images, "--target", "1", "--layer", "conv",
            "--out", str(out_dir)]
    first = run(*args)
    assert own_lines(first.stderr) == [], first.stderr
    written = [out_dir / "same_gradcam.png", out_dir / "same_2_gradcam.png"]
    assert sorted(os.listdir(out_dir)) == sorted(p.name for p in written)
    notes = [line for line in first.stdout.splitlines() if "same file name" in line]
    assert len(notes) == 1 and "same_2_gradcam.png (from " + images[1] + ")" in notes[0]
    model = keras.saving.load_model(paths["functional"])
    x = np.stack([small[..., None] / np.float32(255.0), np.zeros((6, 6, 1), "float32")])
    cams = np.asarray(gp.grad_cam(model, x, 1, "conv"))
    expected = [gp.plot.overlay(x[i], cams[i]) for i in range(2)]
    for path, rgb in zip(written, expected):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), rgb)

    written[0].write_bytes(b"the user's own file")
    capsys.readouterr()
    assert cli.main(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"'{written[0]}' already exists" in err[0] and "--force" in err[0]
    assert written[0].read_bytes() == b"the user's own file"
    assert cli.main([*args, "--overwrite"]) == 0
    assert np.array_equal(np.asarray(Image.open(written[0]).convert("RGB")), expected[0])


def test_report_refuses_an_existing_file(saved, tmp_path):
    d, _, paths = saved
    existing = tmp_path / "mine.html"
    existing.write_text("the user's report")
    out = run("report", paths["sequential"], "--input", str(d / "x.npy"), "--out", str(existing),
              check_code=1)
    assert_one_line(out, str(existing), "already exists", "--force")
    assert existing.read_text() == "the user's report"


# ---------------------------------------------------------------- the loaders, in this process
def test_array_files_that_cannot_be_inputs(tmp_path):
    from gradprobe.cli._io import UserError, read_array, read_input

    np.save(tmp_path / "ok.npy", np.ones((2, 3), "float32"))
    whole = (tmp_path / "ok.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(whole[:-5])
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "text.npy").write_text("1 2 3")
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    np.save(tmp_path / "scalar.npy", np.float32(3))
    np.save(tmp_path / "nobatch.npy", np.zeros((0, 3), "float32"))
    np.savez(tmp_path / "objects.npz", a=np.array([{"k": 1}], dtype=object))
    corrupt = tmp_path / "corrupt.npz"
    np.savez(tmp_path / "good.npz", a=np.arange(400.0))
    corrupt_member(tmp_path / "good.npz", corrupt, "a.npy")
    (tmp_path / "half.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:300])
    for name, message in [("truncated.npy", "truncated or corrupt"), ("empty.npy", "is empty"),
                          ("text.npy", "not a NumPy .npy file"), ("strings.npy", "needs numbers"),
                          ("scalar.npy", "single number"), ("nobatch.npy", "empty batch"),
                          ("objects.npz", "pickled"), ("corrupt.npz", "truncated or corrupt"),
                          ("half.npz", "not a .npz archive")]:
        with pytest.raises(UserError, match=message) as info:
            read_array(str(tmp_path / name))
        assert "\n" not in str(info.value) and name in str(info.value)
    with pytest.raises(UserError, match="takes one .npy"):
        read_input(f"{tmp_path / 'ok.npy'},{tmp_path / 'ok.npy'}")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="mixes arrays and images"):
        read_input(f"{tmp_path / 'ok.npy'},{tmp_path / 'a.png'}")
    assert read_array(str(tmp_path / "good.npz"), "a").shape == (400,)


def test_images_pixel_limit_without_warnings(tmp_path):
    import warnings

    from PIL import Image

    from gradprobe.cli._io import UserError, check_image, load_images

    blank_png(tmp_path / "big.png", 10000, 10000)  # PIL warns above 89,478,485 pixels
    blank_png(tmp_path / "huge.png", 20000, 20000)  # and refuses above twice that
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "red.png").read_bytes()[:-30])
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        x = load_images([str(tmp_path / "big.png"), str(tmp_path / "red.png")], (5, 4, 3))
        assert x.shape == (2, 5, 4, 3) and x[0].max() == 0.0
        assert np.allclose(x[1][..., 0], 1.0) and np.allclose(x[1][..., 1:], 0.0)
        with pytest.raises(UserError, match="--max-image-pixels 400000000"):
            check_image(str(tmp_path / "huge.png"))
        assert check_image(str(tmp_path / "huge.png"), 400_000_000) == (20000, 20000)
        with pytest.raises(UserError, match="1,200 pixels, more than the limit of 1,000"):
            check_image(str(tmp_path / "red.png"), 1000)
    assert limit == Image.MAX_IMAGE_PIXELS  # PIL's own setting is restored
    for name, message in [("text.png", "cannot read the image"),
                          ("cut.png", "cannot decode the image")]:
        with pytest.raises(UserError, match=message):
            load_images([str(tmp_path / name)], (5, 4, 3))


def test_import_failures_of_any_kind(tmp_path, monkeypatch):
    from gradprobe.cli._io import UserError, import_modules

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "needs_missing.py").write_text("import not_installed_anywhere_xyz\n")
    (tmp_path / "bad_syntax.py").write_text("def (:\n")
    for name, message in [("exits", "SystemExit: 3"),
                          ("needs_missing", "ModuleNotFoundError: No module named "
                                            "'not_installed_anywhere_xyz'"),
                          ("bad_syntax", "SyntaxError"),
                          ("no_such_module_xyz", "no module named 'no_such_module_xyz'")]:
        with pytest.raises(UserError, match=message):
            import_modules([name])


def test_output_checks_and_unique_names(tmp_path):
    from gradprobe.cli._io import UserError, check_demo_folder, check_new_files, unique_names

    names, renamed = unique_names(["a/same.png", "b/same.png", "same_2.jpg", "c/SAME.jpg"],
                                  "_gradcam.png")
    assert names == ["same_gradcam.png", "same_2_gradcam.png", "same_2_2_gradcam.png",
                     "SAME_3_gradcam.png"]
    assert renamed == ["same_2_gradcam.png (from b/same.png)",
                       "same_2_2_gradcam.png (from same_2.jpg)",
                       "SAME_3_gradcam.png (from c/SAME.jpg)"]
    (tmp_path / "b.png").write_bytes(b"mine")
    targets = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    with pytest.raises(UserError, match="b.png' already exists; pass --force"):
        check_new_files(targets, force=False)
    check_new_files(targets, force=True)
    with pytest.raises(UserError, match="is a file, not a directory"):
        check_new_files([str(tmp_path / "b.png" / "c.png")], force=True)
    check_demo_folder(str(tmp_path / "new"), force=False)
    (tmp_path / "new").mkdir()
    check_demo_folder(str(tmp_path / "new"), force=False)
    with pytest.raises(UserError, match=r"not empty \(b.png, new\)"):
        check_demo_folder(str(tmp_path), force=False)
    check_demo_folder(str(tmp_path), force=True)
    assert (tmp_path / "b.png").read_bytes() == b"mine"


def test_debug_environment_variable_and_unexpected_errors(tmp_path, monkeypatch, capsys):
    from gradprobe.cli import commands as cli

    np.savez(tmp_path / "empty.npz")
    args = ["inspect", "model.keras", "--input", str(tmp_path / "empty.npz")]
    (tmp_path / "model.keras").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not a zip archive" in err
    monkeypatch.setenv("GRADPROBE_DEBUG", "1")
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("gradprobe: error: 'model.keras' is not")
    monkeypatch.delenv("GRADPROBE_DEBUG")

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_inspect", broken)
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gradprobe: error: unexpected KeyError: 'a bug'; rerun with --debug for the "
                   "traceback to report it"]
    with pytest.raises(SystemExit) as info:
        cli.main(["gradcam", "m.keras", "a.png", "--out", "o", "--max-image-pixels", "0"])
    assert info.value.code == 2


# ---------------------------------------------------------------- multi-input .npz, vocabulary
VOCAB = ["[PAD]", "the", "film", "was", "great", "awful", "a", "plot", "and", "dull", "!", "ok"]


def _two_input_model():
    """Token ids (int) through an Embedding, and float features, built on a dict."""
    keras.utils.set_random_seed(4)
    ids = keras.Input((5,), dtype="int32", name="token_ids")
    feats = keras.Input((3,), name="features")
    h = layers.GlobalAveragePooling1D()(layers.Embedding(len(VOCAB), 4, name="embed")(ids))
    out = layers.Dense(3, name="logits")(layers.Concatenate()([h, layers.Dense(4)(feats)]))
    return keras.Model({"token_ids": ids, "features": feats}, out, name="two_inputs")


def test_multi_input_npz_inspect_and_report_with_vocabulary(tmp_path):
    model = _two_input_model()
    path = str(tmp_path / "two.keras")
    model.save(path)
    rng = np.random.default_rng(5)
    x = {"token_ids": rng.integers(0, len(VOCAB), (4, 5)).astype("int32"),
         "features": rng.normal(size=(4, 3)).astype("float32")}
    np.savez(tmp_path / "batch.npz", features=x["features"], token_ids=x["token_ids"])
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    out_html = tmp_path / "r.html"
    inspect, report = run_all([
        {"args": ["inspect", path, "--input", str(tmp_path / "batch.npz"), "--target", "1",
                  "--json"]},
        {"args": ["report", path, "--input", str(tmp_path / "batch.npz"), "--target", "2",
                  "--vocabulary", str(tmp_path / "vocab.txt"), "--out", str(out_html)]}])
    assert inspect.returncode == 0 and report.returncode == 0, (inspect.stderr[-2000:],
                                                                 report.stderr[-2000:])
    loaded = keras.saving.load_model(path)
    got = json.loads(inspect.stdout)
    g = gp.gradients(loaded, x, 1, ["inputs:features", "*", "*.weights"], unconnected="zero")
    stats = g.stats()
    assert [s["name"] for s in got["sources"]] == list(stats)
    assert "inputs:features" in stats and "inputs:token_ids" not in stats
    assert_close(got["target"], np.asarray(g.target), "float32")
    for s in got["sources"]:
        for field in ("norm", "mean_abs", "max_abs", "std", "zero_fraction"):
            assert np.isclose(s[field], stats[s["name"]][field], rtol=1e-5, atol=1e-8)
    data = _report_data(out_html)["tokens"]
    assert data["input"] == "inputs:token_ids" and data["layer"] == "embed"
    assert data["tokens"] == [[VOCAB[i] for i in row] for row in x["token_ids"]]
    e = gp.gradients(loaded, x, 2, ["embed"])
    ref = (e["embed"].numpy() * e.activations["embed"].numpy()).sum(-1)
    assert_close(data["scores"], ref, "float32")
    assert np.abs(ref).max() > 1e-4


def test_multi_input_npz_errors_name_the_keys_and_the_inputs(tmp_path):
    from gradprobe.cli._io import UserError, match_inputs, read_input, read_vocabulary

    model = _two_input_model()
    ids = np.zeros((2, 5), "int32")
    feats = np.zeros((2, 3), "float32")
    cases = [({"token_ids": ids, "feature": feats},
              ["no model input is named ['feature']", "it lacks ['features']"]),
             ({"token_ids": ids}, ["it lacks ['features']"]),
             ({"token_ids": ids, "features": feats, "extra": feats},
              ["no model input is named ['extra']"])]
    for i, (arrays, needles) in enumerate(cases):
        np.savez(tmp_path / f"b{i}.npz", **arrays)
        named = read_input(str(tmp_path / f"b{i}.npz"), by_name=True)
        with pytest.raises(UserError) as info:
            match_inputs(named, model)
        text = str(info.value)
        assert "\n" not in text and f"b{i}.npz" in text, text
        assert "the model's inputs are ['token_ids', 'features']" in text, text
        assert all(n in text for n in needles), text
    np.savez(tmp_path / "sizes.npz", token_ids=ids, features=feats[:1])
    with pytest.raises(UserError, match="different batch sizes"):
        match_inputs(read_input(str(tmp_path / "sizes.npz"), by_name=True), model)
    # A single-input model keeps the old rule (the first array), and a bad array it does
    # not use is no error; one the model needs is.
    np.savez(tmp_path / "one.npz", images=feats, names=np.array(["a", "b"]))
    single = keras.Sequential([keras.Input((3,)), layers.Dense(2)])
    assert match_inputs(read_input(str(tmp_path / "one.npz"), by_name=True), single) is not None
    np.savez(tmp_path / "bad.npz", token_ids=ids, features=np.array(["a", "b"]))
    with pytest.raises(UserError, match="array 'features'.*needs numbers"):
        match_inputs(read_input(str(tmp_path / "bad.npz"), by_name=True), model)
    # Vocabulary files: lines (spaces kept, CRLF accepted), a JSON list or {token: id}.
    (tmp_path / "v.txt").write_bytes(b"[PAD]\r\nNew York\r\n!\r\n")
    assert read_vocabulary(str(tmp_path / "v.txt")) == ["[PAD]", "New York", "!"]
    (tmp_path / "v.json").write_text(json.dumps({"b": 1, "a": 0}))
    assert read_vocabulary(str(tmp_path / "v.json")) == ["a", "b"]
    for name, body, message in [("e.txt", "", "is empty"), ("l.json", "[1, 2]", "JSON list"),
                                ("n.json", "{", "not valid JSON")]:
        (tmp_path / name).write_text(body)
        with pytest.raises(UserError, match=message):
            read_vocabulary(str(tmp_path / name))
