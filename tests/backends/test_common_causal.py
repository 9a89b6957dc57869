"""Interventions (`gp.intervene`), activation patching (`gp.activation_patching`)
and attribution patching (`gp.attribution_patching`) on TensorFlow, JAX and
PyTorch, written once.

Oracles: a hand-written split of each model (its layers called by hand before
and after the replaced layer) on Functional, nested and shared-layer models, a
subclass with a hand-modified `call` on subclassed ones, and the chain rule
written out in NumPy float64 for the gradients under an intervention. Exact
patching against the same split run by hand, one patched activation at a time;
attribution patching equals it on a model that is linear in every activation.
"""

import keras
import numpy as np
import pytest
from backend_helpers import Twice, arr, assert_sacred_state, sacred_state
from keras import layers

import gradprobe as gp
from gradprobe.core import _patch
from gradprobe.errors import GradprobeError
from tolerance import assert_close


def mlp(dtype="float32"):
    """inputs (4) -> Dense "d1" (5, sigmoid) -> Dense "d2" (5, sigmoid) -> Dense "out" (3)."""
    keras.utils.set_random_seed(11)
    inp = keras.Input((4,), dtype=dtype)
    a = layers.Dense(5, activation="sigmoid", name="d1")(inp)
    b = layers.Dense(5, activation="sigmoid", name="d2")(a)
    return keras.Model(inp, layers.Dense(3, name="out")(b), name="split_me")


def after_d1(model, v):
    """The hand-written second half of `mlp`: the layers after "d1" on `v`."""
    return model.get_layer("out")(model.get_layer("d2")(v))


def weights(model):
    """The kernels and biases of `mlp`, as float64 NumPy arrays."""
    return [(arr(model.get_layer(n).kernel).astype(np.float64),
             arr(model.get_layer(n).bias).astype(np.float64)) for n in ("d1", "d2", "out")]


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def hand_grad_after_d1(model, v, k):
    """d (sum over examples of class k) / d (the output of "d1") when it is `v`,
    by hand in float64 (the chain rule through "d2" and "out")."""
    (_, _), (w2, b2), (w3, _) = weights(model)
    s = sigmoid(np.asarray(v, np.float64) @ w2 + b2)
    return (w3[:, k] * s * (1 - s)) @ w2.T


def test_values_zero_mean_and_functions_against_a_hand_split():
    model = mlp()
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    before = sacred_state(model)
    out_before = arr(model(x))
    h = arr(model.get_layer("d1")(x))
    v = np.random.default_rng(1).normal(size=(3, 5)).astype("float32")
    cases = {
        "value": (v, v),
        "row": (v[:1], np.broadcast_to(v[:1], (3, 5))),  # broadcast over the batch
        "zero": ("zero", np.zeros((3, 5), "float32")),
        "mean": ("mean", np.broadcast_to(h.mean(axis=0, keepdims=True), (3, 5))),
        "function": (lambda a: 3.0 * a - 1.0, 3.0 * h - 1.0),
    }
    for name, (value, replaced) in cases.items():
        r = gp.intervene(model, x, set={"d1": value})
        assert_close(arr(r.outputs), arr(after_d1(model, replaced)), "float32", what=name)
        assert r.replaced == {"d1": [0]} and r.gradients is None and r.target is None
    assert_sacred_state(model, before, x, out_before)


