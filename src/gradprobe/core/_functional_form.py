"""`gp.functional`: the probed forward pass as a pure function, for JAX (and PyTorch).

JAX has no tape: chained and second-order gradients are compositions of
`jax.grad`, `jax.jvp` and `jax.vmap` over pure functions. `gp.functional`
returns the forward pass gradprobe differentiates internally (the model's own
call, run statelessly, with a zero probe added to each requested layer output
and input, and the requested weights taken from the arguments) as such a
function, with its initial arguments:

    form = gp.functional(model, x, target, wrt=["dense_1", "dense_2.kernel"])
    objective, aux = form(form.probes, form.variables, form.inputs)

The gradient of `objective` with respect to `probes[key]` is the gradient with
respect to that activation (the probes are zeros); with respect to
`variables[key]`, the gradient with respect to that weight. `gp.hvp`,
`gp.jacobian` and `gp.gradient_penalty` are built on it on JAX and PyTorch.

Only `keras.ops`, `keras.tree`, NumPy and `gradprobe.backends` are used here.
"""

from __future__ import annotations

import weakref
from typing import Any

import keras
import numpy as np

from gradprobe import backends
from gradprobe.core import _validate
from gradprobe.core.capture.functional import request_of
from gradprobe.core.capture.functional_steps import refuse_float16
from gradprobe.core.capture.recorder import FunctionalRecorder
from gradprobe.core.inputs import batch_size, check_input_dtypes, prepare_inputs
from gradprobe.core.plan import planned
from gradprobe.core.targets import PositionTarget, make_target
from gradprobe.errors import GradprobeError, quoted

_COMPILED: dict[int, dict] = {}  # id(prepared signature) -> name -> compiled function


class FunctionalForm:
    """The probed forward pass of a model as a pure function (see `gp.functional`).

    Calling it, `form(probes, variables, inputs)`, returns `(objective, aux)`:
    the scalar objective of the target, and a dict with `"target"` (the
    target's value, per example when it is per example), `"outputs"` (the model
    outputs) and `"activations"` (key -> the probed activation or input, as the
    rest of the forward pass consumed it).

    Attributes:
        probes: key -> zeros shaped like each requested activation and input.
        variables: key -> the current value of each requested weight.
        inputs: The inputs, as backend tensors.
        args: `(probes, variables, inputs)`, the initial arguments.
        keys: Every key, in the order of `gp.gradients`.
        kinds: key -> `"activation"`, `"input"` or `"weight"`.
        unconnected: The keys the objective does not depend on (with
            `unconnected="zero"`).
    """

    def __init__(self, model: Any, request: Any, prep: Any, x: Any, args: dict, live: bool,
                 keep: tuple = ()):
        # The cached plan calls the target through a weak proxy: the form holds the
        # user's target (and its `Target`) for as long as it lives.
        self._keep = keep
        self._bk = backends.get()
        self._model = model
        self._request = request
        self._prep = prep
        self._args = args
        self._live = live
        self._objective = objective_fn(request, prep)
        self.keys = list(prep.meta["order"])
        self.kinds = dict(prep.meta["kinds"])
        self.aliases = {k: list(v) for k, v in prep.meta["aliases"].items()}
        self.unconnected = list(prep.unconnected)
        self.inputs = x
        self.probes = {k: keras.ops.zeros(shape, dtype)
                       for k, (shape, dtype) in prep.probe_specs.items()}
        variables = self._all_variables()
        # (outside autograd on PyTorch: the initial values are not the model's parameters)
        self.variables = {k: self._bk.value_of(variables[pos])
                          for k, pos in prep.var_keys.items()}

    @property
    def args(self) -> tuple[dict, dict, Any]:
        return self.probes, self.variables, self.inputs

    def _all_variables(self) -> list:
        return list(self._model.trainable_variables) + list(self._model.non_trainable_variables)

    def _value(self, variable: Any) -> Any:
        # `live`: the value in the backend's autograd graph (a PyTorch parameter,
        # or the value a caller's keras.StatelessScope maps it to under jax.grad).
        return variable.value if self._live else self._bk.value_of(variable)

    def __call__(self, probes: dict, variables: dict, inputs: Any) -> tuple[Any, dict]:
        self._check("probes", probes, self._prep.probe_specs)
        self._check("variables", variables, {k: (tuple(v.shape), None)
                                             for k, v in self.variables.items()})
        trainable, non_trainable = self.values()
        objective, aux = self._objective({"probes": probes, "vars": variables}, trainable,
                                         non_trainable, inputs, self._args)
        return objective, {"target": aux["target"], "outputs": aux["outputs"],
                           "activations": dict(aux["values"])}

    def values(self) -> tuple[list, list]:
        """The current values of the model's trainable and non-trainable variables
        (the arguments of the compiled functions of `cached`)."""
        n_train = len(self._model.trainable_variables)
        values = [self._value(v) for v in self._all_variables()]
        return values[:n_train], values[n_train:]

    def cached(self, name: Any, make: Any) -> Any:
        """`make()` once per request and input signature: a compiled function of
        `gp.hvp` or `gp.jacobian` (built from `objective_fn`, never from the form,
        which holds the model and the target strongly)."""
        prep = self._prep
        with prep.lock:
            # Kept as long as the prepared signature of the cached request lives.
            store = _COMPILED.get(id(prep))
            if store is None:
                store = _COMPILED[id(prep)] = {}
                weakref.finalize(prep, _COMPILED.pop, id(prep), None)
            if name not in store:
                store[name] = make(self._request, prep)
            return store[name]

    def objective(self, probes: dict, variables: dict, inputs: Any) -> Any:
        """The scalar objective alone (for `jax.grad` without `has_aux`)."""
        return self(probes, variables, inputs)[0]

    def _check(self, name: str, given: Any, specs: dict) -> None:
        if not isinstance(given, dict) or set(given) != set(specs):
            have = quoted(given) if isinstance(given, dict) else _validate.shown(given)
            raise GradprobeError(
                f"Expected `{name}` to be a dict with the keys {quoted(specs)} (as "
                f"form.{name}). Received: {name}={have}")
        for k, (shape, _) in specs.items():
            if tuple(given[k].shape) != tuple(shape):
                raise GradprobeError(
                    f"Expected {name}[{k!r}] to be shaped {tuple(shape)} (as form.{name}"
                    f"[{k!r}]). Received: shape {tuple(given[k].shape)}. For inputs of "
                    "another shape, make a new form with gp.functional(model, new_inputs, ...).")

    def __repr__(self) -> str:
        return f"FunctionalForm({self._model.name!r}, keys={self.keys!r})"


