"""The bad-input catalog every backend is held to (issue 24): token ids out of the
embedding's range, negative ids, float ids and float token baselines, a dict with
an extra or a missing key, text on a numeric model, integer inputs to the input
attribution methods and to gp.jacobian. Each case expects a `GradprobeError` that
names the argument, the received value and the fix, with the model's weights
unchanged. Collected by tests/test_input_checks.py (TensorFlow) and
tests/backends/test_common_input_checks.py (JAX, PyTorch): the same cases on
every backend."""

import keras
import numpy as np
import pytest
from backend_helpers import arr, assert_untouched, snapshot

import gradprobe as gp

VOCAB = 10


class TiedEmbedding(keras.layers.Embedding):
    """An Embedding that also computes logits (`reverse=True`), as keras-hub's
    ReversibleEmbedding does: called twice, the lookup is call 0."""

    def call(self, inputs, reverse=False):
        if reverse:
            return keras.ops.matmul(inputs, keras.ops.transpose(self.embeddings))
        return super().call(inputs)

    def compute_output_spec(self, inputs, reverse=False):
        if reverse:
            return keras.KerasTensor((*inputs.shape[:-1], self.input_dim), inputs.dtype)
        return super().compute_output_spec(inputs)


def token_model(tied=False):
    """Inputs 'token_ids' (4 int ids) and 'padding_mask'; an Embedding 'tok' of 10
    ids; with `tied`, the embedding also computes the logits (called twice)."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((4,), dtype="int32", name="token_ids")
    mask = keras.Input((4,), dtype="int32", name="padding_mask")
    emb = (TiedEmbedding if tied else keras.layers.Embedding)(VOCAB, 3, name="tok")
    h = emb(ids) * keras.ops.expand_dims(keras.ops.cast(mask, "float32"), -1)
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = emb(h, reverse=True) if tied else keras.layers.Dense(2, name="head")(h)
    return keras.Model({"token_ids": ids, "padding_mask": mask}, out)


def good():
    return {"token_ids": np.array([[1, 2, 3, 4], [5, 6, 7, 9]], "int32"),
            "padding_mask": np.ones((2, 4), "int32")}


def refused(fn, model, *words):
    """`fn()` raises a GradprobeError naming each of `words`, with a 'Received:' part;
    the model's weights are unchanged."""
    before = snapshot(model)
    with pytest.raises(gp.GradprobeError) as info:
        fn()
    message = str(info.value)
    for w in words:
        assert w in message, (w, message)
    assert_untouched(model, before)
    return message


BAD_IDS = {
    "out_of_vocabulary": (np.array([[1, 2, 3, 10], [5, 6, 7, 9]], "int32"), "10"),
    "negative": (np.array([[1, -2, 3, 4], [5, 6, 7, 9]], "int32"), "-2"),
}


@pytest.mark.parametrize("case", sorted(BAD_IDS))
@pytest.mark.parametrize("as_tensor", [False, True])
def test_token_ids_out_of_range_refused(case, as_tensor):
    model = token_model()
    ids, shown = BAD_IDS[case]
    x = dict(good(), token_ids=keras.ops.convert_to_tensor(ids) if as_tensor else ids)
    msg = refused(lambda: gp.gradients(model, x, 0, "tok"), model,
                  "inputs['token_ids']", "[0, 9]", "'tok'", "input_dim=10", shown,
                  "Received: inputs['token_ids']=")
    assert "unknown-token id" in msg  # the fix


def test_token_ids_checked_by_every_method():
    model = token_model()
    x = dict(good(), token_ids=BAD_IDS["out_of_vocabulary"][0])
    for fn in (lambda: gp.integrated_gradients(model, x, 0, layer="tok", steps=4),
               lambda: gp.saliency(model, x, 0, layer="tok"),
               lambda: gp.smoothgrad(model, x, 0, layer="tok", samples=2)
               if "layer" in gp.smoothgrad.__code__.co_varnames else gp.gradients(
                   model, x, 0, "tok")):
        refused(fn, model, "inputs['token_ids']", "[0, 9]", "Received:")


def test_tied_embedding_named_with_its_lookup_call():
    model = token_model(tied=True)
    x = dict(good(), token_ids=BAD_IDS["out_of_vocabulary"][0])
    refused(lambda: gp.gradients(model, x, 0, "tok@0"), model, "wrt='tok@0'", "[0, 9]")


def test_float_ids_refused_not_truncated():
    model = token_model()
    x = dict(good(), token_ids=np.array([[1.7, 2, 3, 4], [5, 6, 7, 9]]))
    refused(lambda: gp.gradients(model, x, 0, "tok"), model,
            "inputs['token_ids']", "1.7", "integer", "astype('int32')", "Received:")


