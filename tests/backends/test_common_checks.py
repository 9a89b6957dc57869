"""Checks of attribution maps (`gp.deletion_curve`, `gp.insertion_curve`,
`gp.randomization_check`) on TensorFlow, JAX and PyTorch, written once.

Oracles: by-hand loops in NumPy. A linear model `y = w . x` (and a token model
whose class score is a sum of per-token values) gives every point of the
deletion and insertion curves in closed form: the sum of the contributions
still present; the area by a hand trapezoid. Spearman's correlation against
ranks written out by hand, with ties. The randomisation check against a
by-hand cascade (clone, re-initialise the same layers with the same seeds,
recompute the map, correlate).
"""

import keras
import numpy as np
import pytest
from backend_helpers import arr, assert_untouched, cnn, snapshot
from keras import layers

import gradprobe as gp
from gradprobe.attribution.checks import rankdata, reinitialize, spearman
from gradprobe.errors import GradprobeError
from tolerance import assert_close


def linear(w):
    model = keras.Sequential([keras.Input((len(w),)), layers.Dense(1, use_bias=False)])
    model.set_weights([np.asarray(w, "float32")[:, None]])
    return model


def hand_curve(contrib, kind, steps, base_contrib=None):
    """Scores of a linear model (sum of `contrib`) with features removed/inserted
    in order of |contrib| (stable), `steps` chunks; removed features contribute
    `base_contrib`."""
    contrib = np.asarray(contrib, np.float64)
    base_contrib = np.zeros_like(contrib) if base_contrib is None else base_contrib
    f = contrib.size
    order = sorted(range(f), key=lambda i: -abs(contrib[i]))  # (sorted is stable)
    scores = []
    for j in range(steps + 1):
        k = int(np.floor(j * f / steps + 0.5))
        top = set(order[:k])
        if kind == "deletion":
            scores.append(sum(base_contrib[i] if i in top else contrib[i] for i in range(f)))
        else:
            scores.append(sum(contrib[i] if i in top else base_contrib[i] for i in range(f)))
    fr = np.array([np.floor(j * f / steps + 0.5) / f for j in range(steps + 1)])
    auc = sum((scores[j] + scores[j + 1]) / 2 * (fr[j + 1] - fr[j]) for j in range(steps))
    return np.array(scores), auc


@pytest.mark.parametrize("steps", [6, 4, 1])
def test_deletion_and_insertion_against_closed_form_on_a_linear_model(steps):
    rng = np.random.default_rng(0)
    w = np.array([0.5, -2.0, 1.5, 3.0, -0.25, 1.0], "float32")
    x = rng.normal(size=(3, 6)).astype("float32")
    model = linear(w)
    before = snapshot(model)
    maps = gp.gradient_x_input(model, x, 0)
    tol = 64 * np.finfo(np.float32).eps
    for kind, fn in (("deletion", gp.deletion_curve), ("insertion", gp.insertion_curve)):
        curve = fn(model, x, maps, 0, steps=steps, batch_size=5)
        assert curve.scores.shape == (3, steps + 1) and curve.kind == kind
        for i in range(3):
            scores, auc = hand_curve(w * x[i], kind, steps)
            assert_close(curve.scores[i], scores, rtol=tol, scale=np.abs(w * x[i]).sum(),
                         what=f"{kind} scores")
            assert_close(curve.auc[i], auc, rtol=tol, scale=np.abs(w * x[i]).sum(),
                         what=f"{kind} auc")
        clean = curve.scores[:, 0] if kind == "deletion" else curve.scores[:, -1]
        np.testing.assert_array_equal(curve.clean, clean)
        ok = clean > 0
        np.testing.assert_allclose(curve.normalized_auc[ok], curve.auc[ok] / clean[ok])
        assert np.isnan(curve.normalized_auc[~ok]).all()
    assert_untouched(model, before)


