"""`gp.gradients`: gradients of a target with respect to layers, weights or inputs.

The public entry points of the capture: `gradients`, a request resolved once for
the attribution methods (`resolve_request`, `Request`), `gradients_at` and
`clear_cache`. What they call is split by concern: `inputs` (`prepare_inputs`),
`plan`, `cache`, `dispatch` (the capture strategy of the backend, in `capture/`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import keras

from gradprobe import backends
from gradprobe.core import _validate, cache, dispatch
from gradprobe.core.capture.per_example import check_method
from gradprobe.core.inputs import batch_size, prepare_inputs
from gradprobe.core.result import Gradients
from gradprobe.core.targets import Target, evaluate, make_target

__all__ = ["gradients", "clear_cache"]

# The name attribution/grad_cam.py imports `prepare_inputs` under (that module is not
# part of this change); the same function, one meaning.
prepare = prepare_inputs


def gradients(
    model: keras.Model,
    inputs: Any,
    target: Any,
    wrt: Any,
    *,
    output: str | int | None = None,
    training: bool = False,
    unconnected: str = "raise",
    compile: bool | str = "auto",
    differentiable: bool = True,
    per_example: bool | str = False,
) -> Gradients:
    """Gradients of a scalar target with respect to layers, weights or inputs.

    The model runs its own forward pass once (no probe model, no rewritten
    `call`): each requested layer's output gets a zero probe added as the layer
    produces it, and one backward pass gives every requested gradient. Works on
    Sequential, Functional and subclassed models, nested models, layers nested
    in custom layers, shared layers (one result per call), multi-input and
    multi-output models. The model is left exactly as it was.

    Args:
        model: A Keras 3 model.
        inputs: Whatever `model(...)` accepts: an array, a tensor, or a
            list/tuple/dict for multi-input models.
        target: The objective, summed over the batch when it is per example:
            an `int` class index (`outputs[:, k]`); a sequence of ints, one class
            per example; `"predicted"` (each example's arg-max class);
            `gp.loss(loss_fn, y_true, sample_weight=None)`; or a callable
            `f(outputs)` returning a scalar or one value per example.
        wrt: One selector or a list: a layer name or path (its activation),
            `"name@i"` (one call of a shared layer), `"name.kernel"` or any
            variable name, `"name.weights"`, `"inputs"`, glob patterns (`"conv*"`,
            `"*"`, `"*.kernel"`), a layer object or a variable object.
        output: For a multi-output model, the output the target is computed
            from, by name or index. A layer name that is not a model output
            computes the target on that layer's activation instead.
        training: Passed to the model (`False`: inference behaviour). Moving
            statistics and random-seed state are not updated either way.
        unconnected: `"raise"` (default) when the target does not depend on a
            source, or `"zero"` to return zeros for it.
        compile: `"auto"` (default) runs a cached `tf.function`, falling back to
            eager execution (with a warning) when the model cannot be traced;
            `True` always compiles; `False` runs eagerly.
        differentiable: When called under an outer `tf.GradientTape`, keep the
            returned gradients differentiable (`True`) or treat them as constants.
        per_example: Return, for weight sources, one gradient per example (a
            leading batch axis). Needs a per-example target. `True` uses the
            fastest correct method (`tf.vectorized_map` over single-example
            passes, or the Jacobian of the per-example targets as the fallback);
            `"vectorized_map"` or `"jacobian"` force one. The result's
            `per_example_method` (key -> method) and `per_example_fallbacks`
            (key -> why the Jacobian was used) report the choice. For norms
            only, `gp.per_example_norms` is much cheaper.

    Returns:
        A `Gradients` mapping from key to gradient (same shape as the source),
        with `.activations`, `.target`, `.outputs`, `.stats()`, `.summary()` and
        `.diagnose()`.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv2d"),
    ...     keras.layers.Flatten(),
    ...     keras.layers.Dense(10, name="dense"),
    ... ])
    >>> x = np.random.default_rng(0).random((2, 8, 8, 1), dtype="float32")
    >>> g = gp.gradients(model, x, target=3, wrt=["conv2d", "dense.kernel"])
    >>> tuple(g["conv2d"].shape)      # same as the conv2d activation
    (2, 6, 6, 4)
    >>> g.summary()
    <BLANKLINE>
    ...gradients by source...
    """
    _validate.model(model)
    options = (output, training, unconnected, compile, differentiable, per_example)
    repeat = cache.repeat_key(inputs, target, wrt, options)
    resolved = cache.repeated(model, repeat)
    if resolved is not None:
        tgt, per_example = resolved
        return dispatch.run(model, inputs, tgt, wrt, output=output, training=training,
                            unconnected=unconnected, compile=compile,
                            differentiable=differentiable, per_example=per_example)
    _validate.choice("unconnected", unconnected, ("raise", "zero"), "what to do with a source "
                     "the target does not depend on")
    _validate.choice("compile", compile, ("auto", True, False))
    for name, value in (("training", training), ("differentiable", differentiable)):
        _validate.flag(name, value)
    _validate.backend_supported("gp.gradients", backends.FUNCTIONAL)
    per_example = check_method(per_example)
    x = prepare_inputs(model, inputs)
    tgt = make_target(target, batch_size(x))
    cache.remember(model, repeat, x is inputs, tgt, per_example)
    return dispatch.run(model, x, tgt, wrt, output=output, training=bool(training),
                        unconnected=unconnected, compile=compile, differentiable=differentiable,
                        per_example=per_example)


@dataclass(frozen=True)
class Request:
    """A request resolved once (`resolve_request`): the model, its inputs prepared on
    this backend, the target made once, `output` and `training`.

    Attribution methods resolve one per public call and send every chunk of
    modified inputs through `gradients(..., rows=...)`, with a view of the same
    target (`Target.take`): nothing is validated, prepared or resolved again.
    """

    model: Any
    x: Any
    target: Target
    output: Any = None
    training: bool = False

    def fixed(self) -> Request:
        """This request with a `"predicted"` target fixed to each example's class
        on its own inputs (one forward pass), so that modified copies of an
        example keep that example's class."""
        if not self.target.predicts:
            return self
        ev = evaluate(self.model, self.x, self.target, output=self.output,
                      training=self.training)
        return dataclasses.replace(self, target=self.target.fixed(ev.selected))

    def gradients(self, wrt: Any, *, x: Any = None, rows: Any = None,
                  unconnected: str = "raise", replacement: Any = None) -> Gradients:
        """`gp.gradients(model, x, target, wrt)` for this request, on `x` (default:
        its own inputs), the target taken at `rows` (one example index per row
        of `x`; default: the whole batch); with `replacement`, `gradients_at`."""
        tgt = self.target if rows is None else self.target.take(rows)
        return dispatch.run(self.model, self.x if x is None else x, tgt, wrt,
                            output=self.output, training=self.training,
                            unconnected=unconnected, replacement=replacement)


def resolve_request(model: Any, inputs: Any, target: Any, *, output: Any = None,
                    training: bool = False) -> Request:
    """A `Request`: the inputs prepared, the model built, the target made
    (`make_target`, the one time for a public call) and `training` checked."""
    _validate.flag("training", training)
    _validate.backend_supported("gp.gradients", backends.FUNCTIONAL)
    x = prepare_inputs(model, inputs)
    return Request(model, x, make_target(target, batch_size(x)), output, bool(training))


def gradients_at(model: keras.Model, inputs: Any, target: Any, layer: Any, values: Any, *,
                 output: Any = None, training: bool = False) -> Gradients:
    """Gradients with respect to `layer`'s activation when that activation is
    replaced by `values` in the forward pass (the layers before it still run on
    `inputs`, whose batch must match `values`). Used by layer Integrated Gradients;
    on every backend.
    """
    return resolve_request(model, inputs, target, output=output,
                           training=training).gradients(layer, replacement=values)


def clear_cache() -> None:
    """Forgets every compiled gradient function (they are rebuilt on demand)."""
    cache.clear()
