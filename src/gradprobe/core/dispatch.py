"""The dispatch of a resolved request: its cached plan, then the capture
strategy of the backend (the tape on TensorFlow, compiled by `tf.function`; the
functional capture on JAX and PyTorch), per example or not, and the `Gradients`
assembled from the run."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import keras

from gradprobe import backends
from gradprobe.backends import _keras_private
from gradprobe.core.cache import CacheEntry
from gradprobe.core.call_errors import compile_error, last_line
from gradprobe.core.capture import functional, tape
from gradprobe.core.capture import per_example as per_example_capture
from gradprobe.core.capture.assembly import result_of
from gradprobe.core.inputs import check_input_dtypes, placed_inputs
from gradprobe.core.plan import planned
from gradprobe.core.result import Gradients
from gradprobe.core.targets import Target
from gradprobe.errors import GradprobeError


def run(model: Any, x: Any, tgt: Target, wrt: Any, *, output: Any, training: bool,
        unconnected: str = "raise", compile: bool | str = "auto", differentiable: bool = True,
        per_example: bool | str = False, replacement: Any = None) -> Gradients:
    """`gp.gradients` for a request already resolved, on every backend: inputs
    prepared (`prepare_inputs`), target made and arguments validated
    (`engine.resolve_request` or the public function did it). With `replacement`,
    `gradients_at`: the activation of the one layer `wrt` names is replaced by it."""
    replace = replacement is not None
    entry = planned(model, wrt, tgt, output, training, unconnected, per_example, replace)
    check_input_dtypes(model, x, entry.plan)
    if backends.is_functional():
        bk = backends.get()
        args = tgt.args
        if replace:
            args = dict(args, replacement=keras.ops.convert_to_tensor(replacement))
        x, args = placed_inputs(bk, x, args)
        tensors, meta = functional.run_request(entry, model, x, args, compile)
        stop_gradient = bk.stop_gradient
    else:
        args = tgt.args
        if replace:
            args = dict(args, replacement=backends.get().to_tensor(replacement))
        tensors, meta = _execute(model, x, args, entry, compile)
        stop_gradient = backends.get().stop_gradient
    return result_of(tensors, meta, tgt, entry.plan, differentiable, stop_gradient)


def _execute(model: Any, x: Any, args: dict, entry: CacheEntry,
             compile: bool | str) -> tuple[dict, dict]:
    plan = entry.plan
    capture_run = per_example_capture.run if plan.per_example else tape.run
    if not backends.get().executing_eagerly() or compile is False:
        # Inside the user's own tf.function (or eager by request): run inline.
        return capture_run(model, x, args, plan, wrap_errors=True)
    if compile == "auto" and entry.eager_only:
        return capture_run(model, x, args, plan, wrap_errors=True)
    if entry.fn is None:
        entry.fn = tape.compiled(model, plan, functools.partial(capture_run, wrap_errors=False))
    fn = entry.fn
    depth = _keras_private.name_scope_depth()
    try:
        tensors, meta = fn(x, args)
    except Exception as e:
        # A failed trace can leave a Keras name scope open: close it, or every
        # variable the user creates afterwards would be named under it.
        _keras_private.close_name_scopes_above(depth)
        if isinstance(e, GradprobeError):
            raise
        if compile is True:
            raise compile_error(model, e, "tf.function") from e
        tensors, meta = capture_run(model, x, args, plan, wrap_errors=True)
        entry.eager_only = True
        warnings.warn(
            f"gradprobe: model {model.name!r} could not be compiled with tf.function "
            f"({type(e).__name__}: {last_line(e)}); running eagerly from now on. "
            "Pass compile=False to silence this.",
            RuntimeWarning, stacklevel=3)
    return tensors, meta
