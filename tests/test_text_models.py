"""Text and sequence models: `gp.at` targets, text-model errors, `gp.plot.tokens` and
1-D sequence maps; keras-hub models built from tiny configs (random weights, no
presets, no downloads)."""

from __future__ import annotations

import html
import re

import keras
import matplotlib.image as mpimg
import numpy as np
import pytest
import tensorflow as tf

import gradprobe as gp
from tolerance import assert_close

VOCAB = ["[PAD]", "[CLS]", "[SEP]", "the", "film", "was", "great", "<b>", "&", "bad",
         "a", "plot", "not", "very", "good", "fun", "dull", "so", ".", "!"]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


# ------------------------------------------------------------ gp.at on a toy model
@pytest.fixture(scope="module")
def seq_model():
    keras.utils.set_random_seed(3)
    inp = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(len(VOCAB), 5, name="emb")(inp)
    h = keras.layers.Dense(7, activation="tanh", name="mix")(h)
    out = keras.layers.Dense(len(VOCAB), name="head")(h)
    return keras.Model(inp, out)


IDS = np.array([[1, 3, 4, 5, 0, 0], [1, 10, 11, 12, 13, 2], [1, 16, 0, 0, 0, 0]], "int32")
MASK = IDS != 0


def _tape_at(model, ids, positions, classes=None, log_prob=False):
    """Hand-written: d/d(emb output, head.kernel) of sum_i score[i, pos_i, class_i]."""
    emb, mix, head = (model.get_layer(n) for n in ("emb", "mix", "head"))
    e = emb(ids)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(e)
        logits = head(mix(e))
        if log_prob:
            logits = tf.nn.log_softmax(logits, axis=-1)
        rows = [logits[i, p] for i, p in enumerate(positions)]
        cls = [int(np.argmax(r.numpy())) for r in rows] if classes is None else classes
        values = tf.stack([r[c] for r, c in zip(rows, cls)])
        obj = tf.reduce_sum(values)
    return values.numpy(), tape.gradient(obj, e).numpy(), tape.gradient(obj, head.kernel).numpy()


@pytest.mark.parametrize("spec, positions, classes, log_prob", [
    (gp.at(-1, 4), [5, 5, 5], [4, 4, 4], False),
    (gp.at(2, "predicted"), [2, 2, 2], None, False),
    (gp.at([0, 3, 1], [3, 5, 7]), [0, 3, 1], [3, 5, 7], False),
    (gp.at("last", "predicted", mask=MASK, log_prob=True), [3, 5, 1], None, True),
    (gp.at("last", 9, mask=MASK.astype("int32"), log_prob=True), [3, 5, 1], [9, 9, 9], True),
])
def test_at_matches_tape(seq_model, spec, positions, classes, log_prob):
    want_v, want_e, want_k = _tape_at(seq_model, IDS, positions, classes, log_prob)
    g = gp.gradients(seq_model, IDS, spec, wrt=["emb", "head.kernel"])
    assert_close(g.target, want_v, "float32", what="target")
    assert _rel(g["emb"], want_e) <= 1e-5
    assert _rel(g["head.kernel"], want_k) <= 1e-5
    # only the chosen positions carry gradient to the embedding output
    touched = np.abs(g["emb"].numpy()).sum(-1) > 0
    for i, p in enumerate(positions):
        assert not touched[i, p + 1:].any()


def test_predicted_is_per_position_argmax_not_of_summed_logits(seq_model):
    logits = seq_model(IDS).numpy()
    g = gp.gradients(seq_model, IDS, gp.at(2, "predicted"), wrt="emb")
    assert_close(g.target, logits[:, 2].max(-1), "float32")
    summed = logits.sum(1).argmax(-1)
    assert np.any(summed != logits[:, 2].argmax(-1))  # the two rules differ on this batch


@pytest.mark.parametrize("target, form", [(4, "gp.at(-1, 4)"), ("predicted", "gp.at(-1, 'predicted')"),
                                          ([1, 2, 3], "gp.at(-1, classes)")])
def test_class_target_on_sequence_output_shows_the_new_form(seq_model, target, form):
    with pytest.raises(gp.GradprobeError, match=re.escape(form)) as e:
        gp.gradients(seq_model, IDS, target, wrt="emb")
    assert "(None, 6, 20)" in str(e.value) and "mask=padding_mask" in str(e.value)


