"""The `Attribution` result and the gradient utility every attribution method
stands on (in the manner of Captum's `_utils/gradient.py`): batched, compiled
input or layer gradients for a target resolved once on the original inputs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradprobe.engine import batch_size, ensure_built, gradients, prepare_inputs
from gradprobe.errors import GradprobeError, quoted
from gradprobe.targets import (
    LossTarget,
    PredictedTarget,
    class_scores,
    make_target,
    output_names,
    select_output,
)


class Attribution:
    """Per-example attribution maps from one method.

    `np.asarray(result)` gives the maps (one per example, never averaged over
    the batch), `result.values` the same as a tensor.

    Attributes:
        values: The maps, a tensor with a leading batch axis.
        target: The target value of each example on the original inputs.
        delta: The per-example completeness error, where the method has one
            (Integrated Gradients: sum of attributions minus (f(x) - f(baseline))).
        method: The method's name.
        layer: The layer key, for layer methods.
    """

    def __init__(self, values: Any, target: Any, method: str, delta: Any = None,
                 layer: str | None = None):
        self.values = values
        self.target = target
        self.method = method
        self.delta = delta
        self.layer = layer

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = np.asarray(self.values)
        return arr.astype(dtype) if dtype is not None else arr

    def numpy(self) -> np.ndarray:
        return np.asarray(self.values)

    @property
    def shape(self) -> tuple:
        return tuple(self.values.shape)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __repr__(self) -> str:
        extra = f", layer={self.layer!r}" if self.layer else ""
        return f"Attribution(method={self.method!r}, shape={self.shape}{extra})"


# ------------------------------------------------------------------ targets
def fixed_target(model: Any, x: Any, target: Any, output: Any, training: bool) -> Any:
    """The target with `"predicted"` resolved on the original inputs, so that
    noisy or interpolated copies of an example keep that example's class."""
    if not (isinstance(target, str) and target == "predicted"):
        return target
    tgt = PredictedTarget()
    with keras.StatelessScope():
        outputs = model(x, training=training)
    scores = class_scores(select_output(outputs, output, output_names(model), None, tgt),
                          "target='predicted'")
    return np.argmax(np.asarray(scores), axis=-1)


def repeat_target(target: Any, times: int, n: int) -> Any:
    """The target for `times` stacked copies of a batch of `n` (copy-major)."""
    if isinstance(target, LossTarget):
        sw = target.sample_weight
        return LossTarget(target.fn, _tile(target.y_true, times),
                          None if sw is None else _tile(sw, times))
    if isinstance(target, (list, tuple, np.ndarray, tf.Tensor)):
        arr = np.asarray(target)
        if arr.ndim == 1 and arr.shape[0] == n:
            return np.tile(arr, times)
    return target


def slice_target(target: Any, start: int, stop: int) -> Any:
    """The target for rows `start:stop` of the batch."""
    if isinstance(target, LossTarget):
        sw = target.sample_weight
        return LossTarget(target.fn, np.asarray(target.y_true)[start:stop],
                          None if sw is None else np.asarray(sw)[start:stop])
    if isinstance(target, (list, tuple, np.ndarray, tf.Tensor)):
        arr = np.asarray(target)
        if arr.ndim == 1:
            return arr[start:stop]
    return target


def _tile(a: Any, times: int) -> np.ndarray:
    a = np.asarray(a)
    return np.tile(a, (times,) + (1,) * (a.ndim - 1))


def target_values(model: Any, x: Any, target: Any, output: Any, training: bool) -> Any:
    """The per-example target values on `x` (one forward pass)."""
    tgt = make_target(target, batch_size(x))
    with keras.StatelessScope():
        outputs = model(x, training=training)
    selected = select_output(outputs, output, output_names(model), None, tgt)
    value, _, meta = tgt.compute(selected, tgt.args)
    tgt.check(meta)
    return value


# ---------------------------------------------------------------- batching
def chunks(total: int, size: int | None) -> Iterator[tuple[int, int]]:
    size = total if not size or size >= total else int(size)
    if size <= 0:
        raise GradprobeError(f"batch_size must be a positive integer; got {size}.")
    for start in range(0, total, size):
        yield start, min(total, start + size)


def batched(fn: Callable[[int, int], Any], total: int, batch_size_: int | None,
            label: str, progress: bool | None) -> list[Any]:
    """Runs `fn(start, stop)` over chunks of `total`, with a rich progress bar
    when there are several chunks (and `progress` is not False)."""
    spans = list(chunks(total, batch_size_))
    show = progress if progress is not None else len(spans) > 1
    if not show or len(spans) == 1:
        return [fn(a, b) for a, b in spans]
    from rich.progress import Progress

    out = []
    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=total)
        for a, b in spans:
            out.append(fn(a, b))
            bar.update(task, advance=b - a)
    return out


def input_gradients(model: Any, x: Any, target: Any, *, output: Any, training: bool,
                    batch_size_: int | None = None, label: str = "gradients",
                    progress: bool | None = None) -> tuple[Any, Any]:
    """`(d target / d input, target values)` for a (possibly large) batch, in chunks.
    The target values are per example, or `None` for a scalar target."""
    n = batch_size(x)

    def run(a: int, b: int) -> Any:
        xs = keras.tree.map_structure(lambda t: t[a:b], x)
        g = gradients(model, xs, slice_target(target, a, b), "inputs", output=output,
                      training=training)
        return g["inputs"], g.target

    parts = batched(run, n, batch_size_, label, progress)
    if len(parts) == 1:
        return parts[0]
    values = [t for _, t in parts]
    per_example = all(getattr(t, "shape", ()) and t.shape.rank == 1 for t in values)
    return (tf.concat([g for g, _ in parts], axis=0),
            tf.concat(values, axis=0) if per_example else None)


def single_input(model: Any, inputs: Any, what: str) -> Any:
    x = prepare_inputs(model, inputs)
    ensure_built(model, x)
    leaves = keras.tree.flatten(x)
    if len(leaves) != 1:
        raise GradprobeError(
            f"{what} works on single-input models; this model takes {len(leaves)} inputs.")
    if not leaves[0].dtype.is_floating:
        raise GradprobeError(
            f"{what} needs floating-point inputs; got {leaves[0].dtype.name}. For token ids, "
            "attribute to the embedding layer instead (layer=...).")
    return leaves[0]


def layer_key(g: Any, layer: Any) -> str:
    """The one activation key a layer selector produced, or a clear error."""
    keys = [k for k in g if g.kinds[k] == "activation"]
    if len(keys) != 1:
        calls = sorted({k.split(":")[0] for k in keys})
        raise GradprobeError(
            f"Layer {layer!r} has {len(keys)} captured outputs ({quoted(keys)}): it is called "
            f"more than once or returns several tensors. Choose one, e.g. {quoted(calls)}.")
    return keys[0]
