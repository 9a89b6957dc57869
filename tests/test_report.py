"""`gp.write_report`: one self-contained HTML file whose numbers are those of
`gp.gradients`, with inlined images only, escaped text, and the sections its
inputs call for (attribution maps only for image batches, curves only when given)."""

from __future__ import annotations

import base64
import json
import re

import keras
import numpy as np
import pytest
from keras import layers

import gradprobe as gp
from tolerance import assert_close


def _data(html: str) -> dict:
    block = re.search(r'<script type="application/json" id="gradprobe-data">(.*?)</script>',
                      html, re.S)
    return json.loads(block.group(1))


def _read(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _srcs(html: str) -> list[str]:
    return re.findall(r'src="([^"]*)"', html)


def _cnn():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(4, 3, activation="relu",
                                                                   name="conv"),
                             layers.Flatten(), layers.Dense(3, name="logits")], name="cnn")


def test_image_report_numbers_images_and_sections(tmp_path):
    model = _cnn()
    x = np.random.default_rng(0).random((5, 8, 8, 1)).astype("float32")
    y = np.array([0, 1, 2, 0, 1])
    target = gp.loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True), y)
    path = gp.write_report(str(tmp_path / "sub" / "r.html"), model, x, target, labels=y,
                           history={"loss": [1.0, 0.5], "val_loss": [1.1, 0.7]},
                           notes={"test accuracy": "93.1%"}, max_images=3)
    html = _read(path)
    data = _data(html)
    g = gp.gradients(model, x, target, ["inputs", "*", "*.weights"])
    stats = g.stats()
    assert [s["name"] for s in data["sources"]] == list(stats)
    for s in data["sources"]:
        ref = stats[s["name"]]
        assert tuple(s["shape"]) == ref["shape"]
        for field in ("norm", "mean_abs", "max_abs", "std", "zero_fraction"):
            assert_close(s[field], ref[field], "float32", what=(s["name"], field))
    assert_close(np.ravel(data["target"]), [float(g.target)], "float32")
    assert data["figures"] == ["gradient-flow", "attribution-maps", "training-curves"]
    srcs = _srcs(html)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in html and "https://" not in html
    assert "the loss sparse_categorical_crossentropy" in html and "93.1%" in html
    assert "<script" not in html.replace(
        '<script type="application/json" id="gradprobe-data">', "")
    assert "Content-Security-Policy" in html


def test_attribution_checks_give_the_curves_auc_in_the_caption(tmp_path):
    model = _cnn()
    x = np.random.default_rng(3).random((3, 8, 8, 1)).astype("float32")
    plain = _read(gp.write_report(str(tmp_path / "a.html"), model, x, 1))
    assert "deletion AUC" not in plain  # off by default
    html = _read(gp.write_report(str(tmp_path / "b.html"), model, x, 1,
                                 attribution_checks=True))
    sal = gp.saliency(model, x, 1)
    cam = gp.grad_cam(model, x, 1, "conv")
    for label, maps in (("saliency |g|", sal), ("Grad-CAM (conv)", cam)):
        d = gp.deletion_curve(model, x, maps, 1, steps=20).mean_auc
        i = gp.insertion_curve(model, x, maps, 1, steps=20).mean_auc
        text = f"{label}: deletion AUC {d:.4g}, insertion AUC {i:.4g}"
        assert text in html, text
    with pytest.raises(gp.GradprobeError, match="Received: attribution_checks='yes'"):
        gp.write_report(str(tmp_path / "c.html"), model, x, 1, attribution_checks="yes")


def test_tabular_inputs_have_no_maps_and_names_are_escaped(tmp_path):
    inp = keras.Input((4,), name="features")
    out = layers.Dense(2, name="a_b")(layers.Dense(3, activation="tanh", name="hidden")(inp))
    model = keras.Model(inp, out, name="m<script>")
    x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    path = gp.write_report(str(tmp_path / "t.html"), model, x, 1, title="</script><b>x")
    html = _read(path)
    assert _data(html)["figures"] == ["gradient-flow"]
    assert "m&lt;script&gt;" in html and "&lt;/script&gt;&lt;b&gt;x" in html
    assert "<b>x" not in html
    assert "the score of class 1" in html