@pytest.mark.parametrize("call, match", [
    (lambda: gp.at("first"), r"Expected `position`.*Received: position='first'"),
    (lambda: gp.at("last"), r"together with mask=.*position=-1"),
    (lambda: gp.at(1, mask=MASK), r"Expected `mask` to be given only with position='last'"),
    (lambda: gp.at([0.5, 1.0]), r"1-D sequence of ints.*float64"),
    (lambda: gp.at(True), r"a bool is not one"),
    (lambda: gp.at("last", mask=np.zeros((2, 4))), r"example\(s\) 0, 1 are all padding"),
    (lambda: gp.at("last", mask=np.ones(4)), r"shape \(batch, steps\); got shape \(4,\)"),
    (lambda: gp.at(0, "argmax"), r"Expected `target`.*'predicted'"),
    (lambda: gp.at(0, -1), r"Expected `target` to be a class index >= 0"),
    (lambda: gp.at([0, 1], [1, 2, 3]), r"as many as the positions \(2\)"),
    (lambda: gp.at(0, 1, log_prob="yes"), r"log_prob"),
])
def test_at_argument_errors(call, match):
    with pytest.raises(gp.GradprobeError, match=match):
        call()


@pytest.mark.parametrize("spec, match", [
    (gp.at(6, 1), r"position in \[-6, 5\].*Received: position=6"),
    (gp.at(0, 20), r"class index in \[0, 19\]"),
    (gp.at([0, 1], 1), r"one entry per example: 3"),
    (gp.at("last", 1, mask=np.ones((3, 4))), r"output's 6 positions"),
])
def test_at_errors_against_the_output(seq_model, spec, match):
    with pytest.raises(gp.GradprobeError, match=match):
        gp.gradients(seq_model, IDS, spec, wrt="emb")


def test_at_on_a_rank2_output_is_refused():
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(3)(inp))
    with pytest.raises(gp.GradprobeError, match=r"gp.at picks a position on axis 1"):
        gp.gradients(model, np.ones((2, 4), "float32"), gp.at(0, 1), wrt="inputs")


def test_at_new_positions_and_classes_do_not_retrace():
    from gradprobe.core import cache

    keras.utils.set_random_seed(4)
    inp = keras.Input((6,), dtype="int32")
    model = keras.Model(inp, keras.layers.Dense(5)(keras.layers.Embedding(20, 3)(inp)))
    rng = np.random.default_rng(0)
    for _ in range(3):
        mask = np.arange(6) < rng.integers(1, 7, size=(3, 1))
        gp.gradients(model, IDS, gp.at("last", rng.integers(0, 5, 3), mask=mask, log_prob=True),
                     wrt=model.layers[1])
    fns = [e.fn for e in cache.entries_by_model[model].values()]
    assert len(fns) == 1 and fns[0].experimental_get_tracing_count() == 1


def test_at_take_selects_examples(seq_model):
    spec = gp.at("last", [3, 5, 7], mask=MASK)
    part = spec.take([2, 0])
    g = gp.gradients(seq_model, IDS[[2, 0]], part, wrt="emb")
    full = gp.gradients(seq_model, IDS, spec, wrt="emb")
    assert_close(g.target, full.target.numpy()[[2, 0]], "float32")
    fixed = gp.at(0, "predicted").with_classes([1, 2, 3])
    assert list(fixed.target) == [1, 2, 3] and fixed.positions == 0
    logits = seq_model(IDS).numpy()
    resolved = gp.at("last", "predicted", mask=MASK).resolve_predicted(logits)
    assert list(resolved.target) == [int(np.argmax(logits[i, p])) for i, p in
                                     enumerate([3, 5, 1])]
    g = gp.gradients(seq_model, IDS, resolved, wrt="emb")
    assert_close(g.target, [logits[i, p].max() for i, p in enumerate([3, 5, 1])], "float32")


# -------------------------------------------------------- integer-input errors (toy)
def test_integer_input_error_sequential_and_subclassed():
    x = np.ones((2, 5), "int32")
    seq = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(10, 4, name="e"),
                            keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    with pytest.raises(gp.GradprobeError, match=r"^'inputs' has dtype int32.*It feeds the "
                                                r"embedding layer 'e'.*wrt='e'\.$"):
        gp.gradients(seq, x, 0, wrt="inputs")

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.e = keras.layers.Embedding(10, 4, name="e")
            self.d = keras.layers.Dense(2)

        def call(self, ids):
            return self.d(keras.ops.mean(self.e(ids), axis=1))

    sub = Sub()
    sub(x)
    with pytest.raises(gp.GradprobeError, match=r"^'inputs' has dtype int32.*wrt='e'"):
        gp.gradients(sub, x, 0, wrt="inputs")