def test_target_and_gradients_under_an_intervention_against_the_chain_rule_by_hand():
    model = mlp()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 4)).astype("float32")
    v = rng.normal(size=(2, 5)).astype("float32")
    before = sacred_state(model)

    r = gp.intervene(model, x, set={"d1": v}, target=1, wrt=["d1", "d2"])
    assert_close(arr(r.target), arr(after_d1(model, v))[:, 1], "float32", what="target")
    assert_close(arr(r.gradients["d1"]), hand_grad_after_d1(model, v, 1), "float32",
                 what="d target / d d1")
    assert set(r.gradients) == {"d1", "d2"}

    # a function of the activation: the gradient flows through it to the input
    (w1, b1), _, _ = weights(model)
    h = sigmoid(x.astype(np.float64) @ w1 + b1)
    r = gp.intervene(model, x, set={"d1": lambda a: 2.0 * a + 0.5}, target=0, wrt="inputs")
    expected = (hand_grad_after_d1(model, 2.0 * h + 0.5, 0) * 2.0 * h * (1 - h)) @ w1.T
    assert_close(arr(r.gradients["inputs"]), expected, "float32", what="d target / d x")

    # a constant replacement cuts what comes before it: unconnected, never a silent zero
    with pytest.raises(GradprobeError, match="inputs"):
        gp.intervene(model, x, set={"d1": "zero"}, target=0, wrt="inputs")
    r = gp.intervene(model, x, set={"d1": "mean"}, target=0, wrt=["inputs", "d2"],
                     unconnected="zero")
    assert list(r.gradients.unconnected) == ["inputs"]
    assert_sacred_state(model, before)


def test_a_plain_request_after_an_intervention_is_not_affected():
    """The intervened request has a cache entry of its own (JAX and PyTorch keep
    which sources are connected per request)."""
    model = mlp()
    x = np.random.default_rng(3).normal(size=(2, 4)).astype("float32")
    expected = gp.gradients(model, x, 0, ["inputs", "d2"], compile=False)
    gp.intervene(model, x, set={"d1": "zero"}, target=0, wrt=["inputs", "d2"],
                 unconnected="zero")
    for compile in (False, "auto"):
        g = gp.gradients(model, x, 0, ["inputs", "d2"], compile=compile, unconnected="zero")
        assert list(g.unconnected) == []
        assert_close(arr(g["inputs"]), arr(expected["inputs"]), "float32")
        assert np.abs(arr(g["inputs"])).max() > 0


