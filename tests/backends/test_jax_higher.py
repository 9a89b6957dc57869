"""gp.hvp's compiled product, gp.gradient_penalty inside jax.grad and the
functional form (gp.functional; gp.Tape refuses) on the JAX backend of Keras 3.
gp.hvp, gp.jacobian and gp.per_example_norms, the same on JAX and PyTorch, are
in test_common_higher.py.

Run with `KERAS_BACKEND=jax python -m pytest tests/backends`. Under any other
backend the module is skipped before `jax` is imported.

Oracles: hand-written nested `jax.grad` code of the same model (through
`model.stateless_call`, or the layers after an intermediate value), and float64
central finite differences of first-order gradients. Models use sigmoid, not
tanh (keras.ops.tanh computes in float32 on JAX, see test_jax.py).
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("JAX backend tests: run with KERAS_BACKEND=jax", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from backend_helpers import Critic, close, mlp  # noqa: E402

import gradprobe as gp  # noqa: E402
from gradprobe.core import _patch  # noqa: E402
from gradprobe.core.capture import functional as _functional  # noqa: E402


# ------------------------------------------------------------------------ hvp
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
