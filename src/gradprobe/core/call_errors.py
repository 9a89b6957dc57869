"""The errors of a model that could not be called or compiled: which layer raised,
its message without Keras' framing, and how the inputs disagree with the model's."""

from __future__ import annotations

import re
from typing import Any

import keras

from gradprobe import backends
from gradprobe.errors import GradprobeError


def call_error(model: Any, inputs: Any, e: BaseException) -> GradprobeError:
    """The error for a model whose own call raised `e` on `inputs`: which layer
    raised and its message, and the expected input shape only when the shapes
    given really disagree with it (raise it `from e`)."""
    layer = _raising_layer(e)
    where = (f"layer {layer.name!r} ({type(layer).__name__}) raised"
             if layer is not None and layer is not model else "its call raised")
    text = f"Model {model.name!r} could not be called on the given inputs " \
           f"({describe_inputs(inputs)}): {where} {type(e).__name__}: {message(e)}"
    mismatch = shape_mismatch(model, inputs)
    if mismatch:
        text += f" {mismatch}"
    return GradprobeError(text)


def _raising_layer(e: BaseException) -> Any:
    """The innermost Keras layer whose `call` was running when `e` was raised."""
    found = None
    tb = e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name in ("call", "tf__call") and isinstance(owner, keras.layers.Layer):
            found = owner
        tb = tb.tb_next
    return found


def shape_mismatch(model: Any, inputs: Any) -> str:
    """A sentence saying how `inputs` disagree with the model's declared inputs,
    or `""` when they agree (or the model declares none)."""
    specs = getattr(model, "inputs", None)
    if not specs:
        return ""
    leaves = keras.tree.flatten(inputs)
    expected = [tuple(s.shape) for s in specs]
    if len(leaves) != len(specs):
        return (f"The model expects {len(specs)} input(s) of shape "
                f"{expected[0] if len(expected) == 1 else expected}; got {len(leaves)}.")
    for i, (leaf, want) in enumerate(zip(leaves, expected)):
        got = backends.static_shape(leaf)
        if len(got) != len(want) or any(w is not None and g is not None and g != w
                                         for g, w in zip(got, want)):
            which = "" if len(leaves) == 1 else f" {i}"
            return f"Input{which} has shape {got}; the model expects input shape {want}."
    return ""


def describe_inputs(inputs: Any) -> str:
    leaves = keras.tree.flatten(inputs)
    parts = [f"shape {backends.static_shape(x)} {backends.dtype_name(x)}" for x in leaves]
    return parts[0] if len(parts) == 1 else "; ".join(parts)


def message(e: BaseException) -> str:
    """The original message; Keras' "Exception encountered when calling ..."
    preamble and argument listing are dropped (the layer is named separately)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # Keras highlights with ANSI codes
    lines = [line.strip() for line in plain.strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Exception encountered when calling"):
        lines = lines[1:]
    kept = []
    for line in lines:
        if line.startswith("Arguments received by"):
            break
        kept.append(line)
    text = " ".join(kept[:6])
    return text if len(text) <= 600 else text[:597] + "..."


def compile_error(model: Any, e: BaseException, tool: str) -> GradprobeError:
    """The error of `compile=True` when `model` cannot be traced by `tool`: what failed,
    and the two ways to run it (the eager fallback of 'auto', or eager on request)."""
    return GradprobeError(
        f"Model {getattr(model, 'name', model)!r} could not be compiled with {tool} "
        f"({type(e).__name__}: {last_line(e)}). Received: compile=True. Pass "
        "compile='auto' (the default: falls back to eager with a warning) or compile=False "
        "to run it eagerly, or make its call traceable (no NumPy conversion or Python "
        "control flow on tensor values).")


def last_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else ""