def objective_fn(request: Any, prep: Any) -> Any:
    """`(diff, trainable, non_trainable, x, args) -> (objective, aux)`: the
    forward pass of a prepared request, `diff = {"probes": ..., "vars": ...}`
    (`aux["values"]` holds the probed activations). Holds the request (which
    holds the model weakly) and the prepared signature, nothing else."""
    bk = backends.get()
    probe_ids = {id(layer) for layer in request.plan.probe_layers}

    def objective(diff: dict, trainable: list, non_trainable: list, x: Any,
                  args: dict) -> tuple[Any, dict]:
        recorder = FunctionalRecorder(bk, probe_ids, prep.table, diff["probes"])
        return request.forward(prep, diff, trainable, non_trainable, x, args, recorder)

    return objective


def build(model: Any, inputs: Any, target: Any, wrt: Any, *, output: Any = None,
          training: bool = False, unconnected: str = "raise", live: bool = True,
          what: str = "gp.functional") -> FunctionalForm:
    """A `FunctionalForm` from the cached request of `gp.gradients` (validated)."""
    if not backends.is_functional():
        raise GradprobeError(
            f"{what} runs on the JAX and PyTorch backends of Keras (it is how chained and "
            "second-order gradients are written on JAX); on TensorFlow, use gp.Tape or "
            "gp.gradients under a tf.GradientTape. Current backend: "
            f"{keras.backend.backend()!r}.")
    _validate.model(model)
    _validate.choice("unconnected", unconnected, ("raise", "zero"), "what to do with a source "
                     "the target does not depend on")
    _validate.flag("training", training)
    bk = backends.get()
    x = prepare_inputs(model, inputs)
    tgt = make_target(target, batch_size(x))
    if isinstance(tgt, PositionTarget):
        raise GradprobeError(
            f"target=gp.at(...) is not supported by {what} yet; use an int class, a sequence "
            "of ints, 'predicted', gp.loss(...) or a callable that picks the position itself.")
    entry = planned(model, wrt, tgt, output, bool(training), unconnected, False)
    check_input_dtypes(model, x, entry.plan)
    # (every time: gp.gradients may have made this request already, loss-scaled)
    refuse_float16(model, entry.plan, bk.NAME, what)
    request = request_of(entry, model)
    prep = request.prepared_for(bk, model, x, tgt.args)
    return FunctionalForm(model, request, prep, x, tgt.args, live, keep=(target, tgt))