def test_integral_float_ids_still_accepted():
    model = token_model()
    x = good()
    g_int = gp.gradients(model, x, 0, "tok")["tok"]
    g_float = gp.gradients(model, dict(x, token_ids=x["token_ids"].astype("float32")), 0,
                           "tok")["tok"]
    np.testing.assert_array_equal(arr(g_int), arr(g_float))


@pytest.mark.parametrize("value, shown", [(0.5, "0.5"), (VOCAB, "10"), (-1, "-1")])
def test_token_baseline_checked(value, shown):
    model = token_model()
    x = good()
    base = {"token_ids": np.full((2, 4), value), "padding_mask": None}
    refused(lambda: gp.integrated_gradients(model, x, 0, layer="tok", baseline=base, steps=4),
            model, "baseline['inputs:token_ids']", shown, "Received:")


def test_integer_tensor_baseline_accepted_like_an_integer_array():
    """A baseline given as an integer tensor (keras.ops.zeros(..., "int32")) is the same
    reference as the NumPy integer array (both cast to the inputs' dtype)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    from_tensor = gp.integrated_gradients(model, x, 0, baseline=keras.ops.ones((2, 4), "int32"),
                                          steps=4, progress=False)
    from_array = gp.integrated_gradients(model, x, 0, baseline=np.ones((2, 4), "int32"),
                                         steps=4, progress=False)
    np.testing.assert_array_equal(arr(from_tensor), arr(from_array))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="JAX traces the model even with compile=False (an untraceable "
                           "model is refused whatever compile is); PyTorch runs eagerly")
def test_compile_true_on_an_untraceable_model_names_the_fix():
    class NumpyInside(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2, name="dense")

        def call(self, x):
            return self.d(x) * (float(np.asarray(x).mean()) * 0 + 1.0)  # needs a concrete x

    model = NumpyInside()
    x = np.ones((2, 3), "float32")
    model(x)
    message = refused(lambda: gp.gradients(model, x, 0, "dense", compile=True), model,
                      "could not be compiled", "Received: compile=True", "compile=False",
                      "compile='auto'")
    assert model.name in message
    assert arr(gp.gradients(model, x, 0, "dense", compile=False)["dense"]).shape == (2, 2)


def test_dict_with_an_extra_key_refused():
    model = token_model()
    x = dict(good(), segment_ids=np.zeros((2, 4), "int32"))
    refused(lambda: gp.gradients(model, x, 0, "tok"), model,
            "segment_ids", "no model input is named", "drop it", "Received: inputs=")


def test_dict_with_a_missing_key_refused():
    model = token_model()
    x = {"token_ids": good()["token_ids"]}
    refused(lambda: gp.gradients(model, x, 0, "tok"), model,
            "padding_mask", "lacks", "add one array per input", "Received: inputs=")


def test_text_refused():
    model = token_model()
    x = dict(good(), token_ids=np.array([["a", "b", "c", "d"]] * 2))
    refused(lambda: gp.gradients(model, x, 0, "tok"), model, "strings", "Received: inputs")


@pytest.mark.parametrize("method", ["integrated_gradients", "saliency", "smoothgrad"])
def test_attribution_on_token_ids_names_the_embedding(method):
    model = token_model()
    ids = keras.Input((4,), dtype="int32", name="ids")
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(VOCAB, 3, name="emb")(ids))
    single = keras.Model(ids, keras.layers.Dense(2)(h))
    kwargs = {"steps": 4} if method == "integrated_gradients" else {}
    refused(lambda: getattr(gp, method)(single, good()["token_ids"], 0, **kwargs), single,
            "'emb'", "layer='emb'", "Received: inputs=")
    del model


def test_jacobian_on_token_ids_names_the_embedding():
    ids = keras.Input((4,), dtype="int32", name="ids")
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(VOCAB, 3, name="emb")(ids))
    model = keras.Model(ids, keras.layers.Dense(2, name="head")(h))
    refused(lambda: gp.jacobian(model, good()["token_ids"], of="head", wrt="inputs"), model,
            "integer", "wrt='emb'")


def image_model():
    keras.utils.set_random_seed(1)
    inp = keras.Input((3,))
    return keras.Model(inp, keras.layers.Dense(2, name="head")(inp))


@pytest.mark.parametrize("method, reps", [("integrated_gradients", "steps"),
                                          ("smoothgrad", "samples")])
def test_total_work_refused_up_front(method, reps):
    model = image_model()
    x = np.ones((2, 3), "float32")
    msg = refused(lambda: getattr(gp, method)(model, x, 0, batch_size=64, **{reps: 10**9}),
                  model, f"Received: {reps}=1000000000", "2,000,000,000",
                  f"Pass fewer {reps}", f"at most {gp_cap() // 2:,}")
    assert "batch_size only bounds the memory" in msg


def test_total_work_at_the_cap_is_accepted_by_the_check():
    from gradprobe.core import _validate

    assert _validate.total_work("w", "steps", gp_cap(), 1) == gp_cap()
    with pytest.raises(gp.GradprobeError):
        _validate.total_work("w", "steps", gp_cap() + 1, 1)


def gp_cap():
    from gradprobe.core import _validate

    return _validate.MAX_TOTAL_ROWS


def nested_model():
    keras.utils.set_random_seed(2)
    inner_in = keras.Input((3,))
    inner = keras.Model(inner_in, keras.layers.Dense(4, activation="tanh", name="d1")(inner_in),
                        name="inner")
    inp = keras.Input((3,))
    return keras.Model(inp, keras.layers.Dense(2, name="head")(inner(inp)))


def test_every_view_takes_the_short_name_of_a_nested_layer():
    model = nested_model()
    x = np.ones((2, 3), "float32")
    g = gp.gradients(model, x, 0, ["d1", "d1.kernel"])
    full = next(k for k in g if g.kinds[k] == "activation")
    assert full != "d1" and full.endswith("/d1")
    np.testing.assert_array_equal(arr(g.activations["d1"]), arr(g.activations[full]))
    assert g.kinds["d1"] == "activation" and g.kinds["d1.kernel"] == "weight"
    assert g.variables["d1.kernel"] is g.variables[full + ".kernel"]
    assert "d1" in g.activations and g.activations.get("nope") is None
    with pytest.raises(gp.GradprobeError, match="No activation for 'd1.kernel'"):
        g.activations["d1.kernel"]
    with pytest.raises(KeyError):
        g.activations["nope"]


def _tiny_bert_classifier():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(7)
    bb = keras_hub.models.BertBackbone(vocabulary_size=16, num_layers=1, num_heads=2,
                                       hidden_dim=8, intermediate_dim=16, dropout=0.0,
                                       max_sequence_length=8)
    return keras_hub.models.BertTextClassifier(backbone=bb, num_classes=3, preprocessor=None)


@pytest.mark.parametrize("full", [False, True])
def test_ig_delta_uses_the_path_held_inputs(full):
    """delta == sum(attributions) - (f(x) - f(baseline with the inputs the path holds))."""
    clf = _tiny_bert_classifier()
    tokens = np.array([[1, 3, 4, 5, 6, 0, 0], [1, 10, 11, 12, 13, 14, 2]], "int32")
    x = {"token_ids": tokens, "segment_ids": np.ones_like(tokens),
         "padding_mask": (tokens != 0).astype("int32")}
    base_ids = np.where(tokens != 0, 15, 0).astype("int32")
    base = {"token_ids": base_ids}
    if full:
        base.update(segment_ids=np.zeros_like(tokens), padding_mask=np.zeros_like(tokens))
    before = snapshot(clf)
    ig = gp.integrated_gradients(clf, x, 1, baseline=base, layer="token_embedding", steps=64)
    held = dict(x, token_ids=base_ids)  # what the path holds: only the token ids change
    f_x = arr(clf(x, training=False))[:, 1].astype(np.float64)
    f_b = arr(clf(held, training=False))[:, 1].astype(np.float64)
    sums = arr(ig.values).astype(np.float64).reshape(2, -1).sum(axis=1)
    want = sums - (f_x - f_b)
    scale = float(np.abs(f_x - f_b).max())
    # float32 outputs of about 2e-3; their difference (about 2e-4) is the scale
    np.testing.assert_allclose(arr(ig.delta), want, rtol=0, atol=1e-3 * scale)
    assert np.abs(arr(ig.delta)).max() < 0.1 * scale  # small next to the output difference
    assert_untouched(clf, before)


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
def test_callable_target_with_per_example_constants_points_to_the_fix(method):
    model = image_model()
    x = np.random.default_rng(0).random((2, 3)).astype("float32")
    classes = np.array([1, 0])

    def target(out):  # closes over one class per example: works on a batch of 2 only
        picked = keras.ops.take_along_axis(out, keras.ops.convert_to_tensor(classes[:, None]),
                                           axis=1)
        return picked[:, 0]

    gp.gradients(model, x, target, "inputs")  # fine on the batch itself
    kwargs = {"steps": 8} if method == "integrated_gradients" else {"samples": 4}
    refused(lambda: getattr(gp, method)(model, x, target, **kwargs), model,
            "callable target failed", "gp.at(position, classes)", "any batch size",
            "Received: target=")
