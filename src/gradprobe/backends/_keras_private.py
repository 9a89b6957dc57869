"""Every use of a private Keras API in gradprobe, in one place.

Keras 3 has no public way to do the few things below; each function says which
private name it relies on (checked against Keras 3.15), so that a Keras upgrade
that moves one breaks here and nowhere else. Nothing outside this module
imports `keras.src` or reads a private attribute of a Keras object (a ruff rule
bans `keras.src` outside `gradprobe/backends/`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import keras


def in_symbolic_scope() -> bool:
    """True while Keras builds a model on symbolic tensors (a layer call there is
    not a real forward pass).

    Relies on `keras.src.backend.common.symbolic_scope.in_symbolic_scope` (the
    global `"symbolic_scope"` attribute that `keras.SymbolicScope` sets).
    """
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope as inside

    return inside()


def get_keras_mask(x: Any) -> Any:
    """The Keras mask attached to tensor `x`, or `None`.

    Relies on `keras.src.backend.common.masking.get_keras_mask`: the mask is the
    tensor's `_keras_mask` attribute, or, for tensors that take no attributes
    (JAX arrays), an entry of a global table keyed by the tensor's id.
    """
    from keras.src.backend.common.masking import get_keras_mask as get

    return get(x)


def set_keras_mask(x: Any, mask: Any) -> None:
    """Attaches the Keras mask `mask` to tensor `x` (the counterpart of
    `get_keras_mask`; relies on `keras.src.backend.common.masking.set_keras_mask`)."""
    from keras.src.backend.common.masking import set_keras_mask as put

    put(x, mask)


def build_shapes(model: Any) -> dict | None:
    """The input shapes a built subclassed model was built with, by argument name
    (`None` if unknown).

    Relies on `Layer._build_shapes_dict`, which Keras 3 fills when `build` runs
    from the first call (used for error messages only).
    """
    return getattr(model, "_build_shapes_dict", None)


def child_layers(layer: Any) -> list[Any]:
    """The layers directly inside `layer` (a model's layers, a wrapper's layer,
    the layers tracked as attributes of a subclassed layer), in tracking order.

    Relies on `Layer._flatten_layers(include_self=False, recursive=False)`, Keras'
    own walk of tracked sublayers (`Layer._layers` before it existed).
    """
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=False))
    return list(getattr(layer, "_layers", []))  # pragma: no cover - older Keras


def structure(model: Any) -> tuple:
    """What changes when a layer or a variable is added to `model`, anywhere in
    it: the ids of its layers (itself included, nested ones too, in Keras' walk
    order) and how many variables they own. About 3x cheaper than
    `len(model.weights)`, which copies and deduplicates every variable list, and
    cheap enough to check on every call of a cached gradient function.

    Relies on `Layer._flatten_layers(include_self=True, recursive=True)` and on
    each layer's own variable lists, `Layer._trainable_variables` and
    `Layer._non_trainable_variables` (what `Layer.weights` concatenates).
    """
    ids, count = [], 0
    for layer in model._flatten_layers(include_self=True, recursive=True):
        ids.append(id(layer))
        count += len(layer._trainable_variables) + len(layer._non_trainable_variables)
    return tuple(ids), count


def keras_history(tensor: Any) -> Any:
    """`(operation, node_index, tensor_index)` that produced a symbolic tensor
    (`None` for other tensors).

    Relies on `KerasTensor._keras_history`, how Keras 3 records the functional
    graph; there is no public way to walk it back.
    """
    return getattr(tensor, "_keras_history", None)


def inbound_nodes(operation: Any) -> list[Any]:
    """The symbolic calls of a layer (or operation), each a `Node` with
    `input_tensors`, in call order.

    Relies on `Operation._inbound_nodes`, the other half of Keras 3's record of
    the functional graph (see `keras_history`).
    """
    return list(getattr(operation, "_inbound_nodes", None) or [])


def name_scope_depth() -> int:
    """How many Keras name scopes are open in this thread.

    Relies on `keras.src.backend.common.global_state`'s thread-local
    `"name_scope_stack"` list, which `keras.name_scope.__enter__` appends to.
    """
    from keras.src.backend.common import global_state

    return len(global_state.get_global_attribute("name_scope_stack", default=[]) or [])


def close_name_scopes_above(depth: int) -> None:
    """Drops the Keras name scopes opened above `depth` and never closed.

    `keras.name_scope.__enter__` pushes onto `"name_scope_stack"` before the
    backend opens its own scope; when TensorFlow rejects the name (a model named
    `"m<script>"` traced by `tf.function`), `__exit__` never runs and every
    variable created later in the thread would be named under that scope.
    Relies on the same thread-local list as `name_scope_depth`.
    """
    from keras.src.backend.common import global_state

    stack = global_state.get_global_attribute("name_scope_stack", default=[]) or []
    del stack[depth:]


# ---------------------------------------------------------------- gp.GradientMonitor
def optimizer_raw_iterations(optimizer: Any) -> Any:
    """The variable counting an optimizer's `apply` calls.

    Relies on `BaseOptimizer._iterations` (keras/src/optimizers/base_optimizer.py),
    the counter `apply` increments once per call, skipped and accumulated steps
    included; the public `iterations` divides it by `gradient_accumulation_steps`.
    """
    return optimizer._iterations


def optimizer_default_variables(optimizer: Any) -> list[Any]:
    """The variables an optimizer's `apply(grads)` updates when called without
    `trainable_variables`.

    Relies on `BaseOptimizer._trainable_variables`, the list `build` stores and
    `apply` falls back to (keras/src/optimizers/base_optimizer.py).
    """
    return optimizer._trainable_variables


def optimizer_update_wrappers(all_reduce: Callable[[Callable], Callable],
                              update: Callable[[Callable], Callable]
                              ) -> dict[str, Callable[[Callable], Callable]]:
    """The wrappers `{method name: wrapper}` (for `gradprobe.core._patch.wrapped_methods`)
    of the two steps of a TensorFlow optimizer's update that the monitor observes.

    Relies on `TFOptimizer._backend_update_step(grads, trainable_variables,
    learning_rate)` calling `self._all_reduce_sum_gradients(grads_and_vars)`
    (keras/src/backend/tensorflow/optimizer.py): the update step all-reduces the
    (clipped, unscaled) gradients, then applies them; both methods are looked up
    on the instance while the train step is traced.

    Args:
        all_reduce: Wraps `_all_reduce_sum_gradients(grads_and_vars)`.
        update: Wraps `_backend_update_step(grads, trainable_variables, learning_rate)`.
    """
    return {"_all_reduce_sum_gradients": all_reduce, "_backend_update_step": update}


def running_callback_list(callback: Any) -> Any:
    """The `keras.callbacks.CallbackList` of the running `fit` that holds
    `callback`, or `None`; called from `callback.on_train_begin`.

    Relies on `CallbackList.on_train_begin` calling each callback's
    `on_train_begin` directly (keras/src/callbacks/callback_list.py), so that a
    frame a few levels up has the list as `self`; and on CPython frames
    (`sys._getframe`). Without it the monitor still works, with a smaller
    guarantee (see `gp.GradientMonitor`).
    """
    frame = sys._getframe(1)
    for _ in range(6):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.callbacks.CallbackList) and any(
                c is callback for c in owner.callbacks):
            return owner
        frame = frame.f_back
    return None


def symbolic_build(model: Any, batch_spec: Any) -> None:
    """Builds `model` (its layers, compiled loss and metrics, optimizer) on
    symbolic tensors shaped like one batch of its training data, as `fit` does
    under a distribution strategy; `batch_spec` is an `(x, y[, sample_weight])`
    structure of objects with `shape` and `dtype` (e.g. `tf.TensorSpec`s).

    Relies on `Trainer._symbolic_build(data_batch=...)`
    (keras/src/trainers/trainer.py), which maps each leaf to a `KerasTensor` of
    its shape and dtype and runs the model with `backend.compute_output_spec`.
    """
    model._symbolic_build(data_batch=batch_spec)


# ---------------------------------------------------------------- gp.GradientMonitor on JAX and PyTorch
def optimizer_update_step_wrapper(update: Callable[[Callable], Callable]
                                  ) -> dict[str, Callable[[Callable], Callable]]:
    """The wrapper `{method name: wrapper}` (for `gradprobe.core._patch.wrapped_methods`)
    of the step of a JAX or PyTorch optimizer's update that receives the
    gradients exactly as they are applied.

    Relies on `BaseOptimizer._backend_apply_gradients` calling
    `self._backend_update_step(grads, trainable_variables, learning_rate)` after
    loss-scale unscaling, gradient accumulation and clipping
    (keras/src/optimizers/base_optimizer.py; `JaxOptimizer` and
    `TorchParallelOptimizer` keep that call), looked up on the instance.
    """
    return {"_backend_update_step": update}


def optimizer_clip_gradients(optimizer: Any, grads: list[Any]) -> list[Any]:
    """`grads` clipped as `optimizer` clips them before its update step
    (`clipnorm`, `clipvalue`, `global_clipnorm`; a pure function of `grads`).

    Relies on `BaseOptimizer._clip_gradients(grads)` (keras/src/optimizers/base_optimizer.py).
    """
    return optimizer._clip_gradients(grads)


def jax_step_function_wrapper(wrap: Callable[[Callable], Callable]
                              ) -> dict[str, Callable[[Callable], Callable]]:
    """The wrapper `{method name: wrapper}` of a JAX model's `_make_function`,
    so that `wrap(step_function)` (the jitted, or eager, train step
    `(state, data) -> (logs, state)`) is what Keras' multi-step loop calls at
    each step.

    Relies on `JAXTrainer.make_train_function` building `jit(self.train_step)`
    (the instance's `train_step`, looked up then) and handing it to
    `self._make_function(step_function)`, which returns the function `fit`
    calls as `train_function(state, iterator)`, running `steps_per_execution`
    steps (keras/src/backend/jax/trainer.py).
    """
    def make(original: Callable) -> Callable:
        def make_function(step_function: Callable, *args: Any, **kwargs: Any) -> Any:
            return original(wrap(step_function), *args, **kwargs)

        return make_function

    return {"_make_function": make}


def callback_model(callback: Any) -> Any:
    """The model a Keras callback is attached to, without syncing JAX state.

    Relies on `Callback._model` (set by `set_model`): the public `model` property
    (keras/src/callbacks/callback.py) copies a JAX model's training state back
    into its variables at each read, which a per-step hook must not cause.
    """
    return getattr(callback, "_model", None)


def jax_variable_value(variable: Any) -> Any:
    """A Keras variable's value on JAX, or `None` while `fit` holds the model's
    state outside its variables.

    Relies on `KerasVariable._value`, which `JAXTrainer._purge_model_variables`
    sets to `None` during `fit` (keras/src/backend/jax/trainer.py).
    """
    return variable._value