def test_integer_input_error_names_the_call_of_a_shared_embedding():
    q = keras.Input((3,), dtype="int32", name="q")
    d = keras.Input((3,), dtype="int32", name="d")
    emb = keras.layers.Embedding(10, 4, name="shared")
    flat = keras.layers.Concatenate()([keras.layers.Flatten()(emb(q)),
                                       keras.layers.Flatten()(emb(d))])
    model = keras.Model({"q": q, "d": d}, keras.layers.Dense(2)(flat))
    x = {"q": np.array([[1, 2, 3]], "int32"), "d": np.array([[7, 8, 9]], "int32")}
    with pytest.raises(gp.GradprobeError) as e:
        gp.gradients(model, x, 0, wrt="inputs:d")
    assert str(e.value).startswith("'inputs:d' has dtype int32")
    # two lookups of one layer: no call index is claimed (Keras orders them, not the graph)
    assert "embedding layer 'shared'" in str(e.value) and "wrt='shared'." in str(e.value)
    g = gp.gradients(model, x, 0, wrt="shared")
    assert len(g) == 2


# --------------------------------------------------------------------- plot.tokens
def _spans(fragment):
    return re.findall(r'<span class="gp-token" data-score="([^"]+)"[^>]*'
                      r'background-color: rgb\((\d+), (\d+), (\d+)\)[^>]*>(.*?)</span>', fragment)


def test_tokens_html_one_span_per_token_with_signed_colours(tmp_path):
    toks = ["[CLS]", "<b>", "film", "&", "was", "\"great\""]
    scores = np.array([0.0, 0.8, -0.4, 0.1, -1.6, 1.6])
    fragment = gp.plot.tokens(toks, scores, path=tmp_path / "t.html", title="a <title>")
    spans = _spans(fragment)
    assert len(spans) == len(toks)
    for (score, r, g, b, text), tok, want in zip(spans, toks, scores):
        r, g, b = int(r), int(g), int(b)
        assert float(score) == pytest.approx(want)
        assert html.unescape(text) == tok
        if want > 0:
            assert r == 255 and b < 255
        elif want < 0:
            assert b == 255 and r < 255
        else:
            assert (r, g, b) == (255, 255, 255)
    assert "&lt;b&gt;" in fragment and "<b>" not in fragment.replace('class="gp-', "")
    assert "&lt;title&gt;" in fragment
    # the colour scale is centred on 0 and shared: +-1.6 are full colour, 0.8 is half
    assert spans[4][1:4] == ("0", "0", "255") and spans[5][1:4] == ("255", "0", "0")
    assert spans[1][2] == "128"
    page = (tmp_path / "t.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and fragment in page


def test_tokens_batch_ids_vocabulary_and_png(tmp_path):
    ids = IDS[:2]
    scores = np.where(ids == 0, 0.0, np.linspace(-1, 1, ids.size).reshape(ids.shape))
    fragment = gp.plot.tokens(ids, scores, vocabulary=VOCAB, path=tmp_path / "t.png", limit=0.5)
    assert fragment.count('class="gp-token-row"') == 2
    assert [html.unescape(s[4]) for s in _spans(fragment)][:4] == ["[CLS]", "the", "film", "was"]
    img = mpimg.imread(tmp_path / "t.png")
    assert img.ndim == 3 and img.shape[0] > 20 and img.shape[1] > 100
    # the saturated red and blue tokens are in the picture
    rgb = (img[..., :3] * 255).round()
    assert np.any((rgb[..., 0] == 255) & (rgb[..., 2] == 0))
    assert np.any((rgb[..., 2] == 255) & (rgb[..., 0] == 0))


def test_tokens_to_file_objects():
    import io

    text, raw = io.StringIO(), io.BytesIO()
    fragment = gp.plot.tokens(["x", "<y>"], [1.0, -1.0], path=text, format="html")
    assert fragment in text.getvalue() and "&lt;y&gt;" in text.getvalue()
    gp.plot.tokens(["x", "<y>"], [1.0, -1.0], path=raw, format="png")
    raw.seek(0)
    assert mpimg.imread(raw, format="png").ndim == 3
    with pytest.raises(gp.GradprobeError, match=r"Received: format='svg'"):
        gp.plot.tokens(["x"], [1.0], path=raw, format="svg")


@pytest.mark.parametrize("args, kwargs, match", [
    ((["a", "b"], [1.0]), {}, r"example 0 has 2 tokens and 1 scores"),
    ((["a"], [np.nan]), {}, r"finite"),
    ((["a"], np.ones((1, 1, 4))), {}, r"reduce the embedding axis"),
    (("ab", [1.0, 2.0]), {}, r"not one string"),
    (([5], [1.0]), {"vocabulary": ["a"]}, r"Token id 5 is not in `vocabulary`"),
    ((["a"], [1.0]), {"path": "out.txt"}, r"end in .html or .png"),
    ((["a"], [1.0]), {"limit": -1}, r"Received: limit=-1"),
])
def test_tokens_errors(args, kwargs, match):
    with pytest.raises(gp.GradprobeError, match=match):
        gp.plot.tokens(*args, **kwargs)


def test_save_maps_renders_1d_sequence_maps(tmp_path):
    keras.utils.set_random_seed(1)
    inp = keras.Input((40, 2))
    h = keras.layers.Conv1D(4, 5, activation="relu", name="conv")(inp)
    h = keras.layers.MaxPooling1D(4)(h)
    out = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(2, 40, 2)).astype("float32")
    sal = np.asarray(gp.saliency(model, x, 1))
    sal = sal.sum(-1) if sal.ndim == 3 else sal
    cam = np.asarray(gp.grad_cam(model, x, 1, layer="conv"))
    assert sal.shape == (2, 40) and cam.shape == (2, 40)
    coarse = cam[:, ::4]  # a map at a coarser resolution is stretched to the signal
    path = gp.plot.save_maps(tmp_path / "seq.png", x,
                             {"saliency": sal, "Grad-CAM": cam, "coarse": coarse})
    img = mpimg.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 300
    single = gp.plot.save_maps(tmp_path / "one.png", x[..., 0], sal)
    assert mpimg.imread(single).ndim == 3