def test_ties_keep_the_feature_order_and_a_baseline_array_is_used():
    w = np.array([1.0, 1.0, -1.0, 2.0], "float32")
    x = np.ones((1, 4), "float32")
    model = linear(w)
    attribution = np.array([[1.0, 1.0, 1.0, 2.0]])  # |a|: feature 3, then 0, 1, 2 (ties)
    base = np.array([0.5, 0.0, 2.0, 1.0], "float32")
    curve = gp.deletion_curve(model, x, attribution, 0, steps=4, baseline=base)
    np.testing.assert_array_equal(curve.order[0], [3, 0, 1, 2])
    scores, auc = hand_curve(w * x[0], "deletion", 4, base_contrib=w * base)
    # (the hand order is by |w x| = attribution's order here)
    np.testing.assert_allclose(curve.scores[0], scores, rtol=1e-6)
    np.testing.assert_allclose(curve.auc[0], auc, rtol=1e-6)


def test_images_rank_pixels_by_the_channel_sum_of_abs_map():
    # y = sum over pixels and channels of w * x: a pixel's contribution is known
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3, 3, 2)), layers.Flatten(),
                              layers.Dense(1, use_bias=False)])
    w = np.random.default_rng(1).normal(size=(18,)).astype("float32")
    model.set_weights([w[:, None]])
    x = np.random.default_rng(2).normal(size=(2, 3, 3, 2)).astype("float32")
    maps = np.asarray(gp.gradient_x_input(model, x, 0))  # (2, 3, 3, 2)
    curve = gp.insertion_curve(model, x, maps, 0, steps=3)
    reduced = gp.insertion_curve(model, x, np.abs(maps).sum(-1), 0, steps=3)
    np.testing.assert_array_equal(curve.scores, reduced.scores)
    contrib = (w.reshape(3, 3, 2) * x)  # (2, 3, 3, 2)
    for i in range(2):
        per_pixel = contrib[i].reshape(9, 2)
        score = np.abs(per_pixel).sum(-1)
        order = sorted(range(9), key=lambda p: -score[p])
        expected = [per_pixel[order[:k]].sum() for k in (0, 3, 6, 9)]
        np.testing.assert_allclose(curve.scores[i], expected, rtol=1e-5, atol=1e-5)


def token_model():
    """Class score 1 = sum over positions of v[id] (Embedding(6, 1) -> sum)."""
    inp = keras.Input((5,), dtype="int32")
    emb = layers.Embedding(6, 1, name="emb")(inp)
    out = layers.Dense(2, use_bias=False, name="out")(layers.Flatten()(emb))
    model = keras.Model(inp, out)
    v = np.array([[0.0], [1.0], [-2.0], [3.0], [0.5], [4.0]], "float32")
    model.set_weights([v, np.array([[1.0, 2.0]] * 5, "float32")])  # class 1: 2 * sum v[id]
    return model, v[:, 0]