def test_given_gradients_monitor_and_csv_histories(tmp_path):
    model = _cnn()
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).random((32, 8, 8, 1)).astype("float32")
    y = np.arange(32) % 3
    monitor = gp.GradientMonitor(csv=str(tmp_path / "g.csv"))
    log = str(tmp_path / "log.csv")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[monitor, keras.callbacks.CSVLogger(log)])
    g = gp.gradients(model, x[:4], 2, "conv")
    for mon, hist in [(monitor, log), (str(tmp_path / "g.csv"), {"loss": [1.0]})]:
        html = _read(gp.write_report(str(tmp_path / "r.html"), model, x[:4], 2, gradients=g,
                                     monitor=mon, history=hist, attribution=False,
                                     overwrite=True))
        data = _data(html)
        assert [s["name"] for s in data["sources"]] == ["conv"]
        assert data["figures"] == ["gradient-flow", "training-curves", "gradient-history"]
        assert "8 recorded steps" in html


def test_bad_history_is_a_clear_error(tmp_path):
    model = _cnn()
    x = np.zeros((2, 8, 8, 1), "float32")
    with pytest.raises(gp.GradprobeError, match="History"):
        gp.write_report(str(tmp_path / "r.html"), model, x, 0, history=[1, 2])
    (tmp_path / "g.csv").write_text("step,loss\n1,2\n")
    with pytest.raises(gp.GradprobeError, match="CSVLogger"):
        gp.write_report(str(tmp_path / "r.html"), model, x, 0, history=str(tmp_path / "g.csv"))
    assert not (tmp_path / "r.html").exists()


def test_grad_cam_layer_default_and_error():
    model = _cnn()
    assert gp.grad_cam_layer(model, np.zeros((1, 8, 8, 1), "float32")) == "conv"
    dense = keras.Sequential([keras.Input((4,)), layers.Dense(2)])
    with pytest.raises(gp.GradprobeError, match="no layer with a spatial"):
        gp.grad_cam_layer(dense, np.zeros((1, 4), "float32"))


def test_per_example_class_targets_caption_the_given_class(tmp_path):
    model = _cnn()
    x = np.random.default_rng(2).random((4, 8, 8, 1)).astype("float32")
    classes = np.array([2, 0, 1, 2])
    html = _read(gp.write_report(str(tmp_path / "r.html"), model, x, classes, max_images=2))
    data = _data(html)
    assert data["figures"] == ["gradient-flow", "attribution-maps"]
    assert "all for the given class" in html
    g = gp.gradients(model, x, classes, ["inputs", "*", "*.weights"])
    assert_close(data["target"], np.asarray(g.target), "float32")


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path):
    model = _cnn()
    x = np.random.default_rng(3).random((2, 8, 8, 1)).astype("float32")
    path = tmp_path / "mine.html"
    path.write_text("the user's page")
    with pytest.raises(gp.GradprobeError, match=r"Received: path='.*mine.html', which exists; "
                                                r"pass overwrite=True"):
        gp.write_report(str(path), model, x, 0)
    assert path.read_text() == "the user's page"
    with pytest.raises(gp.GradprobeError, match="which is a directory"):
        gp.write_report(str(tmp_path), model, x, 0, overwrite=True)
    gp.write_report(str(path), model, x, 0, overwrite=True)
    data = _data(_read(path))
    g = gp.gradients(model, x, 0, ["inputs", "*", "*.weights"])
    assert_close(data["sources"][0]["norm"], g.stats()["inputs"]["norm"], "float32")


VOCAB = ["[PAD]", "the", "film", "was", "great", "awful", "a", "plot", "<b>", "and", "dull", "!"]


def _text_classifier():
    keras.utils.set_random_seed(3)
    ids = keras.Input((6,), dtype="int32", name="token_ids")
    mask = keras.Input((6,), dtype="int32", name="padding_mask")
    h = layers.Embedding(len(VOCAB), 5, name="token_embedding")(ids)
    h = layers.GlobalAveragePooling1D()(h)
    h = layers.Dense(3, name="logits")(h)
    return keras.Model({"token_ids": ids, "padding_mask": mask}, h, name="textcls")


