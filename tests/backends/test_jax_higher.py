"""gp.hvp, gp.jacobian, gp.gradient_penalty, gp.per_example_norms and the
functional form (gp.functional; gp.Tape refuses) on the JAX backend of Keras 3.

Run with `KERAS_BACKEND=jax python -m pytest tests/backends`. Under any other
backend the module is skipped before `jax` is imported.

Oracles: hand-written `jax.hessian` / `jax.jvp` / `jax.jacrev` / nested
`jax.grad` code of the same model (through `model.stateless_call`, or the
layers after an intermediate value), and float64 central finite differences of
first-order gradients. Models use sigmoid, not tanh (keras.ops.tanh computes in
float32 on JAX, see test_jax.py).
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("JAX backend tests: run with KERAS_BACKEND=jax", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from backend_helpers import Critic, close, conv_mlp, mlp  # noqa: E402
from keras import layers  # noqa: E402

import gradprobe as gp  # noqa: E402
from gradprobe.core import _functional, _patch  # noqa: E402


def _values(model):
    return [v.value for v in model.trainable_variables]


def _score(model, x, k=0):
    """f(weights list) = sum of output k, through stateless_call."""
    return lambda tv: jnp.sum(model.stateless_call(tv, [], x)[0][:, k])


# ------------------------------------------------------------------------ hvp
def test_hvp_weights_activations_inputs_against_jax_hessian(x64):
    model = mlp(2)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 3)))
    rng = np.random.default_rng(3)
    tv = _values(model)
    f = _score(model, x)
    names = [f"{v.path.split('/')[0]}.{v.name}" for v in model.trainable_variables]
    assert names == ["l1.kernel", "l1.bias", "l2.kernel", "l2.bias"]

    v = rng.normal(size=tv[0].shape)
    h = gp.hvp(model, x, 0, "l1.kernel", v)["l1.kernel"]
    H = jax.jit(jax.hessian(lambda w: f([w, *tv[1:]])))(tv[0])
    close(h, jnp.einsum("ijkl,kl->ij", H, v), 1e-10, "l1.kernel")

    vs = {k: rng.normal(size=w.shape) for k, w in zip(names, tv)}
    hs = gp.hvp(model, x, 0, "*.weights", vs)
    assert list(hs) == names
    _, ref = jax.jvp(jax.grad(f), (tv,), ([jnp.asarray(vs[k]) for k in names],))
    for k, r in zip(names, ref):
        close(hs[k], r, 1e-10, k)
    # the list form, in the order of the sources
    hl = gp.hvp(model, x, 0, "*.weights", [vs[k] for k in names])
    close(hl["l2.bias"], ref[3], 1e-10)

    a = model.get_layer("l1")(x)
    va = rng.normal(size=a.shape)
    ha = gp.hvp(model, x, 0, "l1", va)["l1"]
    Ha = jax.hessian(lambda a_: jnp.sum(model.get_layer("l2")(a_)[:, 0]))(a)
    close(ha, jnp.einsum("ijkl,kl->ij", Ha, va), 1e-10, "activation")

    vx = rng.normal(size=x.shape)
    hx = gp.hvp(model, x, 0, "inputs", vx)["inputs"]
    Hx = jax.jit(jax.hessian(lambda xx: jnp.sum(model(xx)[:, 0])))(x)
    close(hx, jnp.einsum("ijkl,kl->ij", Hx, vx), 1e-10, "inputs")

    # Weights and an activation together: the product with the joint Hessian.
    mixed = gp.hvp(model, x, 0, ["l1", "l2.kernel"], {"l1": va, "l2.kernel": vs["l2.kernel"]})

    def joint(a_, k2):
        layer = model.get_layer("l2")
        return jnp.sum(jax.nn.sigmoid(a_ @ k2 + layer.bias.value)[:, 0])

    _, (r_a, r_k) = jax.jvp(jax.grad(joint, argnums=(0, 1)), (a, tv[2]),
                            (jnp.asarray(va), jnp.asarray(vs["l2.kernel"])))
    close(mixed["l1"], r_a, 1e-10, "mixed activation")
    close(mixed["l2.kernel"], r_k, 1e-10, "mixed kernel")
    for w, b in zip(model.trainable_variables, tv):  # the model is untouched
        np.testing.assert_array_equal(np.asarray(w.value), np.asarray(b))
    assert "call" not in vars(model.get_layer("l1")) and _patch.active_wrappers() == 0


def test_hvp_matches_finite_differences_of_gradients(x64):
    model = mlp(4)
    x = np.random.default_rng(4).normal(size=(4, 3))
    k1 = model.get_layer("l1").kernel
    v = np.random.default_rng(5).normal(size=k1.shape)
    target = gp.loss("mse", np.ones((4, 2)))
    base = np.asarray(k1.value).copy()
    k1.assign(base + 0.5)
    before = np.asarray(gp.hvp(model, x, target, "l1.kernel", v)["l1.kernel"])
    traces = _functional.trace_count()
    k1.assign(base)  # the weights are arguments of the compiled product, not constants
    h = np.asarray(gp.hvp(model, x, target, "l1.kernel", v)["l1.kernel"])
    assert _functional.trace_count() == traces  # cached jax.jit: no new trace
    assert not np.allclose(before, h)
    eps = 1e-5
    grads = []
    for sign in (1, -1):
        k1.assign(base + sign * eps * v)
        grads.append(np.asarray(gp.gradients(model, x, gp.loss("mse", np.ones((4, 2))),
                                             "l1.kernel")["l1.kernel"]))
    k1.assign(base)
    close(h, (grads[0] - grads[1]) / (2 * eps), 1e-7, "fd")


def test_hvp_errors_name_the_argument():
    model = mlp()
    x = np.ones((2, 3), "float32")
    with pytest.raises(gp.GradprobeError, match=r"same shape as the gradient of 'l1.kernel'"):
        gp.hvp(model, x, 0, "l1.kernel", np.ones((4, 3)))
    with pytest.raises(gp.GradprobeError, match="dict or a list"):
        gp.hvp(model, x, 0, "l1.weights", np.ones((3, 4)))
    with pytest.raises(gp.GradprobeError, match="has none for .l1.bias."):
        gp.hvp(model, x, 0, "l1.weights", {"l1.kernel": np.ones((3, 4))})
    with pytest.raises(gp.GradprobeError, match="Expected `vector`"):
        gp.hvp(model, x, 0, "l1.kernel", "abc")


# ------------------------------------------------------------------- jacobian
def test_jacobian_matches_per_example_jacrev(x64):
    model = conv_mlp()
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 4, 3)))
    conv, flat, mid = (model.get_layer(n) for n in ("conv", "flat", "mid"))
    c = conv(x)

    def after_conv(ci):  # one example
        return mid(flat(ci[None]))[0]

    J = gp.jacobian(model, x, of="mid", wrt="conv")
    assert J.shape == (3, 6, 3, 5)
    close(J, jax.jit(jax.vmap(jax.jacrev(after_conv)))(c), 1e-12, "conv")
    J = gp.jacobian(model, x, of=mid)
    assert J.shape == (3, 6, 4, 3)
    close(J, jax.jit(jax.vmap(jax.jacrev(lambda xi: mid(flat(conv(xi[None])))[0])))(x), 1e-12,
          "inputs")
    with pytest.raises(gp.GradprobeError, match=r"needs 1,728 bytes.*max_bytes=100"):
        gp.jacobian(model, x, of="mid", max_bytes=100)
    with pytest.raises(gp.GradprobeError, match="look swapped"):
        gp.jacobian(model, x, of="conv", wrt="mid")


# ------------------------------------------------------------ gradient penalty
def test_wgan_gp_inside_jax_grad_matches_nested_jax_grad(x64):
    keras.utils.set_random_seed(7)
    critic = Critic()
    rng = np.random.default_rng(7)
    real, fake = jnp.asarray(rng.normal(size=(6, 4))), jnp.asarray(rng.normal(size=(6, 4)))
    critic(real)
    eps = rng.random(size=(6, 1))
    x_hat = jnp.asarray(eps * real + (1 - eps) * fake)
    variables = critic.trainable_variables
    weights = [v.value for v in variables]

    def loss_fn(ws):
        with keras.StatelessScope(state_mapping=list(zip(variables, ws))):
            norms = gp.gradient_penalty(critic, x_hat, lambda y: y[:, 0])
            w_loss = jnp.mean(critic(fake)) - jnp.mean(critic(real))
        return w_loss + 10.0 * jnp.mean((norms - 1.0) ** 2), norms

    (loss, norms), grads = jax.value_and_grad(loss_fn, has_aux=True)(weights)

    def ref_fn(ws):
        def d(xx):
            return critic.stateless_call(ws, [], xx)[0]

        g = jax.grad(lambda xx: jnp.sum(d(xx)[:, 0]))(x_hat)
        ref_norms = jnp.sqrt(jnp.sum(g ** 2, axis=1))
        return jnp.mean(d(fake)) - jnp.mean(d(real)) + 10.0 * jnp.mean((ref_norms - 1) ** 2), \
            ref_norms

    (ref_loss, ref_norms), ref_grads = jax.value_and_grad(ref_fn, has_aux=True)(weights)
    close(norms, ref_norms, 1e-12, "norms")
    close(loss, ref_loss, 1e-12, "loss")
    for a, b in zip(grads, ref_grads):
        close(a, b, 1e-10, "weight gradient")
    assert any(float(jnp.abs(g).max()) > 0 for g in grads[:2])  # the penalty reaches d1

    # The same penalty written with the functional form, the weights as its variables.
    form = gp.functional(critic, x_hat, lambda y: y[:, 0], ["inputs", "*.weights"])
    keys = [f"{layer.name}.{w.name}" for layer in (critic.d1, critic.d2)
            for w in layer.trainable_weights]
    assert sorted(form.variables) == sorted(keys)

    def penalty(variables):
        g = jax.grad(form.objective)(form.probes, variables, form.inputs)["inputs"]
        return 10.0 * jnp.mean((jnp.sqrt(jnp.sum(g ** 2, axis=1)) - 1.0) ** 2)

    def ref_penalty(ws):
        g = jax.grad(lambda xx: jnp.sum(critic.stateless_call(ws, [], xx)[0][:, 0]))(x_hat)
        return 10.0 * jnp.mean((jnp.sqrt(jnp.sum(g ** 2, axis=1)) - 1.0) ** 2)

    got = jax.grad(penalty)(form.variables)
    for k, r in zip(keys, jax.grad(ref_penalty)(weights)):
        close(got[k], r, 1e-10, f"functional form {k}")
    # the other norms, outside any jax.grad
    g = np.asarray(jax.grad(lambda xx: jnp.sum(critic(xx)[:, 0]))(x_hat))
    close(gp.gradient_penalty(critic, x_hat, lambda y: y[:, 0], norm=1), np.abs(g).sum(1), 1e-12)
    close(gp.gradient_penalty(critic, x_hat, lambda y: y[:, 0], norm="inf"),
          np.abs(g).max(1), 1e-12)
    with pytest.raises(gp.GradprobeError, match="is a weight"):
        gp.gradient_penalty(critic, x_hat, lambda y: y[:, 0], wrt="*.kernel")


# ------------------------------------------------------------ per-example norms
def test_per_example_norms_match_loop_of_jax_grad(x64):
    keras.utils.set_random_seed(5)
    inp = keras.Input((6, 2))
    h = layers.Conv1D(3, 2, activation="sigmoid", name="conv")(inp)
    h = layers.LayerNormalization(name="ln")(h)
    h = layers.Flatten()(h)
    model = keras.Model(inp, layers.Dense(3, name="logits")(h))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(4, 6, 2)))
    labels = np.array([0, 2, 1, 2])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    tv = _values(model)
    one = jax.jit(jax.grad(lambda ws, xi, yi: jnp.sum(loss_fn(yi, model.stateless_call(
        ws, [], xi)[0]))))
    rows = []
    for i in range(4):
        g = one(tv, x[i:i + 1], labels[i:i + 1])
        rows.append([float(jnp.linalg.norm(gi)) for gi in g])
    ref = np.array(rows)
    for method in ("auto", "vectorized"):
        n = gp.per_example_norms(model, x, gp.loss(loss_fn, labels), method=method)
        assert list(n) == ["conv.kernel", "conv.bias", "ln.gamma", "ln.beta",
                           "logits.kernel", "logits.bias"]
        # (1e-6: LayerNormalization's moments compute in float32 on JAX; the loop and
        # the mapped pass round differently)
        for j, k in enumerate(n):
            close(n[k], ref[:, j], 1e-6, f"{method} {k}")
        close(n.total, np.sqrt((ref ** 2).sum(1)), 1e-6)
        assert set(n.method.values()) == {"vmap" if method == "auto" else "jacobian"}
        close(n.target, loss_fn(labels, model(x)), 1e-6)
    with pytest.raises(gp.GradprobeError, match="needs a per-example target"):
        gp.per_example_norms(model, x, lambda y: jnp.sum(y))
    with pytest.raises(gp.GradprobeError, match="weight selectors"):
        gp.per_example_norms(model, x, 0, "conv")
    with pytest.raises(gp.GradprobeError, match="method='ghost'"):
        gp.per_example_norms(model, x, 0, method="ghost")


# -------------------------------------------------------------- functional form
def test_functional_form_first_and_second_order(x64):
    model = mlp(1)
    x = np.random.default_rng(1).normal(size=(4, 3))
    before = [np.array(w) for w in model.get_weights()]
    form = gp.functional(model, x, lambda y: jnp.sum(y ** 2), ["l1", "l2.kernel", "inputs"])
    probes, variables, inputs = form.args
    assert form.keys == ["inputs", "l1", "l2.kernel"]
    assert set(probes) == {"inputs", "l1"} and set(variables) == {"l2.kernel"}
    # First order: what gp.gradients gives.
    g = gp.gradients(model, x, lambda y: jnp.sum(y ** 2), ["l1", "l2.kernel", "inputs"])
    dp, dv = jax.grad(form.objective, argnums=(0, 1))(probes, variables, inputs)
    close(dp["l1"], g["l1"], 1e-12)
    close(dp["inputs"], g["inputs"], 1e-12)
    close(dv["l2.kernel"], g["l2.kernel"], 1e-12)
    objective, aux = form(probes, variables, inputs)
    close(aux["activations"]["l1"], model.get_layer("l1")(jnp.asarray(x)), 1e-12)
    close(aux["outputs"], model(x), 1e-12)
    close(objective, jnp.sum(model(x) ** 2), 1e-12)

    # Second order: d/dW2 of ||d loss / d a1||^2, against hand-written nested jax.grad
    # and against central finite differences in W2.
    def penalty(variables):
        return jnp.sum(jax.grad(form.objective)(probes, variables, inputs)["l1"] ** 2)

    second = jax.grad(penalty)(variables)["l2.kernel"]
    l1, l2 = model.get_layer("l1"), model.get_layer("l2")
    a = l1(jnp.asarray(x))

    def ref(k2):
        rest = lambda a_: jnp.sum(jax.nn.sigmoid(a_ @ k2 + l2.bias.value) ** 2)  # noqa: E731
        return jnp.sum(jax.grad(rest)(a) ** 2)

    close(second, jax.grad(ref)(l2.kernel.value), 1e-12, "nested jax.grad")
    eps, k2 = 1e-6, np.asarray(variables["l2.kernel"])
    fd = np.zeros_like(k2)
    compiled = jax.jit(penalty)
    for idx in np.ndindex(*k2.shape):
        for sign in (1, -1):
            w = k2.copy()
            w[idx] += sign * eps
            fd[idx] += sign * float(compiled({"l2.kernel": jnp.asarray(w)})) / (2 * eps)
    close(second, fd, 1e-7, "finite differences")
    # jit-compatible, and the model is untouched.
    close(jax.jit(jax.grad(penalty))(variables)["l2.kernel"], second, 1e-12)
    for b, w in zip(before, model.get_weights()):
        np.testing.assert_array_equal(b, w)
    assert _patch.active_wrappers() == 0


def test_functional_form_errors_and_tape_refusal():
    model = mlp()
    x = np.ones((2, 3), "float32")
    form = gp.functional(model, x, 0, ["l1", "l1.kernel"])
    probes, variables, inputs = form.args
    with pytest.raises(gp.GradprobeError, match=r"`probes` to be a dict with the keys 'l1'"):
        form({}, variables, inputs)
    with pytest.raises(gp.GradprobeError, match=r"probes\['l1'\] to be shaped \(2, 4\)"):
        form({"l1": jnp.zeros((3, 4))}, variables, inputs)
    with pytest.raises(gp.GradprobeError, match="does not depend on"):
        gp.functional(model, x, 0, ["l2"], output="l1")
    with pytest.raises(gp.GradprobeError, match="gp.functional"):
        gp.Tape(model)
