"""Seed scenario 003 (../shared/seeds/; TensorFlow version in tests/test_seeds.py)
on the JAX backend: the chained gradients go through `gp.functional`, checked
against hand-written `jax.grad` code. The other seeds, the same on JAX and
PyTorch, are in test_common_seeds.py.

Run with `KERAS_BACKEND=jax python -m pytest tests/backends`.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("JAX backend tests: run with KERAS_BACKEND=jax", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from backend_helpers import close, oracle, two_layer  # noqa: E402

import gradprobe as gp  # noqa: E402

B = oracle()  # (its `normal`: the seeds' float32 test data)


# --------------------------------------------------------------------- seed 003
def test_seed003_example1_layer1_output_and_layer2_weights():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    w1, w2 = B.normal(12, (2, 3)), B.normal(34, (3, 2))
    model = two_layer(w1, w2)
    exp_l1, exp_w2 = jax.grad(lambda l1, w: jnp.sum(l1 @ w), argnums=(0, 1))(x @ w1, w2)
    g = gp.gradients(model, x, lambda y: jnp.sum(y), ["layer1", "layer2.kernel"])
    close(g["layer1"], exp_l1, 1e-6)
    close(g["layer2.kernel"], exp_w2, 1e-6)
    # the same through the functional form
    form = gp.functional(model, x, lambda y: jnp.sum(y), ["layer1", "layer2.kernel"])
    dp, dv = jax.grad(form.objective, argnums=(0, 1))(*form.args)
    close(dp["layer1"], exp_l1, 1e-6)
    close(dv["layer2.kernel"], exp_w2, 1e-6)


def test_seed003_gradient_used_in_a_second_loss_through_the_functional_form():
    """Examples 2 and 3 (made shape-consistent, as in tests/test_seeds.py): the
    gradient at layer 1 of loss1 = sum(layer1_output^2) enters loss 2, which is
    differentiated with respect to both weights, with that gradient (a) a
    constant, (b) differentiated through."""
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    w1, w2 = B.normal(56, (2, 3)), B.normal(78, (3, 2))
    model = two_layer(w1, w2)

    def hand_written(w1_, w2_, through):
        def loss1(l1):
            return jnp.sum(l1 ** 2)

        l1 = x @ w1_
        grad1 = jax.grad(loss1)(l1)
        if not through:
            grad1 = jax.lax.stop_gradient(grad1)
        out = l1 @ w2_
        return jnp.sum(out) + jnp.sum(grad1 * out[:, :1])

    form = gp.functional(model, x, lambda y: jnp.sum(y),
                         ["layer1", "layer1.kernel", "layer2.kernel"])
    probes, variables, inputs = form.args

    def loss2(variables, through):
        def loss1(p):
            return jnp.sum(form(p, variables, inputs)[1]["activations"]["layer1"] ** 2)

        grad1 = jax.grad(loss1)(probes)["layer1"]
        if not through:
            grad1 = jax.lax.stop_gradient(grad1)
        out = form(probes, variables, inputs)[1]["outputs"]
        return jnp.sum(out) + jnp.sum(grad1 * out[:, :1])

    results = {}
    for through in (False, True):
        exp = jax.grad(hand_written, argnums=(0, 1))(w1, w2, through)
        got = jax.grad(loss2)(variables, through)
        close(got["layer1.kernel"], exp[0], 1e-5, f"w1 through={through}")
        close(got["layer2.kernel"], exp[1], 1e-5, f"w2 through={through}")
        results[through] = np.asarray(got["layer1.kernel"])
    assert not np.allclose(results[False], results[True])  # the scenario tells them apart

    # Example 3's intent: loss3 = sum(transpose(grad1) @ layer2_output), d loss3 / d w2.
    def hand3(w2_):
        l1 = x @ w1
        return jnp.sum(jax.grad(lambda a: jnp.sum(a ** 2))(l1).T @ (l1 @ w2_))

    def loss3(variables):
        grad1 = jax.grad(lambda p: jnp.sum(
            form(p, variables, inputs)[1]["activations"]["layer1"] ** 2))(probes)["layer1"]
        return jnp.sum(grad1.T @ form(probes, variables, inputs)[1]["outputs"])

    close(jax.grad(loss3)(variables)["layer2.kernel"], jax.grad(hand3)(w2), 1e-5)
