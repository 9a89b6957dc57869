"""`python -m gradprobe demo` on JAX and PyTorch (issue 16: `KERAS_BACKEND=jax make demo`).

Runs the demo for one epoch in a subprocess with the current KERAS_BACKEND and
checks the files it writes and the sections of its report. Skipped on
TensorFlow, where tests/test_cli.py and tests/test_browser.py cover the demo.
The demo trains with the GradientMonitor on these backends too (gradients.csv,
gradient_history.png).
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from gradprobe.monitor import read_csv

BACKEND = keras.backend.backend()
if BACKEND not in ("jax", "torch"):
    pytest.skip("the demo on JAX/PyTorch: run with KERAS_BACKEND=jax or torch",
                allow_module_level=True)

SECTIONS = ["<h2>Diagnosis</h2>", "<h2>Gradient statistics by source (forward order)</h2>",
            "<h2>Gradient flow</h2>", "<h2>Attribution maps</h2>", "<h2>Training curves</h2>",
            "<h2>Model layers</h2>"]


@pytest.mark.slow
def test_demo_runs_on_this_backend(tmp_path):
    out = tmp_path / "demo"
    # An earlier run left its files, and the user a file of their own: --force
    # replaces the former, keeps the latter.
    out.mkdir()
    for name in ("gradients.csv", "gradient_history.png", "report.html", "notes.txt"):
        (out / name).write_text("earlier")
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-m", "gradprobe", "demo", "--epochs", "1",
                           "--out", str(out), "--force"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"on {BACKEND}, GradientMonitor attached" in proc.stdout
    assert "test accuracy" in proc.stdout and "Report:" in proc.stdout
    assert sorted(os.listdir(out)) == ["gradcam.png", "gradient_flow.png",
                                       "gradient_history.png", "gradients.csv", "model.keras",
                                       "notes.txt", "report.html", "test_images.npy",
                                       "test_labels.npy"]
    steps, history = read_csv(str(out / "gradients.csv"))
    assert len(steps) and np.all(np.isfinite(history["logits.kernel"]["norm"]))
    assert (out / "notes.txt").read_text() == "earlier"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<title>gradprobe demo: a small CNN on 8x8 digits</title>" in html
    positions = [html.find(s) for s in SECTIONS]
    assert all(p >= 0 for p in positions), [s for s, p in zip(SECTIONS, positions) if p < 0]
    assert positions == sorted(positions)  # in this order
    for name in ("conv1.kernel", "conv2", "logits"):  # rows of the statistics table
        assert f">{name}<" in html, name
    assert html.count("<img") >= 3  # gradient flow, attribution maps, training curves
    for png in ("gradcam.png", "gradient_flow.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    images, labels = np.load(out / "test_images.npy"), np.load(out / "test_labels.npy")
    assert images.shape == (64, 8, 8, 1) and labels.shape == (64,)
    # The saved model loads back on this backend and predicts the held-out batch.
    code = (f"import keras, numpy as np; m = keras.saving.load_model({str(out / 'model.keras')!r}); "
            f"print(tuple(m(np.load({str(out / 'test_images.npy')!r})).shape))")
    check = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "(64, 10)" in check.stdout
