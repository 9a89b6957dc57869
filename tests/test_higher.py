"""gp.Tape, higher-order gradients, HVPs, Jacobians, per-example gradients and norms,
against float64 oracles: explicit Hessians, hand-written batch_jacobian, finite
differences of first-order gradients, and Python loops over single examples."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradprobe as gp
from catalog import ScaleShift
from oracle import assert_close
from tolerance import F32


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((3,))
    h = layers.Dense(4, activation="tanh", name="l1")(inp)
    return keras.Model(inp, layers.Dense(2, activation="tanh", name="l2")(h))


# ------------------------------------------------------------------------ Tape
def test_tape_activation_is_differentiable_and_structures(float64):
    model = _mlp()
    x = tf.constant(np.random.default_rng(0).normal(size=(5, 3)))
    with gp.Tape(model, watch=["l1", "inputs"], persistent=True) as tape:
        y = model(x)
        a1 = tape.activation("l1")
        loss = tf.reduce_sum(y) + tf.reduce_sum(a1 ** 2)
    l1, l2 = model.get_layer("l1"), model.get_layer("l2")
    with tf.GradientTape(persistent=True) as t:
        t.watch(x)
        h = l1(x)
        t.watch(h)
        ref_loss = tf.reduce_sum(l2(h)) + tf.reduce_sum(h ** 2)
    assert_close(loss, ref_loss, 1e-12)
    g = tape.gradient(loss, ["l1", "l2.kernel", "inputs", l1.kernel])
    assert len(g) == 4
    assert_close(g[0], t.gradient(ref_loss, h), 1e-10)
    assert_close(g[1], t.gradient(ref_loss, l2.kernel.value), 1e-10)
    assert_close(g[2], t.gradient(ref_loss, x), 1e-10)
    assert_close(g[3], t.gradient(ref_loss, l1.kernel.value), 1e-10)
    d = tape.gradient(loss, {"w": "l2.weights", "a": l1})
    assert set(d) == {"w", "a"} and set(d["w"]) == {"l2.kernel", "l2.bias"}
    assert_close(tape.gradient(loss, a1), g[0], 1e-12)  # a plain tensor works too
    assert "call" not in vars(l1) and "call" not in vars(model)


def test_tape_shared_calls_and_errors():
    model = _mlp()
    x = np.ones((2, 3), "float32")
    with gp.Tape(model, watch="l1") as tape:
        y1 = model(x)
        y2 = model(2 * x)
        loss = tf.reduce_sum(y1 * y2)
    assert tape.keys() == ["l1@0", "l1@1"]
    with pytest.raises(gp.GradprobeError, match="2 captured values"):
        tape.activation("l1")
    g = tape.gradient(loss, "l1")
    assert set(g) == {"l1@0", "l1@1"}
    with pytest.raises(gp.GradprobeError, match="not persistent"):
        tape.gradient(loss, "l1@0")

    with gp.Tape(model, watch="l1", persistent=True) as tape:
        model(x)
    # Both computed after the block, where nothing is recorded (seed 003's third example).
    on_activation = tf.reduce_sum(tape.activation("l1") * 2.0)
    inside_none = tf.reduce_sum(model(x))
    for outside in (on_activation, inside_none):
        with pytest.raises(gp.GradprobeError, match="computed outside the `with gp.Tape"):
            tape.gradient(outside, "l1")
    with pytest.raises(gp.GradprobeError, match="not watched by this tape"):
        tape.gradient(inside_none, "l2")
    with pytest.raises(gp.GradprobeError, match="before the tape has recorded"):
        gp.Tape(model).gradient(inside_none, "l1")


def test_nested_tapes_second_order_matches_fd_of_first_order(float64):
    """d/dW2 of ||d loss / d a1||^2: the gradient at layer 1 used in a second
    loss, differentiated through, against finite differences in W2."""
    model = _mlp(1)
    x = tf.constant(np.random.default_rng(1).normal(size=(4, 3)))
    k2 = model.get_layer("l2").kernel

    def inner_norm():
        with gp.Tape(model, watch="l1") as inner:
            loss = tf.reduce_sum(model(x) ** 2)
        return tf.reduce_sum(inner.gradient(loss, "l1") ** 2)

    with gp.Tape(model, watch=[]) as outer:
        penalty = inner_norm()
    second = outer.gradient(penalty, k2).numpy()

    eps = 1e-6
    fd = np.zeros_like(second)
    base = k2.numpy().copy()
    for idx in np.ndindex(*second.shape):
        for sign in (1, -1):
            w = base.copy()
            w[idx] += sign * eps
            k2.assign(w)
            fd[idx] += sign * float(inner_norm()) / (2 * eps)
    k2.assign(base)
    assert_close(second, fd, 1e-6)

    # The same through gp.gradients under an outer tape, compiled.
    with tf.GradientTape() as t:
        g = gp.gradients(model, x, lambda y: tf.reduce_sum(y ** 2), "l1")
        pen = tf.reduce_sum(g["l1"] ** 2)
    assert_close(t.gradient(pen, k2.value), second, 1e-9)
    with tf.GradientTape() as t:
        g = gp.gradients(model, x, lambda y: tf.reduce_sum(y ** 2), "l1", differentiable=False)
        pen = tf.reduce_sum(g["l1"] ** 2)
    assert t.gradient(pen, k2.value) is None


# ------------------------------------------------------------------- seed 003
def test_seed003_examples_with_gp_tape():
    input_tensor = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    w1 = tf.random.stateless_normal((2, 3), seed=(1, 2))
    w2 = tf.random.stateless_normal((3, 2), seed=(3, 4))
    inp = keras.Input((2,))
    model = keras.Model(inp, layers.Dense(2, use_bias=False, name="layer2")(
        layers.Dense(3, use_bias=False, name="layer1")(inp)))
    model.get_layer("layer1").kernel.assign(w1)
    model.get_layer("layer2").kernel.assign(w2)
    k2 = model.get_layer("layer2").kernel

    # Example 1: gradient w.r.t. layer 1's output and layer 2's weights.
    with gp.Tape(model, watch="layer1") as tape:
        loss = tf.reduce_sum(model(input_tensor))
    g_l1, g_w2 = tape.gradient(loss, ["layer1", "layer2.kernel"])
    assert_close(g_l1, tf.ones((2, 2)) @ tf.transpose(w2), F32)
    assert_close(g_w2, tf.transpose(input_tensor @ w1) @ tf.ones((2, 2)), F32)

    # Examples 2/3 (consistent shapes): grad1 = d(sum l1^2)/d l1 = 2 l1, used in
    # loss2 = sum(l2) + sum(grad1^T l2_out); (a) as a constant, (b) differentiated through.
    l1 = input_tensor @ w1
    with tf.GradientTape(persistent=True) as ref:
        ref.watch(w2)
        out = l1 @ w2
        loss_a = tf.reduce_sum(out) + tf.reduce_sum(tf.transpose(2 * l1) @ out)
    expected_a = ref.gradient(loss_a, w2)
    for differentiable in (False, True):
        with gp.Tape(model, watch="layer1") as outer:
            with gp.Tape(model, watch="layer1") as inner:
                model(input_tensor)
                loss1 = tf.reduce_sum(inner.activation("layer1") ** 2)
            grad1 = inner.gradient(loss1, "layer1", differentiable=differentiable)
            out = model(input_tensor)
            loss2 = tf.reduce_sum(out) + tf.reduce_sum(tf.transpose(grad1) @ out)
        got = outer.gradient(loss2, k2)
        # grad1 = 2 * layer1 output does not depend on W2 either way here, so (a) = (b).
        assert_close(got, expected_a, 1e-5)


# ------------------------------------------------------------------- hvp, jac
def test_hvp_weights_and_activations_match_explicit_hessian(float64):
    model = _mlp(2)
    x = np.random.default_rng(2).normal(size=(5, 3))
    k1 = model.get_layer("l1").kernel
    rng = np.random.default_rng(3)
    v = rng.normal(size=k1.shape)
    h = gp.hvp(model, x, 0, "l1.kernel", v)["l1.kernel"]
    with tf.GradientTape() as t2:
        with tf.GradientTape() as t1:
            s = tf.reduce_sum(model(x)[:, 0])
        g = t1.gradient(s, k1.value)
    H = t2.jacobian(g, k1.value).numpy()
    assert_close(h, np.einsum("ijkl,kl->ij", H, v), 1e-10)

    keys = list(gp.gradients(model, x, 0, "*.weights"))
    vs = {k: rng.normal(size=gp.gradients(model, x, 0, k)[k].shape) for k in keys}
    hs = gp.hvp(model, x, 0, "*.weights", vs)
    variables = [model.get_layer(k.split(".")[0]).weights[0 if k.endswith("kernel") else 1]
                 for k in keys]
    with tf.GradientTape(persistent=True) as t2:
        with tf.GradientTape() as t1:
            s = tf.reduce_sum(model(x)[:, 0])
        gs = t1.gradient(s, [w.value for w in variables])
        dot = tf.add_n([tf.reduce_sum(g_ * vs[k]) for g_, k in zip(gs, keys)])
    for k, w in zip(keys, variables):
        assert_close(hs[k], t2.gradient(dot, w.value), 1e-10, k)

    a = model.get_layer("l1")(tf.constant(x))
    va = rng.normal(size=a.shape)
    ha = gp.hvp(model, x, 0, "l1", va)["l1"]
    with tf.GradientTape() as t2:
        t2.watch(a)
        with tf.GradientTape() as t1:
            t1.watch(a)
            s = tf.reduce_sum(model.get_layer("l2")(a)[:, 0])
        g = t1.gradient(s, a)
    H = t2.jacobian(g, a).numpy()
    assert_close(ha, np.einsum("ijkl,kl->ij", H, va), 1e-10)
    with pytest.raises(gp.GradprobeError, match="dict or a list"):
        gp.hvp(model, x, 0, "l1.weights", v)


def test_jacobian_matches_batch_jacobian(float64):
    keras.utils.set_random_seed(4)
    inp = keras.Input((4, 3))
    h = layers.Conv1D(5, 2, activation="tanh", name="conv")(inp)
    h = layers.Flatten(name="flat")(h)
    model = keras.Model(inp, layers.Dense(2, name="out")(layers.Dense(6, activation="tanh",
                                                                       name="mid")(h)))
    x = tf.constant(np.random.default_rng(4).normal(size=(3, 4, 3)))
    with tf.GradientTape(persistent=True) as t:
        t.watch(x)
        c = model.get_layer("conv")(x)
        t.watch(c)
        m = model.get_layer("mid")(model.get_layer("flat")(c))
    J = gp.jacobian(model, x, of="mid", wrt="conv")
    assert J.shape == (3, 6, 3, 5)
    assert_close(J, t.batch_jacobian(m, c), 1e-12)
    J = gp.jacobian(model, x, of="mid")
    assert J.shape == (3, 6, 4, 3)
    assert_close(J, t.batch_jacobian(m, x), 1e-12)
    with pytest.raises(gp.GradprobeError, match=r"needs 1,728 bytes.*max_bytes=100"):
        gp.jacobian(model, x, of="mid", max_bytes=100)


# ------------------------------------------------------------------ per example
def _ghost_model():
    keras.utils.set_random_seed(5)
    inp = keras.Input((6, 6, 2))
    h = layers.Conv2D(3, 3, padding="same", activation="tanh", name="conv2d")(inp)
    h = layers.Conv2D(4, 3, strides=2, activation="relu", name="conv2d_s")(h)
    h = layers.Reshape((4, 4), name="to_seq")(h)
    h = layers.Conv1D(3, 2, dilation_rate=2, activation="tanh", name="conv1d")(h)
    h = layers.LayerNormalization(name="ln", gamma_initializer="random_normal")(h)
    h = layers.EinsumDense("abc,cd->abd", output_shape=(2, 5), bias_axes="d",
                           activation="tanh", name="einsum")(h)
    h = layers.Dense(4, activation="gelu", name="seq_dense")(h)
    h = layers.Flatten(name="flat")(h)
    h = layers.Dense(4, activation="sigmoid", name="dense")(h)
    h = ScaleShift(name="custom")(h)
    return keras.Model(inp, layers.Dense(3, name="logits")(h))


def _loop_norms(model, x, labels, loss_fn):
    variables = model.trainable_weights
    rows = []
    for i in range(x.shape[0]):
        with tf.GradientTape() as t:
            loss = tf.reduce_sum(loss_fn(labels[i:i + 1], model(x[i:i + 1])))
        rows.append([np.linalg.norm(g.numpy()) for g in t.gradient(loss, [v.value for v in variables])])
    return {v.path: np.array(col) for v, col in zip(variables, zip(*rows))}


def test_per_example_norms_match_loop(float64):
    model = _ghost_model()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 6, 6, 2))
    labels = rng.integers(0, 3, size=6)
    loss_fn = keras.losses.sparse_categorical_crossentropy
    ref = _loop_norms(model, x, labels, lambda y, o: loss_fn(y, o, from_logits=True))
    target = gp.loss(lambda y, o: loss_fn(y, o, from_logits=True), labels)
    for method in ("auto", "ghost", "vectorized"):
        n = gp.per_example_norms(model, x, target, method=method)
        assert len(n) == len(ref)
        by_path = {n_key: n[n_key] for n_key in n}
        # Keys named from each layer's own name (variable paths can be uniquified
        # when other models built layers of the same name earlier in the process).
        for layer in model.layers:
            for v in layer.trainable_weights:
                key = f"{layer.name}.{v.name}"
                assert_close(by_path[key], ref[v.path], 1e-9, f"{method} {key}")
        total = np.sqrt(sum(r ** 2 for r in ref.values()))
        assert_close(n.total, total, 1e-9)
        if method != "vectorized":
            ghosted = {k for k, m in n.method.items() if m != "vectorized"}
            assert {k.split(".")[0] for k in ghosted} == {
                "conv2d", "conv2d_s", "conv1d", "ln", "einsum", "seq_dense", "dense", "logits"}
            assert set(n.fallbacks) == {"custom.w", "custom.b"}
            assert "ScaleShift has no ghost-norm identity" in n.fallbacks["custom.w"]
        if method == "ghost":
            assert set(n.method.values()) <= {"ghost", "vectorized"}


def test_per_example_embedding_norms_and_gradients(float64):
    keras.utils.set_random_seed(6)
    inp = keras.Input((5,), dtype="int32")
    h = layers.Embedding(7, 4, name="emb")(inp)
    model = keras.Model(inp, layers.Dense(3, name="out")(layers.Flatten()(h)))
    ids = np.array([[1, 2, 1, 3, 1], [0, 0, 0, 0, 0], [6, 5, 4, 3, 2], [1, 1, 2, 2, 3]], "int32")
    n = gp.per_example_norms(model, ids, [0, 1, 2, 0])
    assert n.method["emb.embeddings"] == "ghost"
    g = gp.gradients(model, ids, [0, 1, 2, 0], ["emb.embeddings", "out.kernel", "emb"],
                     per_example=True)
    assert g["emb.embeddings"].shape == (4, 7, 4)
    assert g["emb"].shape == (4, 5, 4)
    emb, out = model.get_layer("emb"), model.get_layer("out")
    for i in range(4):
        # hand-written tape on example i alone
        with tf.GradientTape() as t:
            score = model(ids[i:i + 1])[:, [0, 1, 2, 0][i]]
        d_emb, d_out = t.gradient(score, [emb.embeddings.value, out.kernel.value])
        d_emb = tf.convert_to_tensor(d_emb)  # IndexedSlices -> dense
        assert_close(g["emb.embeddings"][i], d_emb, 1e-12)
        assert_close(g["out.kernel"][i], d_out, 1e-12)
        assert np.isclose(n["emb.embeddings"][i], np.linalg.norm(d_emb))
    with pytest.raises(gp.GradprobeError, match="needs a per-example target"):
        gp.per_example_norms(model, ids, lambda y: tf.reduce_sum(y))
    with pytest.raises(gp.GradprobeError, match="weight selectors"):
        gp.per_example_norms(model, ids, 0, "emb")


# ------------------------------------------------------------------ WGAN-GP
class Critic(keras.Model):
    def __init__(self):
        super().__init__()
        self.d1 = layers.Dense(8, activation="tanh")
        self.d2 = layers.Dense(1)

    def call(self, x):
        return self.d2(self.d1(x))


def test_wgan_gp_step_matches_nested_tapes(float64):
    keras.utils.set_random_seed(7)
    critic = Critic()
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    critic(real)
    eps = rng.random(size=(6, 1))
    x_hat = tf.constant(eps * real + (1 - eps) * fake)

    with tf.GradientTape() as tape:
        norms = gp.gradient_penalty(critic, x_hat, lambda y: y[:, 0])
        penalty = 10.0 * tf.reduce_mean((norms - 1.0) ** 2)
        loss = tf.reduce_mean(critic(fake)) - tf.reduce_mean(critic(real)) + penalty
    grads = tape.gradient(loss, [v.value for v in critic.trainable_weights])

    with tf.GradientTape() as tape:
        with tf.GradientTape() as inner:
            inner.watch(x_hat)
            d_hat = critic(x_hat)
        g = inner.gradient(d_hat, x_hat)
        ref_norms = tf.sqrt(tf.reduce_sum(g ** 2, axis=1))
        ref_loss = (tf.reduce_mean(critic(fake)) - tf.reduce_mean(critic(real))
                    + 10.0 * tf.reduce_mean((ref_norms - 1.0) ** 2))
    ref_grads = tape.gradient(ref_loss, [v.value for v in critic.trainable_weights])
    assert_close(norms, ref_norms, 1e-12)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, 1e-10)
    opt = keras.optimizers.SGD(0.01)
    opt.apply_gradients(zip(grads, critic.trainable_weights))  # the step runs


def test_per_example_norms_refuses_a_training_flag_that_is_not_a_bool():
    # The request is resolved as gp.gradients resolves it (engine.resolve_request):
    # a string such as 'no' would otherwise count as True.
    model = _ghost_model()
    x = np.zeros((2, 6, 6, 2), "float32")
    with pytest.raises(gp.GradprobeError, match=r"Expected `training` to be True or False\. "
                                                r"Received: training='no'"):
        gp.per_example_norms(model, x, 0, training="no")