# ------------------------------------------------------------------ keras-hub models
try:
    import keras_hub
except ImportError:  # the toy-model tests above still run
    keras_hub = None
needs_hub = pytest.mark.skipif(keras_hub is None, reason="keras-hub is not installed")
TOKENS = np.array([[1, 3, 4, 5, 6, 0, 0], [1, 10, 11, 12, 13, 14, 2]], "int32")
PAD = (TOKENS != 0).astype("int32")
LAST = [4, 6]


def _gpt2():
    keras.utils.set_random_seed(5)
    bb = keras_hub.models.GPT2Backbone(vocabulary_size=len(VOCAB), num_layers=1, num_heads=2,
                                       hidden_dim=8, intermediate_dim=16, dropout=0.0,
                                       max_sequence_length=8)
    return keras_hub.models.GPT2CausalLM(backbone=bb, preprocessor=None)


def _llama():
    keras.utils.set_random_seed(6)
    bb = keras_hub.models.LlamaBackbone(vocabulary_size=len(VOCAB), num_layers=1,
                                        num_query_heads=2, num_key_value_heads=1, hidden_dim=8,
                                        intermediate_dim=16)
    return keras_hub.models.LlamaCausalLM(backbone=bb, preprocessor=None)


def _after_embedding(bb, emb, mask):
    """The backbone's forward pass from its token embedding's output (hand-written)."""
    if isinstance(bb, keras_hub.models.GPT2Backbone):
        x = bb.embeddings_add((emb, bb.position_embedding(emb)))
        x = bb.embeddings_dropout(x, training=False)
    else:
        x = emb
    for layer in bb.transformer_layers:
        x = layer(x, decoder_padding_mask=mask)
    return bb.layer_norm(x)