def test_token_ids_replaced_by_baseline_id():
    model, v = token_model()
    ids = np.array([[1, 2, 3, 4, 5], [5, 5, 0, 2, 1]], "int32")
    # a per-position map shaped (batch, steps) and one (batch, steps, features)
    att = gp.gradient_x_input(model, ids, 1, layer="emb")  # (2, 5, 1)
    for kind, fn in (("deletion", gp.deletion_curve), ("insertion", gp.insertion_curve)):
        curve = fn(model, ids, att, 1, steps=5, baseline_id=0)
        flat = fn(model, ids, np.abs(np.asarray(att))[..., 0], 1, steps=5, baseline_id=0)
        np.testing.assert_array_equal(curve.scores, flat.scores)
        for i in range(2):
            contrib = 2.0 * v[ids[i]]  # pad id 0 has v = 0: a removed token adds 0
            scores, auc = hand_curve(contrib, kind, 5)
            np.testing.assert_allclose(curve.scores[i], scores, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(curve.auc[i], auc, rtol=1e-5, atol=1e-6)


def test_curve_argument_errors():
    model = linear([1.0, 2.0])
    x = np.ones((2, 2), "float32")
    maps = np.ones((2, 2))
    with pytest.raises(GradprobeError, match=r"Expected `steps` to be a positive integer.*"
                                             r"Received: steps=0"):
        gp.deletion_curve(model, x, maps, 0, steps=0)
    with pytest.raises(GradprobeError, match="batch_size"):
        gp.insertion_curve(model, x, maps, 0, batch_size=-1)
    with pytest.raises(GradprobeError, match=r"attribution.*\(2, 3\)"):
        gp.deletion_curve(model, x, np.ones((2, 3)), 0)
    with pytest.raises(GradprobeError, match="finite"):
        gp.deletion_curve(model, x, np.full((2, 2), np.nan), 0)
    with pytest.raises(GradprobeError, match="baseline"):
        gp.deletion_curve(model, x, maps, 0, baseline=np.zeros((3,)))
    with pytest.raises(GradprobeError, match="baseline_id"):
        gp.deletion_curve(model, x, maps, 0, baseline_id=0)
    tokens, _ = token_model()
    ids = np.ones((1, 5), "int32")
    with pytest.raises(GradprobeError, match=r"baseline_id.*Received: baseline_id=None"):
        gp.deletion_curve(tokens, ids, np.ones((1, 5)), 1)
    with pytest.raises(GradprobeError, match=r"token ids in \[0, 5\]"):
        gp.deletion_curve(tokens, ids, np.ones((1, 5)), 1, baseline_id=6)
    with pytest.raises(GradprobeError, match="one value per example"):
        gp.deletion_curve(model, x, maps, lambda out: keras.ops.sum(out))


# ------------------------------------------------------------- randomisation
def test_rankdata_and_spearman_by_hand_with_ties():
    a = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    # sorted: 1, 1, 2, 3, 4, 5, 6, 9 -> the two 1s share ranks 1 and 2: 1.5
    np.testing.assert_array_equal(rankdata(a), [4, 1.5, 5, 1.5, 6, 8, 3, 7])
    np.testing.assert_array_equal(rankdata([2, 2, 2]), [2, 2, 2])
    b = np.array([2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0])
    rb = np.array([3.5, 5, 1.5, 7, 3.5, 7, 1.5, 7])  # ties: (1,2)->1.5, (3,4)->3.5, (6,7,8)->7
    np.testing.assert_array_equal(rankdata(b), rb)
    ra = np.array([4, 1.5, 5, 1.5, 6, 8, 3, 7])
    hand = ((ra - ra.mean()) * (rb - rb.mean())).sum() / np.sqrt(
        ((ra - ra.mean()) ** 2).sum() * ((rb - rb.mean()) ** 2).sum())
    assert abs(spearman(a, b) - hand) < 1e-12
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant map: undefined
    with pytest.raises(GradprobeError, match="same size"):
        spearman([1, 2], [1, 2, 3])


def small_cnn():
    keras.utils.set_random_seed(4)
    return keras.Sequential([
        keras.Input((8, 8, 1)), layers.Conv2D(4, 3, activation="relu", name="conv1"),
        layers.Conv2D(4, 3, activation="relu", name="conv2"),
        layers.Flatten(name="flat"), layers.Dense(3, name="dense")])


def test_randomization_cascade_against_a_hand_cascade_and_model_untouched():
    model = small_cnn()
    before = snapshot(model)
    x = np.random.default_rng(0).random((3, 8, 8, 1)).astype("float32")
    out_before = arr(model(x))
    check = gp.randomization_check(model, x, "predicted", seed=5)
    assert check.layers == ("dense", "conv2", "conv1")  # from the output down
    assert check.spearman.shape == (3, 3) and check.pearson.shape == (3, 3)
    assert_untouched(model, before)
    np.testing.assert_array_equal(arr(model(x)), out_before)

    # by hand: the same cascade on a clone, the maps correlated one by one
    classes = np.argmax(out_before, axis=-1)
    original = np.abs(np.asarray(gp.saliency(model, x, classes))).reshape(3, -1)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for k, name in enumerate(["dense", "conv2", "conv1"]):
        reinitialize(clone.get_layer(name), 5 * 7919 + k)
        maps = np.abs(np.asarray(gp.saliency(clone, x, classes))).reshape(3, -1)
        for i in range(3):
            assert check.spearman[k, i] == pytest.approx(spearman(original[i], maps[i]),
                                                         nan_ok=True)
            assert check.pearson[k, i] == pytest.approx(
                np.corrcoef(original[i], maps[i])[0, 1], rel=1e-6, nan_ok=True)
    # the fully randomised model's maps decorrelate; a rerun with the seed repeats
    assert np.nanmean(check.spearman[-1]) < 0.5
    again = gp.randomization_check(model, x, "predicted", seed=5)
    np.testing.assert_array_equal(again.spearman, check.spearman)
    other = gp.randomization_check(model, x, "predicted", seed=6)
    assert not np.array_equal(other.spearman, check.spearman)
    assert "conv1" in check.summary() and len(check.rows()) == 3
    assert_untouched(model, before)


def test_reinitialize_uses_the_layer_initializers_with_the_seed():
    model = small_cnn()
    model.get_layer("dense").set_weights([np.full((64, 3), 0.5, "float32"),
                                          np.ones(3, "float32")])
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    dense = clone.get_layer("dense")
    reinitialize(dense, 3)
    kernel, bias = (arr(v.value).copy() for v in dense.weights)  # (torch: a view)
    np.testing.assert_array_equal(bias, np.zeros(3))  # bias_initializer="zeros"
    limit = np.sqrt(6 / (64 + 3))  # glorot_uniform
    assert np.abs(kernel).max() <= limit and kernel.std() > limit / 4
    reinitialize(dense, 3)
    np.testing.assert_array_equal(arr(dense.weights[0].value), kernel)  # seeded
    reinitialize(dense, 4)
    assert not np.array_equal(arr(dense.weights[0].value), kernel)
    np.testing.assert_array_equal(arr(model.get_layer("dense").weights[0].value), 0.5)


def test_predicted_target_is_fixed_on_the_clean_inputs():
    model = small_cnn()
    x = np.random.default_rng(5).random((3, 8, 8, 1)).astype("float32")
    classes = np.argmax(arr(model(x)), axis=-1)
    maps = gp.saliency(model, x, "predicted")
    for fn in (gp.deletion_curve, gp.insertion_curve):
        a = fn(model, x, maps, "predicted", steps=4)
        b = fn(model, x, maps, classes, steps=4)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_randomization_layers_method_and_errors():
    model = cnn()
    x = np.random.default_rng(1).random((2, 6, 6, 2)).astype("float32")
    check = gp.randomization_check(model, x, 1, "gradient_x_input", layers=["out"], seed=0)
    assert check.layers == ("out",) and check.method == "gradient_x_input"
    # SmoothGrad gets the seed as its noise seed: every map of the check sees the same noise
    same = gp.randomization_check(model, x, 1, "smoothgrad", layers=["out"], samples=3,
                                  noise=0.5)
    smooth = np.abs(np.asarray(gp.smoothgrad(model, x, 1, samples=3, noise=0.5, seed=0)))
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    reinitialize(clone.get_layer("out"), 0)
    moved = np.abs(np.asarray(gp.smoothgrad(clone, x, 1, samples=3, noise=0.5, seed=0)))
    for i in range(2):
        assert same.spearman[0, i] == pytest.approx(spearman(smooth[i], moved[i]))
    # no re-initialisation of the conv layer: a callable method is used as given
    calls = []

    def method(m, inputs, target, **kw):
        calls.append(m)
        return gp.saliency(m, inputs, target, **kw)

    gp.randomization_check(model, x, 1, method, layers=["conv"])
    assert calls[0] is model and calls[1] is not model and len(calls) == 2
    with pytest.raises(GradprobeError, match="Received: method='lime'"):
        gp.randomization_check(model, x, 1, "lime")
    with pytest.raises(GradprobeError, match="gap.*is not one|'gap' is not one"):
        gp.randomization_check(model, x, 1, layers=["gap"])
    with pytest.raises(GradprobeError, match="Received: layers='out'"):
        gp.randomization_check(model, x, 1, layers="out")
    with pytest.raises(GradprobeError, match="Received: seed=-1"):
        gp.randomization_check(model, x, 1, seed=-1)