class Sub(keras.Model):
    """A subclassed model; `Patched` below changes one line of its `call`."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.d1 = layers.Dense(5, activation="sigmoid", name="d1")
        self.d2 = layers.Dense(5, activation="sigmoid", name="d2")
        self.out = layers.Dense(3, name="out")

    def call(self, x):
        return self.out(self.d2(self.d1(x)))


class Patched(Sub):
    def call(self, x):
        return self.out(self.d2(self.d1(x) * 0.5 + 1.0))  # the hand-modified line


def test_subclassed_model_against_a_hand_modified_call():
    keras.utils.set_random_seed(4)
    x = np.random.default_rng(4).normal(size=(3, 4)).astype("float32")
    model, patched = Sub(name="sub"), Patched(name="patched")
    model(x), patched(x)
    patched.set_weights(model.get_weights())
    before = sacred_state(model)
    r = gp.intervene(model, x, set={"d1": lambda a: a * 0.5 + 1.0}, target=2,
                     wrt=["inputs", "d2", "d1.kernel"])
    expected = gp.gradients(patched, x, 2, ["inputs", "d2", "d1.kernel"])
    assert_close(arr(r.outputs), arr(patched(x)), "float32")
    for key in ("inputs", "d2", "d1.kernel"):
        assert_close(arr(r.gradients[key]), arr(expected[key]), "float32", what=key)
    assert_sacred_state(model, before)


def test_one_call_of_a_shared_layer_and_nested_paths():
    keras.utils.set_random_seed(5)
    model = Twice()
    x = np.random.default_rng(5).normal(size=(2, 3)).astype("float32")
    model(x)
    before = sacred_state(model)
    shared, head = model.shared, model.head
    v = np.full((2, 3), 0.25, "float32")
    r = gp.intervene(model, x, set={"shared@1": v})
    assert_close(arr(r.outputs), arr(head(v * 2.0)), "float32")
    assert r.replaced == {"shared@1": [1]}
    r = gp.intervene(model, x, set={"shared@0": "zero"})
    assert_close(arr(r.outputs), arr(head(shared(np.zeros((2, 3), "float32")) * 2.0)), "float32")
    r = gp.intervene(model, x, set={"shared": "zero"})  # every call
    assert r.replaced == {"shared": [0, 1]}
    assert_close(arr(r.outputs), np.broadcast_to(arr(head.bias), (2, 2)), "float32")
    with pytest.raises(GradprobeError, match=r"ran 2 time\(s\).*shared@0, shared@1"):
        gp.intervene(model, x, set={"shared@2": "zero"})
    assert_sacred_state(model, before)

    # nested: a layer inside an inner model, by path, by bare name and as an object
    keras.utils.set_random_seed(6)
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(3, name="core")], name="inner")
    outer = keras.Sequential([keras.Input((4,)), inner, layers.Dense(2, name="top")],
                             name="outer")
    xo = np.ones((2, 4), "float32")
    for key in ("inner/core", "core", inner.get_layer("core")):
        r = gp.intervene(outer, xo, set={key: np.ones(3, "float32")})
        assert_close(arr(r.outputs), arr(outer.get_layer("top")(np.ones((2, 3), "float32"))),
                     "float32", what=str(key))


def test_wrong_arguments_are_gradprobe_errors_and_leave_the_model_untouched():
    model = mlp()
    x = np.ones((2, 4), "float32")
    out_before = arr(model(x))
    before = sacred_state(model)
    cases = [
        ({"d1": "zeros"}, {}, r"Expected `set\['d1'\]` to be 'zero', 'mean'.*Received: "),
        ({"d1.kernel": "zero"}, {}, "selects a weight"),
        ({"inputs": "zero"}, {}, "selects the model inputs"),
        ({"dl": "zero"}, {}, r"no layer named 'dl'.*Did you mean"),
        ({"d1": np.ones((2, 7), "float32")}, {}, r"broadcastable to the output of layer 'd1'"),
        ({"d1": lambda a: a[:, :2]}, {}, r"return a tensor of the layer's output shape"),
        ({"d1": None}, {}, r"Received: set\['d1'\]=None"),
        ({"d1": ["a", "b"]}, {}, r"Expected `set\[.d1.\]`"),
        ({}, {}, "non-empty dict"),
        ({"d1": "zero"}, {"wrt": "d2"}, "Expected `target`"),
        ({"d1": "zero"}, {"unconnected": "ignore"}, "unconnected"),
    ]
    for set_, kw, message in cases:
        with pytest.raises(GradprobeError, match=message):
            gp.intervene(model, x, set=set_, **kw)
        assert _patch.active_wrappers() == 0
    # an error inside the user's function, in the middle of the forward pass
    with pytest.raises((ZeroDivisionError, GradprobeError), match="division by zero"):
        gp.intervene(model, x, set={"d2": lambda a: 1 / 0}, target=0, wrt="d1")
    assert_sacred_state(model, before, x, out_before)


# ------------------------------------------------------------------ patching
def linear_sequence():
    """A model linear in every activation: (6 positions, 3 features) -> Dense "h1" (4)
    -> Dense "h2" (4) -> Flatten -> Dense "out" (2)."""
    keras.utils.set_random_seed(8)
    inp = keras.Input((6, 3))
    h = layers.Dense(4, name="h1")(inp)
    h = layers.Dense(4, name="h2")(h)
    return keras.Model(inp, layers.Dense(2, name="out")(layers.Flatten(name="flat")(h)))


def test_exact_patching_against_the_hand_split_and_attribution_patching_on_a_linear_model():
    model = linear_sequence()
    rng = np.random.default_rng(9)
    clean = rng.normal(size=(3, 6, 3)).astype("float32")
    corrupted = rng.normal(size=(3, 6, 3)).astype("float32")
    before = sacred_state(model)
    h1, h2, flat, out = (model.get_layer(n) for n in ("h1", "h2", "flat", "out"))

    def rest(name, a):  # the layers after `name`, by hand
        if name == "h1":
            a = h2(a)
        return arr(out(flat(a)))[:, 1]

    exact = gp.activation_patching(model, clean, corrupted, 1, ["h1", "h2"], positions="all",
                                   batch_size=10)
    assert exact.layers == ["h1", "h2"] and exact.positions == list(range(6))
    assert exact.forward_passes == 2 + 6  # 12 variants, 2 (and the base) x 3 rows per pass
    base = rest("h2", h2(h1(corrupted)))
    clean_acts = {"h1": arr(h1(clean)), "h2": arr(h2(h1(clean)))}
    corr_acts = {"h1": arr(h1(corrupted)), "h2": arr(h2(h1(corrupted)))}
    expected = np.zeros((2, 6, 3))
    for i, name in enumerate(["h1", "h2"]):
        for p in range(6):
            a = corr_acts[name].copy()
            a[:, p] = clean_acts[name][:, p]
            expected[i, p] = rest(name, a) - base
    scale = float(np.abs(arr(model(clean))).max())
    assert_close(exact.per_example, expected, "float32", scale=scale)
    assert_close(exact.effects, expected.mean(axis=2), "float32", scale=scale)
    assert_close(exact.clean, arr(model(clean))[:, 1], "float32")
    assert_close(exact.corrupted, base, "float32")

    estimate = gp.attribution_patching(model, clean, corrupted, 1, ["h1", "h2"],
                                       positions="all")
    assert estimate.method == "attribution" and estimate.backward_passes == 1
    assert_close(estimate.per_example, exact.per_example, "float32", scale=scale)
    agreement = estimate.agreement(exact)
    assert agreement.pearson > 1 - 1e-6 and agreement.max_abs_error <= 1e-5 * scale

    # one pass for the whole sweep gives the same table; whole activations, "noise"
    one = gp.activation_patching(model, clean, corrupted, 1, ["h1", "h2"], positions="all",
                                 batch_size=None)
    assert one.forward_passes == 3
    assert_close(one.per_example, exact.per_example, "float32", scale=scale)
    noise = gp.activation_patching(model, clean, corrupted, 1, "*", direction="noise")
    assert noise.layers == ["h1", "h2", "flat", "out"] and noise.positions == [None]
    # patching a whole activation into the clean run gives exactly the corrupted target
    assert_close(noise.per_example[:, 0], np.broadcast_to(base - exact.clean, (4, 3)),
                 "float32", scale=scale)
    assert_close(noise.recovered, np.ones((4, 1)), "float32", factor=1024)
    noise_estimate = gp.attribution_patching(model, clean, corrupted, 1, "*",
                                             direction="noise")
    assert_close(noise_estimate.effects, noise.effects, "float32", scale=scale)
    assert_sacred_state(model, before)


def test_patching_each_call_of_a_shared_layer_against_the_hand_split():
    keras.utils.set_random_seed(10)
    model = Twice()
    rng = np.random.default_rng(10)
    clean = rng.normal(size=(2, 3)).astype("float32")
    corrupted = rng.normal(size=(2, 3)).astype("float32")
    model(clean)
    shared, head = model.shared, model.head
    exact = gp.activation_patching(model, clean, corrupted, 0, "shared")
    assert exact.layers == ["shared@0", "shared@1"]
    base = arr(head(shared(shared(corrupted)) * 2.0))[:, 0]
    patched0 = arr(head(shared(shared(clean)) * 2.0))[:, 0]  # call 0 from the clean run
    patched1 = arr(head(shared(shared(clean)) * 2.0))[:, 0]  # call 1: its clean output
    c0 = arr(shared(clean))
    patched0 = arr(head(shared(c0) * 2.0))[:, 0]
    assert_close(exact.per_example[:, 0], np.stack([patched0 - base, patched1 - base]),
                 "float32", scale=float(np.abs(base).max()))
    estimate = gp.attribution_patching(model, clean, corrupted, 0, "shared")
    assert estimate.layers == exact.layers and np.isfinite(estimate.effects).all()


def tiny_transformer():
    """Embedding -> MultiHeadAttention block -> Dense over a 5-token vocabulary."""
    keras.utils.set_random_seed(12)
    ids = keras.Input((6,), dtype="int32")
    h = layers.Embedding(5, 8, name="embed")(ids)
    a = layers.MultiHeadAttention(2, 4, name="attn")(h, h, use_causal_mask=True)
    h = layers.LayerNormalization(name="ln")(layers.Add(name="res")([h, a]))
    h = layers.Dense(8, activation="gelu", name="mlp")(h)
    return keras.Model(ids, layers.Dense(5, name="logits")(h))


def test_exact_and_attribution_patching_side_by_side_on_a_tiny_transformer():
    model = tiny_transformer()
    rng = np.random.default_rng(13)
    clean = rng.integers(0, 5, size=(4, 6)).astype("int32")
    corrupted = clean.copy()
    corrupted[:, 1] = (clean[:, 1] + 1) % 5  # one token changed
    before = sacred_state(model)
    target = gp.at(-1, [int(t) for t in clean[:, 0]], log_prob=True)
    chosen = ["embed", "attn", "res", "ln", "mlp", "logits"]
    exact = gp.activation_patching(model, clean, corrupted, target, chosen, positions="all")
    estimate = gp.attribution_patching(model, clean, corrupted, target, chosen,
                                       positions="all")
    assert exact.effects.shape == estimate.effects.shape == (6, 6)
    assert np.isfinite(exact.effects).all() and np.isfinite(estimate.effects).all()
    # sanity that holds exactly: with a causal mask, nothing before the changed token
    # moves; the last layer patched at the last position restores the clean target
    scale = float(np.abs(exact.clean).max())
    assert_close(exact.effects[:, 0], np.zeros(6), "float32", scale=scale)
    assert_close(estimate.effects[:, 0], np.zeros(6), "float32", scale=scale)
    gap = np.mean(exact.clean) - np.mean(exact.corrupted)
    assert_close(exact.effects[-1, -1], gap, "float32", scale=scale)
    lines = []
    estimate.table(print_fn=lines.append, other=exact)
    text = "\n".join(lines)
    assert "attribution" in text and "agreement: pearson" in text and "mlp" in text
    fig = exact.plot()
    assert fig.axes[0].images[0].get_array().shape == (6, 6)
    assert_sacred_state(model, before)


def test_patching_errors():
    model = linear_sequence()
    x = np.ones((2, 6, 3), "float32")
    seq = keras.Sequential([keras.Input((4,)), layers.Dense(2, name="d")])
    cases = [
        (lambda: gp.activation_patching(model, x, np.ones((3, 6, 3), "float32"), 0),
         "Expected `corrupted` to have the structure and shapes"),
        (lambda: gp.activation_patching(model, x, x, 0, "*", positions="all"),
         r"sequence axis.*'flat'"),
        (lambda: gp.activation_patching(model, x, x, 0, "h1", positions=[6]),
         "Expected `positions`"),
        (lambda: gp.activation_patching(model, x, x, 0, "h1", direction="up"),
         "Expected `direction`"),
        (lambda: gp.activation_patching(model, x, x, lambda y: keras.ops.sum(y), "h1"),
         "one value per example"),
        (lambda: gp.attribution_patching(model, x, x, 0, "h1.kernel"), "selects a weight"),
        (lambda: gp.activation_patching(seq, np.ones((2, 4)), np.ones((2, 4)), 0,
                                        batch_size=0), "batch_size"),
    ]
    for call, message in cases:
        with pytest.raises(GradprobeError, match=message):
            call()
        assert _patch.active_wrappers() == 0
    p = gp.activation_patching(model, x, x, 0, "h1")
    q = gp.activation_patching(model, x, x, 0, "h2")
    with pytest.raises(GradprobeError, match="same layers and positions"):
        p.agreement(q)


# ---------------------------------------------------------------- examples
# An indirect-object-style toy task on a GPT-2 from a tiny config: "when Mary and
# John went to the store, John gave a drink to" -> Mary; corrupted: the second
# subject changed to the other name, which makes the other name the answer.
VOCAB = ["<pad>", "Mary", "John", "Tom", "when", "and", "went", "to", "the", "store", "gave",
         "drink"]


def ioi_prompts():
    """Token ids of the clean and corrupted prompts, and each prompt's answer."""
    word = {w: i for i, w in enumerate(VOCAB)}

    def ids(text):
        return [word[w] for w in text.split()]

    clean, corrupted, answers = [], [], []
    for io, s in (("Mary", "John"), ("John", "Tom"), ("Tom", "Mary")):
        clean.append(ids(f"when {io} and {s} went to the store {s} gave drink to"))
        corrupted.append(ids(f"when {io} and {s} went to the store {io} gave drink to"))
        answers.append(word[io])
    return np.array(clean, "int32"), np.array(corrupted, "int32"), answers