@pytest.mark.slow
@needs_hub
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_next_token_log_prob_at_the_last_real_token(build):
    lm = build()
    bb = lm.backbone
    x = {"token_ids": TOKENS, "padding_mask": PAD}
    spec = gp.at("last", "predicted", mask=x["padding_mask"], log_prob=True)
    kernel = bb.transformer_layers[0].trainable_weights[0]
    g = gp.gradients(lm, x, spec, wrt=["token_embedding@0", bb.token_embedding.embeddings,
                                      kernel])

    emb = bb.token_embedding(TOKENS)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(emb)
        logits = bb.token_embedding(_after_embedding(bb, emb, PAD), reverse=True)
        lp = tf.nn.log_softmax(logits, axis=-1)
        rows = tf.stack([lp[i, p] for i, p in enumerate(LAST)])
        nxt = np.argmax(rows.numpy(), axis=-1)
        value = tf.gather(rows, nxt, axis=1, batch_dims=1)
        objective = tf.reduce_sum(value)
    assert_close(logits, lm(x), "float32", what="logits")
    with tf.GradientTape() as wtape:  # the weights, through the model's own call
        lp_model = tf.nn.log_softmax(lm(x, training=False), axis=-1)
        wvalue = tf.reduce_sum(tf.stack([lp_model[i, p, c] for i, (p, c)
                                         in enumerate(zip(LAST, nxt))]))
    want_w = wtape.gradient(wvalue, [bb.token_embedding.embeddings, kernel])

    assert_close(g.target, value, "float32", what="target")
    keys = list(g.keys())
    assert keys[0].endswith("token_embedding@0")
    assert _rel(g[keys[0]], tape.gradient(objective, emb)) <= 1e-5
    assert _rel(g[keys[1]], tf.convert_to_tensor(want_w[0])) <= 1e-5
    assert _rel(g[keys[2]], want_w[1]) <= 1e-5
    # padding after the last real token gets no gradient (causal attention)
    assert np.all(g[keys[0]].numpy()[0, 5:] == 0)


@pytest.mark.slow
@needs_hub
def test_causal_lm_integer_input_error_names_token_ids_and_tied_embedding():
    lm = _gpt2()
    x = {"token_ids": TOKENS, "padding_mask": PAD}
    with pytest.raises(gp.GradprobeError) as e:
        gp.gradients(lm, x, gp.at(-1, 3), wrt="inputs")
    msg = str(e.value)
    assert msg.startswith("'inputs:token_ids' has dtype int32")
    assert "wrt='token_embedding@0'" in msg and "'inputs:padding_mask'" in msg
    with pytest.raises(gp.GradprobeError, match="feeds no embedding layer"):
        gp.gradients(lm, x, gp.at(-1, 3), wrt="inputs:padding_mask")


def _bert():
    keras.utils.set_random_seed(7)
    return keras_hub.models.BertBackbone(vocabulary_size=len(VOCAB), num_layers=1, num_heads=2,
                                         hidden_dim=8, intermediate_dim=16, dropout=0.0,
                                         max_sequence_length=8)


BERT_X = {"token_ids": TOKENS, "segment_ids": np.zeros_like(TOKENS), "padding_mask": PAD}


@pytest.mark.slow
@needs_hub
def test_bert_classifier_integer_input_error_names_token_ids_and_embedding():
    clf = keras_hub.models.BertTextClassifier(backbone=_bert(), num_classes=3,
                                              preprocessor=None)
    with pytest.raises(gp.GradprobeError) as e:
        gp.gradients(clf, BERT_X, 1, wrt="inputs")
    msg = str(e.value)
    assert msg.startswith("'inputs:token_ids' has dtype int32")
    assert "embedding layer 'token_embedding'" in msg and "wrt='token_embedding'" in msg
    assert "@" not in msg.split("wrt=")[1].split(".")[0]


@pytest.mark.slow
@needs_hub
def test_multi_output_backbone_refused_before_any_run(monkeypatch):
    bb = _bert()
    calls = []
    call = type(bb).call
    monkeypatch.setattr(type(bb), "call", lambda self, *a, **k: calls.append(1) or
                        call(self, *a, **k))
    with pytest.raises(gp.GradprobeError) as e:
        gp.gradients(bb, BERT_X, 0, wrt="pooled_dense")
    assert calls == []
    msg = str(e.value)
    assert "'sequence_output', 'pooled_output'" in msg and "output='sequence_output'" in msg
    assert "Received: output=None" in msg


@pytest.mark.slow
@needs_hub
def test_weights_pattern_on_one_output_of_a_multi_output_backbone():
    bb = _bert()
    seq_sum = lambda y: tf.reduce_sum(y[:, :, 0])  # noqa: E731  (one feature: a LayerNorm
    # output summed over all features is constant)
    g = gp.gradients(bb, BERT_X, seq_sum, wrt="*.weights", output="sequence_output")
    assert sorted(g.unconnected) == ["pooled_dense.bias", "pooled_dense.kernel"]
    assert not np.any(g["pooled_dense.kernel"].numpy())
    with tf.GradientTape() as tape:
        value = seq_sum(bb(BERT_X, training=False)["sequence_output"])
    var = bb.get_layer("token_embedding").embeddings
    want = tf.convert_to_tensor(tape.gradient(value, var))
    key = next(k for k in g if k.endswith("token_embedding.embeddings"))
    assert _rel(g[key], want) <= 1e-5
    # a source named explicitly that the output does not depend on still raises
    with pytest.raises(gp.GradprobeError, match="pooled_dense.kernel"):
        gp.gradients(bb, BERT_X, seq_sum, wrt="pooled_dense.kernel", output="sequence_output")


