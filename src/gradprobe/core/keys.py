"""Result keys of a model's input leaves (`"inputs"`, `"inputs:0"`, `"inputs:name"`):
the names under which input gradients, values and validation errors report them."""

from __future__ import annotations

from typing import Any

import keras

from gradprobe.errors import GradprobeError, quoted


def input_keys(inputs: Any) -> list[str]:
    """Result keys of the input leaves: `"inputs"`, or `"inputs:0"`, `"inputs:name"`."""
    if isinstance(inputs, dict):
        return [f"inputs:{k}" for k in sorted(inputs)]
    flat = keras.tree.flatten(inputs)
    if len(flat) == 1 and not isinstance(inputs, (list, tuple)):
        return ["inputs"]
    return [f"inputs:{i}" for i in range(len(flat))]


def input_key(keys: list[str], index: int | str, inputs: Any) -> str:
    key = f"inputs:{index}"
    if key in keys:
        return key
    if keys == ["inputs"] and index == 0:
        return "inputs"
    raise GradprobeError(
        f"'inputs:{index}' does not name a model input; the inputs are {quoted(keys)}."
    )