@pytest.mark.slow
def test_gpt2_indirect_object_patching_side_by_side():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(VOCAB), num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16, dropout=0.0)
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    clean_ids, corrupted_ids, answers = ioi_prompts()
    mask = np.ones_like(clean_ids, bool)
    clean = {"token_ids": clean_ids, "padding_mask": mask}
    corrupted = {"token_ids": corrupted_ids, "padding_mask": mask}
    before = sacred_state(model)
    target = gp.at(-1, answers)  # the answer's logit at the last position
    chosen = ["embeddings_add", "transformer_layer_0", "transformer_layer_1", "layer_norm"]
    exact = gp.activation_patching(model, clean, corrupted, target, chosen, positions="all")
    estimate = gp.attribution_patching(model, clean, corrupted, target, chosen,
                                       positions="all")
    assert exact.layers == [f"gpt2_backbone/{n}" for n in chosen]
    assert exact.effects.shape == estimate.effects.shape == (4, clean_ids.shape[1])
    assert exact.forward_passes == 3  # the whole sweep: 48 variants x 3 prompts in one pass
    scale = float(np.abs(exact.clean).max())
    changed = 8  # the corrupted token: nothing before it can move (causal attention)
    assert_close(exact.effects[:, :changed], np.zeros((4, changed)), "float32", scale=scale)
    assert_close(estimate.effects[:, :changed], np.zeros((4, changed)), "float32",
                 scale=scale)
    # the final layer norm at the last position carries everything the logit reads
    gap = np.mean(exact.clean) - np.mean(exact.corrupted)
    assert_close(exact.effects[-1, -1], gap, "float32", scale=scale)
    agreement = estimate.agreement(exact)
    assert np.isfinite(agreement.pearson)
    lines = []
    estimate.table(print_fn=lines.append, other=exact)
    print("\n".join(lines))  # reported side by side (see the README), not asserted
    assert_sacred_state(model, before)


def test_cnn_patching_of_an_occluded_image():
    keras.utils.set_random_seed(14)
    model = keras.Sequential([
        keras.Input((8, 8, 1)), layers.Conv2D(3, 3, activation="relu", name="conv"),
        layers.MaxPooling2D(name="pool"), layers.Flatten(name="flat"),
        layers.Dense(4, name="out")])
    clean = np.random.default_rng(14).random((2, 8, 8, 1)).astype("float32")
    corrupted = clean.copy()
    corrupted[:, 3:5, 3:5] = 0.0  # an occluded patch (input rows 3-4)
    exact = gp.activation_patching(model, clean, corrupted, "predicted", "conv",
                                   positions="all")  # per row of the feature maps
    assert exact.positions == list(range(6)) and exact.layers == ["conv"]
    # rows of "conv" whose receptive field misses the patch do not move
    scale = float(np.abs(exact.clean).max())
    assert_close(exact.effects[0, [0, 5]], np.zeros(2), "float32", scale=scale)
    whole = gp.activation_patching(model, clean, corrupted, "predicted", "*")
    assert_close(whole.recovered, np.ones((4, 1)), "float32", factor=1024)