@pytest.mark.slow
@needs_hub
def test_readme_text_section_runs_as_written(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Text and sequence models", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    keras.utils.set_random_seed(0)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    spans = _spans(namespace["html"])
    assert [html.unescape(s[4]) for s in spans] == ["the", "film", "was", "great"]
    assert (tmp_path / "next_token.html").exists()
    assert "pooled_dense.kernel" in capsys.readouterr().out


def _hand_ig_at_token_embedding(clf, x, base_ids, cls, steps):
    """Integrated Gradients at the token embedding's output written by hand: the
    embedding layer's call is replaced (by this test, not gradprobe) with the
    interpolated embeddings, and a tape gives each point's gradient."""
    emb = clf.backbone.get_layer("token_embedding")
    e = emb(x["token_ids"])
    b = emb(base_ids)
    alphas = np.linspace(0.0, 1.0, steps)
    weights = np.full(steps, 1.0 / (steps - 1))
    weights[[0, -1]] *= 0.5
    total, values = 0.0, {}
    original = emb.call
    try:
        for a, w in zip(alphas, weights):
            point = tf.constant(b + a * (e - b))
            emb.call = lambda ids, *args, _p=point, **kw: _p  # noqa: B023
            with tf.GradientTape() as t:
                t.watch(point)
                y = clf(x, training=False)[:, cls]
            total = total + w * t.gradient(y, point).numpy()
            values[float(a)] = y.numpy()
    finally:
        emb.call = original
        emb.__dict__.pop("call", None)
    # the magnitude f(x) - f(b) is computed from (float rounding is relative to it)
    magnitude = np.maximum(np.abs(values[1.0]), np.abs(values[0.0]))
    return (e - b).numpy() * total, values[1.0] - values[0.0], magnitude


@pytest.mark.slow
@needs_hub
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bert_embedding_integrated_gradients_against_hand_written(dtype):
    keras.utils.set_random_seed(7)
    bb = keras_hub.models.BertBackbone(vocabulary_size=len(VOCAB), num_layers=1, num_heads=2,
                                       hidden_dim=8, intermediate_dim=16, dropout=0.0,
                                       max_sequence_length=8, dtype=dtype)
    clf = keras_hub.models.BertTextClassifier(backbone=bb, num_classes=3, preprocessor=None,
                                              dropout=0.0, dtype=dtype)
    # [MASK]-style baseline: real tokens replaced by one id, [CLS]/[SEP]/padding kept.
    keep = np.isin(TOKENS, [0, 1, 2])
    base_ids = np.where(keep, TOKENS, VOCAB.index("bad")).astype("int32")
    steps = 16 if dtype == "float32" else 300
    ig = gp.integrated_gradients(clf, BERT_X, 1, layer="token_embedding", steps=steps,
                                 baseline=dict(BERT_X, token_ids=base_ids), batch_size=64,
                                 progress=False)
    assert ig.layer == f"{bb.name}/token_embedding"
    want, f_diff, magnitude = _hand_ig_at_token_embedding(clf, BERT_X, base_ids, 1, steps)
    # float32: 128 eps of the largest attribution (batched vs one-by-one kernels, 16 steps);
    # float64: 1e-9 of it (float64 end to end; far below a wrong step or weight, O(1)).
    tol = {"rtol": None} if dtype == "float32" else {"rtol": 1e-9}
    assert_close(ig, want, dtype, 128, what="IG", **tol)
    assert np.all(np.asarray(ig)[keep] == 0.0)  # kept tokens: same embedding, no attribution
    # The completeness gap sum(IG) - (f(x) - f(b)) is a difference of values of the size of
    # f(x), f(b) and the attributions: its rounding error is relative to those, not to itself.
    delta, want_sum = np.asarray(ig.delta), want.reshape(2, -1).sum(1)
    scale = max(magnitude.max(), np.abs(want).reshape(2, -1).sum(1).max())
    assert_close(delta, want_sum - f_diff, dtype, 32, scale=scale, what="IG delta", **tol)
    if dtype == "float64":  # completeness at 300 steps: |delta| < 1% of |f(x) - f(b)|
        assert np.all(np.abs(delta) < 0.01 * np.abs(f_diff))