def functional(model: keras.Model, inputs: Any, target: Any, wrt: Any = "*", *,
               output: Any = None, training: bool = False,
               unconnected: str = "raise") -> FunctionalForm:
    """The probed forward pass of `model` as a pure function of
    `(probes, variables, inputs)`, for chained and second-order gradients on JAX.

    JAX has no tape (`gp.Tape` is for TensorFlow and PyTorch); instead,
    compose this function with `jax.grad`, `jax.jvp`, `jax.vmap` and `jax.jit`.
    Calling the form, `form(probes, variables, inputs)`, runs the model's own
    call statelessly with `probes[key]` (zeros) added to each requested
    activation and input, and `variables[key]` standing for each requested
    weight; it returns `(objective, aux)`, where `objective` is the target's
    scalar objective (as `gp.gradients` differentiates it) and `aux` holds
    `"target"`, `"outputs"` and `"activations"` (key -> the probed value).
    So `jax.grad(form.objective, argnums=(0, 1))(*form.args)` gives what
    `gp.gradients(model, x, target, wrt)` gives, and any function of the
    gradients (a penalty on a layer's gradient, a product with a vector) can be
    differentiated again. The model's other variables are read when the form is
    called (under `jax.jit`, when it is traced). The model is never modified.

    On PyTorch the same form works with `torch.autograd.grad` (the probes are
    zero tensors; pass copies with `requires_grad_()`); there, `gp.Tape` is the
    more direct tool.

    Args:
        model: A Keras 3 model.
        inputs: Inputs whose shapes fix the probes' shapes (a form is for one
            input signature).
        target: As in `gp.gradients` (an int class, a sequence of ints,
            `"predicted"`, `gp.loss(...)` or a callable); its fixed arguments
            (labels, classes) are part of the function.
        wrt: Selectors as in `gp.gradients` (default `"*"`, every leaf layer):
            activations and inputs become `probes`, weights `variables`.
        output: As in `gp.gradients`.
        training: Passed to the model.
        unconnected: `"raise"` (default) or `"zero"`, as in `gp.gradients`.

    Returns:
        A `FunctionalForm`: callable, with `.probes`, `.variables`, `.inputs`,
        `.args` (the three together), `.objective(...)` (the scalar alone),
        `.keys` and `.kinds`.

    Example (JAX):

    >>> import jax
    >>> import jax.numpy as jnp
    >>> model = keras.Sequential([keras.Input((4,)),
    ...                           keras.layers.Dense(8, activation="tanh", name="dense"),
    ...                           keras.layers.Dense(2, name="dense_1")])
    >>> x, y = np.ones((3, 4), "float32"), np.zeros((3, 2), "float32")
    >>> form = gp.functional(model, x, gp.loss("mse", y), wrt=["dense", "dense_1.kernel"])
    >>> probes, variables, inputs = form.args
    >>> def penalised(variables):
    ...     # the gradient at layer "dense", differentiated again (second order)
    ...     g = jax.grad(form.objective)(probes, variables, inputs)["dense"]
    ...     return form.objective(probes, variables, inputs) + jnp.sum(g ** 2)
    >>> jax.grad(penalised)(variables)["dense_1.kernel"].shape
    (8, 2)
    """
    return build(model, inputs, target, wrt, output=output, training=training,
                 unconnected=unconnected, live=True)


def split(form: FunctionalForm) -> dict:
    """`{"probes": ..., "vars": ...}`: the differentiable arguments as one tree."""
    return {"probes": dict(form.probes), "vars": dict(form.variables)}


def like(name: str, value: Any, ref: Any, what: str) -> Any:
    """`value` as a backend tensor with `ref`'s shape and dtype (real values only):
    `_validate.like` for the functional backends."""
    if isinstance(value, keras.Variable):
        value = value.value
    if keras.ops.is_tensor(value):
        dtype = keras.backend.standardize_dtype(value.dtype)
        if not (keras.backend.is_float_dtype(dtype) or keras.backend.is_int_dtype(dtype)):
            raise _validate.fail(name, value, f"a real-valued tensor shaped like {what} "
                                              f"{tuple(ref.shape)}.")
        shape = tuple(value.shape)
    else:
        value = _validate.numeric_array(name, value, f"a tensor shaped like {what}")
        shape = value.shape
    if tuple(shape) != tuple(ref.shape):
        raise _validate.fail(name, _shown(value),
                             f"a tensor of the same shape as {what}, {tuple(ref.shape)}.")
    return keras.ops.cast(keras.ops.convert_to_tensor(value), ref.dtype)


def _shown(value: Any) -> Any:
    """A stand-in that `_validate.shown` describes by shape and dtype (it knows
    NumPy and TensorFlow arrays)."""
    if keras.ops.is_tensor(value):
        return np.empty(tuple(value.shape), keras.backend.standardize_dtype(value.dtype))
    return value
