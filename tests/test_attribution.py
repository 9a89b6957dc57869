"""Attribution maps against the published formulas written by hand with
tf.GradientTape, completeness of Integrated Gradients, and a sanity check
after Adebayo et al. (2018)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp
from oracle import assert_close
from tolerance import F32


def _functional_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((10, 10, 3))
    h = layers.Conv2D(6, 3, activation="relu", name="conv1")(inp)
    h = layers.Conv2D(8, 3, activation="relu", name="conv2")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(inp, layers.Dense(4, name="logits")(h))


class SubCNN(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv1 = layers.Conv2D(6, 3, activation="relu", name="conv1")
        self.conv2 = layers.Conv2D(8, 3, activation="relu", name="conv2")
        self.gap = layers.GlobalAveragePooling2D()
        self.head = layers.Dense(4, name="logits")

    def call(self, x):
        return self.head(self.gap(self.conv2(self.conv1(x))))


def _nested_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    b_in = keras.Input((10, 10, 3))
    b = layers.Conv2D(8, 3, activation="relu", name="conv2")(
        layers.Conv2D(6, 3, activation="relu", name="conv1")(b_in))
    backbone = keras.Model(b_in, b, name="backbone")
    inp = keras.Input((10, 10, 3))
    h = layers.GlobalAveragePooling2D()(backbone(inp))
    return keras.Model(inp, layers.Dense(4, name="logits")(h))


def _models():
    keras.utils.set_random_seed(0)
    sub = SubCNN()
    sub(np.zeros((1, 10, 10, 3), "float32"))
    return [("functional", _functional_cnn(), "conv2"), ("subclassed", sub, "conv2"),
            ("nested", _nested_cnn(), "backbone/conv2")]


def _hand_cam(model, x, cls, conv_path, plus_plus):
    """The published formulas, by hand: rerun the forward pass layer by layer."""
    conv1, conv2 = _layer(model, conv_path.replace("conv2", "conv1")), _layer(model, conv_path)
    with tf.GradientTape() as t:
        A = conv2(conv1(x))
        t.watch(A)
        score = model.get_layer("logits")(tf.reduce_mean(A, axis=[1, 2]))[:, cls] \
            if not isinstance(model, SubCNN) else model.head(model.gap(A))[:, cls]
    g = t.gradient(score, A).numpy()
    A = A.numpy()
    if plus_plus:
        g2, g3 = g ** 2, g ** 3
        denom = 2 * g2 + A.sum(axis=(1, 2), keepdims=True) * g3
        alpha = np.where(denom != 0, g2 / np.where(denom != 0, denom, 1), 0)
        w = (alpha * np.maximum(g, 0)).sum(axis=(1, 2), keepdims=True)
    else:
        w = g.mean(axis=(1, 2), keepdims=True)
    cam = np.maximum((w * A).sum(-1), 0)
    lo, hi = cam.min(axis=(1, 2), keepdims=True), cam.max(axis=(1, 2), keepdims=True)
    return np.where(hi > lo, (cam - lo) / np.where(hi > lo, hi - lo, 1), 0)


def _layer(model, path):
    if isinstance(model, SubCNN):
        return getattr(model, path)
    parts = path.split("/")
    layer = model
    for p in parts:
        layer = layer.get_layer(p)
    return layer


@pytest.mark.parametrize("plus_plus", [False, True])
def test_grad_cam_matches_published_formula(plus_plus):
    x = np.random.default_rng(0).random((3, 10, 10, 3)).astype("float32")
    fn = gp.grad_cam_plus_plus if plus_plus else gp.grad_cam
    for name, model, path in _models():
        cam = fn(model, x, 2, layer=path, upsample=False)
        expected = _hand_cam(model, tf.constant(x), 2, path, plus_plus)
        assert cam.shape == (3, 6, 6), name
        assert_close(np.asarray(cam), expected, 1e-5, name)
        assert cam.layer == path
        up = fn(model, x, 2, layer=path)
        assert up.shape == (3, 10, 10) and float(np.max(up)) <= 1.0 and float(np.min(up)) >= 0
        raw = fn(model, x, 2, layer=path, upsample=False, normalize=False)
        assert float(np.max(raw)) > 0


def test_grad_cam_is_per_example_not_batch_averaged():
    model = _functional_cnn()
    x = np.random.default_rng(1).random((4, 10, 10, 3)).astype("float32")
    together = np.asarray(gp.grad_cam(model, x, [0, 1, 2, 3], "conv2", upsample=False))
    for i in range(4):
        # the published formula by hand, on example i alone, for its own class
        alone = _hand_cam(model, tf.constant(x[i:i + 1]), i, "conv2", plus_plus=False)
        assert_close(together[i:i + 1], alone, 1e-5)
    # a batch-averaged implementation would give every example the same weights
    batch_avg = _hand_cam(model, tf.constant(x), 0, "conv2", plus_plus=False)
    assert not np.allclose(together[1:], batch_avg[1:], atol=1e-3)


def test_grad_cam_shared_layer_call_index_and_sequences():
    keras.utils.set_random_seed(2)
    conv = layers.Conv2D(4, 3, padding="same", activation="relu", name="shared_conv")
    inp = keras.Input((8, 8, 3))
    h = conv(inp)
    h2 = conv(layers.Conv2D(3, 1, name="mid")(h))
    model = keras.Model(inp, layers.Dense(2)(layers.GlobalAveragePooling2D()(h2)))
    x = np.random.default_rng(2).random((2, 8, 8, 3)).astype("float32")
    with pytest.raises(gp.GradprobeError, match=r"'shared_conv@0', 'shared_conv@1'"):
        gp.grad_cam(model, x, 0, "shared_conv")
    a = gp.grad_cam(model, x, 0, "shared_conv@1")
    assert a.layer == "shared_conv@1" and a.shape == (2, 8, 8)

    seq_in = keras.Input((20, 3))
    s = layers.Conv1D(5, 3, activation="relu", name="c1")(seq_in)
    seq = keras.Model(seq_in, layers.Dense(2)(layers.GlobalAveragePooling1D()(s)))
    xs = np.random.default_rng(3).random((2, 20, 3)).astype("float32")
    assert gp.grad_cam(seq, xs, 1, "c1").shape == (2, 20)
    with pytest.raises(gp.GradprobeError, match="spatial feature maps"):
        gp.grad_cam(seq, xs, 1, seq.layers[-1].name)


def test_saliency_gradient_x_input_and_smoothgrad():
    model = _functional_cnn()
    x = np.random.default_rng(4).random((3, 10, 10, 3)).astype("float32")
    xt = tf.constant(x)
    with tf.GradientTape() as t:
        t.watch(xt)
        s = tf.reduce_sum(model(xt)[:, 1])
    g = t.gradient(s, xt).numpy()
    sal = gp.saliency(model, x, 1)
    assert sal.shape == (3, 10, 10)
    assert_close(np.asarray(sal), np.abs(g).max(-1), F32)
    assert_close(np.asarray(gp.saliency(model, x, 1, absolute=False, reduce_channels=None)), g, F32)
    assert_close(np.asarray(gp.gradient_x_input(model, x, 1)), g * x, F32)
    sg = gp.smoothgrad(model, x, 1, samples=1, noise=0.0)
    assert_close(np.asarray(sg), np.asarray(sal), F32)
    a = gp.smoothgrad(model, x, 1, samples=6, noise=0.2, seed=3)
    b = gp.smoothgrad(model, x, 1, samples=6, noise=0.2, seed=3, batch_size=5, progress=False)
    assert_close(np.asarray(a), np.asarray(b), 1e-5)
    c = gp.smoothgrad(model, x, 1, samples=6, noise=0.2, seed=4)
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert_close(np.asarray(gp.saliency(model, x, 1, batch_size=2)), np.asarray(sal), F32)
    # SmoothGrad with real noise, against an independent value: a linear model's
    # input gradient is its weight column whatever the noise, so the average is too.
    lin = keras.Sequential([keras.Input((4, 4, 2)), layers.Flatten(), layers.Dense(3)])
    w = lin.layers[-1].kernel.numpy()[:, 2].reshape(4, 4, 2)
    xl = np.random.default_rng(5).random((2, 4, 4, 2)).astype("float32")
    sg_lin = gp.smoothgrad(lin, xl, 2, samples=7, noise=0.5, seed=1)
    assert_close(np.asarray(sg_lin), np.broadcast_to(np.abs(w).max(-1), (2, 4, 4)), F32)
    # Tabular and sequence inputs.
    tab = keras.Sequential([keras.Input((5,)), layers.Dense(3)])
    assert gp.saliency(tab, np.ones((2, 5), "float32"), 0).shape == (2, 5)


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_integrated_gradients_completeness(method, float64):
    keras.utils.set_random_seed(5)
    inp = keras.Input((8, 8, 2))
    h = layers.Conv2D(4, 3, activation="tanh", name="conv")(inp)
    h = layers.Flatten()(h)
    h = layers.Dense(6, activation="softplus", name="fc")(h)
    model = keras.Model(inp, layers.Dense(3, name="out")(h))
    x = np.random.default_rng(5).random((3, 8, 8, 2))
    ig = gp.integrated_gradients(model, x, "predicted", steps=300, method=method, batch_size=256)
    f_x = ig.target.numpy()
    f_b = gp.gradients(model, np.zeros_like(x), ig_classes(model, x), "inputs").target.numpy()
    assert np.all(np.abs(ig.delta) < 0.01 * np.abs(f_x - f_b)), (ig.delta, f_x - f_b)
    assert ig.shape == x.shape
    layer_ig = gp.integrated_gradients(model, x, "predicted", steps=300, method=method,
                                       layer="fc")
    assert layer_ig.layer == "fc" and layer_ig.shape == (3, 6)
    assert np.all(np.abs(layer_ig.delta) < 0.01 * np.abs(f_x - f_b))
    # Linear model: IG is exact and equals gradient x (input - baseline).
    lin = keras.Sequential([keras.Input((4,)), layers.Dense(2)])
    xl = np.random.default_rng(6).random((2, 4))
    base = np.full((2, 4), 0.3)
    ig = gp.integrated_gradients(lin, xl, 1, baseline=base, steps=2)
    assert_close(np.asarray(ig), (xl - base) * lin.layers[0].kernel.numpy()[:, 1], 1e-12)
    assert np.max(np.abs(ig.delta)) < 1e-12


def ig_classes(model, x):
    return np.argmax(model(x).numpy(), axis=-1)


def _trained_model():
    """A small CNN trained to find a bright square's quadrant (a few seconds)."""
    rng = np.random.default_rng(0)
    n = 512
    x = rng.normal(0, 0.1, size=(n, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 4, size=n)
    for i, c in enumerate(y):
        r, col = (c // 2) * 6 + 1, (c % 2) * 6 + 1
        x[i, r:r + 4, col:col + 4, 0] += 1.0
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12, 12, 1)),
                              layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
                              layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2"),
                              layers.Flatten(), layers.Dense(4, name="logits")])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=8, batch_size=64, verbose=0)
    return model, x[:16], y[:16]


