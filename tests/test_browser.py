"""`gradprobe demo` end to end, then its report.html opened in headless Chromium.

Runs the real console script (training included), checks the printed test
accuracy is above 90%, then loads the report with Playwright driving Debian's
Chromium (installed by `make test` through scripts/install-browser.sh): no
console errors, no network requests, the tables and every image present and
decoded. The screenshot is saved to build/test-artifacts/demo-report.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "build", "test-artifacts")
SCRIPT = os.path.join(os.path.dirname(sys.executable), "gradprobe")
CHROMIUM = os.environ.get("GRADPROBE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo, run with --force into a folder that already holds a user's model.keras
    (which it replaces) and notes.txt (which it leaves)."""
    out = tmp_path_factory.mktemp("demo")
    (out / "model.keras").write_bytes(b"the user's model")
    (out / "notes.txt").write_text("the user's notes")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", COLUMNS="160")
    run = subprocess.run([SCRIPT, "demo", "--out", str(out), "--force"], capture_output=True,
                         text=True, timeout=600, env=env)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    return out, run.stdout


def _browser(playwright, user_data_dir):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `sh scripts/install-browser.sh` (make test "
                    "does) or set GRADPROBE_CHROMIUM")
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=CHROMIUM, headless=True, args=FLAGS,
        viewport={"width": 1280, "height": 900})


@pytest.mark.slow
def test_demo_trains_and_writes_everything(demo):
    out, stdout = demo
    match = re.search(r"test accuracy (\d+\.\d)% on 360 held-out digits", stdout)
    assert match, stdout[-3000:]
    assert float(match.group(1)) > 90.0
    assert "gradprobe: gradients by source" in stdout
    assert f"Report: {out / 'report.html'}" in stdout.replace("\n", "")
    for name in ("report.html", "gradcam.png", "gradient_flow.png", "gradient_history.png",
                 "gradients.csv", "model.keras", "test_images.npy", "test_labels.npy"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "notes.txt").read_text() == "the user's notes"  # --force replaces only ours
    with zipfile.ZipFile(out / "model.keras") as archive:  # the trained model, not the user's
        assert {"config.json", "model.weights.h5"} <= set(archive.namelist())


@pytest.mark.slow

def _report_data(report):
    """The JSON data block a report embeds."""
    return json.loads(re.search(r'<script type="application/json" id="gradprobe-data">(.*?)'
                                r"</script>", report.read_text(), re.S).group(1))


def _open(context, report, console, errors, requests):
    """A page on `report` that logs console messages, page errors and requests."""
    page = context.new_page()
    page.on("console", lambda m: console.append((m.type, m.text)))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(report.as_uri(), wait_until="load")
    return page


def test_report_renders_in_chromium_offline(demo, tmp_path):
    from playwright.sync_api import sync_playwright

    out, _ = demo
    report = out / "report.html"
    data = _report_data(report)
    console, errors, requests = [], [], []
    with sync_playwright() as p:
        context = _browser(p, tmp_path / "profile")
        try:
            page = _open(context, report, console, errors, requests)
            assert page.title() == "gradprobe demo: a small CNN on 8x8 digits"
            rows = page.locator("#gradient-table tbody tr")
            assert rows.count() == len(data["sources"]) > 10
            assert rows.first.locator("td").first.inner_text() == "inputs"
            layer_rows = page.locator("#layer-table tbody tr").count()
            assert layer_rows == 7  # conv1, conv2, pool, conv3, gap, fc, logits
            facts = page.locator("#facts").inner_text()
            accuracy = float(re.search(r"test accuracy\s+(\d+\.\d)%", facts).group(1))
            assert accuracy > 90.0
            images = page.locator("img")
            assert images.count() == len(data["figures"]) == 4
            assert set(data["figures"]) == {"gradient-flow", "attribution-maps",
                                            "training-curves", "gradient-history"}
            for i in range(images.count()):
                size = images.nth(i).evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]")
                assert size[0] and size[1] > 100 and size[2] > 100, (i, size)
            os.makedirs(ARTIFACTS, exist_ok=True)
            shot = os.path.join(ARTIFACTS, "demo-report.png")
            page.screenshot(path=shot, full_page=True)
        finally:
            context.close()
    assert not errors, errors
    assert not [c for c in console if c[0] in ("error", "warning")], console
    external = [u for u in requests if not u.startswith(("data:", report.as_uri()))]
    assert not external, external
    assert os.path.getsize(shot) > 50_000
    shutil.copy(report, os.path.join(ARTIFACTS, "demo-report.html"))


VOCAB = ["[PAD]", "the", "film", "was", "great", "awful", "a", "plot", "<b>bold</b>", "and",
         "dull", "!"]


def test_text_report_renders_one_element_per_token(tmp_path):
    """A report with a text section (a tiny Embedding classifier on a 12-token
    vocabulary): no console errors, no requests, one `.gp-token` per token, each
    with the score of the JSON data block."""
    import keras
    import numpy as np
    from keras import layers
    from playwright.sync_api import sync_playwright

    import gradprobe as gp

    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((7,), dtype="int32"),
                              layers.Embedding(len(VOCAB), 4, name="embed"),
                              layers.GlobalAveragePooling1D(), layers.Dense(2, name="logits")])
    ids = np.random.default_rng(1).integers(0, len(VOCAB), (3, 7)).astype("int32")
    ids[0, 0] = VOCAB.index("<b>bold</b>")  # token text must stay text
    report = tmp_path / "text-report.html"
    gp.write_report(str(report), model, ids, vocabulary=VOCAB, title="text report")
    data = _report_data(report)
    console, errors, requests = [], [], []
    with sync_playwright() as p:
        context = _browser(p, tmp_path / "profile")
        try:
            page = _open(context, report, console, errors, requests)
            assert page.title() == "text report"
            tokens = page.locator("#text .gp-token")
            assert tokens.count() == page.locator(".gp-token").count() == ids.size
            assert page.locator("#text .gp-token-row").count() == len(ids)
            texts = tokens.all_inner_texts()
            scores = [float(s) for s in tokens.evaluate_all(
                "els => els.map(e => e.dataset.score)")]
            assert page.locator("#text b").count() == 0
            os.makedirs(ARTIFACTS, exist_ok=True)
            page.locator("#text").screenshot(path=os.path.join(ARTIFACTS, "text-report.png"))
        finally:
            context.close()
    assert texts == [VOCAB[i] for i in ids.ravel()]
    assert np.allclose(scores, np.ravel(data["tokens"]["scores"]), rtol=1e-5, atol=1e-9)
    assert not errors, errors
    assert not [c for c in console if c[0] in ("error", "warning")], console
    external = [u for u in requests if not u.startswith(("data:", report.as_uri()))]
    assert not external, external