def test_text_section_scores_equal_a_tape_at_the_embedding(tmp_path):
    import tensorflow as tf

    model = _text_classifier()
    ids = np.array([[1, 2, 3, 4, 11, 0], [6, 7, 9, 10, 8, 0], [1, 5, 2, 0, 0, 0]], "int32")
    x = {"token_ids": ids, "padding_mask": (ids > 0).astype("int32")}
    target = np.array([2, 0, 1])
    html = _read(gp.write_report(str(tmp_path / "t.html"), model, x, target,
                                 vocabulary=VOCAB, max_images=2))
    data = _data(html)["tokens"]
    assert data["input"] == "inputs:token_ids" and data["layer"] == "token_embedding"
    assert data["ids"] == ids[:2].tolist()
    assert data["tokens"] == [[VOCAB[i] for i in row] for row in ids[:2]]
    # Hand-written: the embedding lookup, then the rest of the model on it.
    emb = model.get_layer("token_embedding")
    with tf.GradientTape() as tape:
        e = tf.gather(emb.embeddings, ids[:2])
        tape.watch(e)
        logits = model.get_layer("logits")(tf.reduce_mean(e, axis=1))
        picked = tf.gather(logits, target[:2], batch_dims=1)
    ref = tf.reduce_sum(tape.gradient(picked, e) * e, axis=-1).numpy()
    assert_close(data["scores"], ref, "float32")
    assert np.abs(ref).max() > 1e-4  # the comparison is not between zeros
    section = html[html.index('<section id="text">'):html.index('<section id="layers">')]
    spans = re.findall(r'<span class="gp-token" data-score="([^"]+)"', section)
    assert len(spans) == ids[:2].size
    assert_close([float(s) for s in spans], ref.ravel(), "float32")
    assert "&lt;b&gt;" in section and "<b>" not in section  # token text is escaped
    assert "<script" not in section


def test_text_section_vocabulary_forms_and_errors(tmp_path):
    model = _text_classifier()
    ids = np.array([[1, 2, 3, 4, 11, 0]], "int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}

    class Tokenizer:  # the keras-hub tokenizer method the report uses
        def id_to_token(self, i):
            return VOCAB[i].upper()

    html = _read(gp.write_report(str(tmp_path / "a.html"), model, x, 0, vocabulary=Tokenizer()))
    assert _data(html)["tokens"]["tokens"] == [["THE", "FILM", "WAS", "GREAT", "!", "[PAD]"]]
    html = _read(gp.write_report(str(tmp_path / "b.html"), model, x, 0,
                                 vocabulary=dict(enumerate(VOCAB))))
    assert _data(html)["tokens"]["tokens"][0][:2] == ["the", "film"]
    assert "tokens" not in _data(_read(gp.write_report(str(tmp_path / "c.html"), model, x, 0)))
    with pytest.raises(gp.GradprobeError, match="vocabulary of 3 tokens"):
        gp.write_report(str(tmp_path / "d.html"), model, x, 0, vocabulary=VOCAB[:3])
    with pytest.raises(gp.GradprobeError, match="Received: vocabulary of type int"):
        gp.write_report(str(tmp_path / "e.html"), model, x, 0, vocabulary=5)
    with pytest.raises(gp.GradprobeError, match="no integer array"):
        gp.write_report(str(tmp_path / "f.html"), _cnn(), np.zeros((1, 8, 8, 1), "float32"), 0,
                        vocabulary=VOCAB)
    assert not list(tmp_path.glob("[def].html"))


def test_text_section_picks_the_token_ids_over_segment_ids(tmp_path):
    keras.utils.set_random_seed(5)
    seg = keras.Input((4,), dtype="int32", name="segment_ids")
    ids = keras.Input((4,), dtype="int32", name="token_ids")
    h = layers.Add()([layers.Embedding(2, 3, name="segment_embedding")(seg),
                      layers.Embedding(len(VOCAB), 3, name="token_embedding")(ids)])
    out = layers.Dense(2)(layers.GlobalAveragePooling1D()(h))
    model = keras.Model({"segment_ids": seg, "token_ids": ids}, out)
    x = {"segment_ids": np.array([[0, 0, 1, 1]], "int32"),
         "token_ids": np.array([[1, 2, 3, 4]], "int32")}
    data = _data(_read(gp.write_report(str(tmp_path / "s.html"), model, x, 1,
                                       vocabulary=VOCAB)))["tokens"]
    assert data["input"] == "inputs:token_ids" and data["layer"] == "token_embedding"
    assert data["tokens"] == [["the", "film", "was", "great"]]