def _rank_corr(a, b):
    ra = np.argsort(np.argsort(a.ravel()))
    rb = np.argsort(np.argsort(b.ravel()))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_sanity_check_weight_randomisation():
    model, x, y = _trained_model()
    assert (np.argmax(model(x), -1) == y).mean() > 0.8
    sal = np.asarray(gp.saliency(model, x, y))
    cam = np.asarray(gp.grad_cam(model, x, y, "conv2"))
    # the trained model's saliency points at the evidence: more weight on the bright
    # square of the example's class than elsewhere, for most examples (Grad-CAM's
    # spatially averaged weights do not localise through a Flatten head; its values
    # are checked against the formula above)
    inside = np.zeros((len(y), 12, 12), bool)
    for i, c in enumerate(y):
        r, col = (c // 2) * 6 + 1, (c % 2) * 6 + 1
        inside[i, r:r + 4, col:col + 4] = True
    hits = [m[box].mean() > 1.3 * m[~box].mean() for m, box in zip(sal, inside)]
    assert np.mean(hits) >= 0.75, np.mean(hits)
    random_model = keras.models.clone_model(model)  # fresh weights, same architecture
    random_model.set_weights([w * 0 + np.random.default_rng(9).normal(0, 0.3, w.shape)
                              for w in model.get_weights()])
    sal_r = np.asarray(gp.saliency(random_model, x, y))
    cam_r = np.asarray(gp.grad_cam(random_model, x, y, "conv2"))
    sal_corr = np.mean([_rank_corr(a, b) for a, b in zip(sal, sal_r)])
    cam_corr = np.mean([_rank_corr(a, b) for a, b in zip(cam, cam_r)])
    assert sal_corr < 0.5 and cam_corr < 0.5, (sal_corr, cam_corr)


def test_plots(tmp_path):
    image = np.random.default_rng(0).random((10, 10, 3))
    heat = np.random.default_rng(1).random((5, 5))
    rgb = gp.plot.overlay(image, heat, alpha=0.4)
    assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8
    assert np.array_equal(gp.plot.overlay(image, heat, alpha=0.0), np.round(image * 255))
    path = gp.plot.save_maps(str(tmp_path / "maps.png"), [image, image], [heat, heat],
                             titles=["a", "b"])
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[2] in (3, 4)
    with pytest.raises(gp.GradprobeError, match="2 images but 1 maps"):
        gp.plot.save_maps(str(tmp_path / "x.png"), [image, image], [heat])


def test_attribution_result_api():
    model = _functional_cnn()
    x = np.random.default_rng(7).random((2, 10, 10, 3)).astype("float32")
    a = gp.saliency(model, x, "predicted")
    assert isinstance(a.values, tf.Tensor) and np.asarray(a).shape == (2, 10, 10)
    assert a.delta is None and a.target.shape == (2,) and len(a) == 2
    assert "saliency" in repr(a)
    with pytest.raises(gp.GradprobeError, match=r"`steps`.*>= 2"):
        gp.integrated_gradients(model, x, 0, steps=1)
    with pytest.raises(gp.GradprobeError, match="reduce_channels"):
        gp.saliency(model, x, 0, reduce_channels="median")
