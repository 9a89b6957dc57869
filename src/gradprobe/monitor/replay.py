"""Where a NaN starts: the replay of a non-finite training step
(`gp.GradientMonitor(replay=True)`).

The monitor's in-graph check says at which step and in which variable's gradient
a NaN/Inf first appeared, not where it was born. With `replay=True` the
optimizer does not apply that step's update (the model keeps its last finite
weights) and the monitor keeps the step's batch; `find_origin` then runs the
step's forward and backward pass once more, eagerly, with `gp.gradients` on
every layer's activation and every trainable weight, and names:

- the first layer, in call order, whose output is not finite (forward), or
- where every output is finite but the loss is not, the loss, or
- where the forward pass is finite, the layer whose backward pass first makes a
  gradient non-finite: walking from the output toward the input, the first
  layer whose output's gradient is finite while the gradient it hands back (to
  the layer before it, or to its own weights) is not.

Backend-neutral (Keras and `gp.gradients`); nothing runs on healthy steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras
import numpy as np

from gradprobe.errors import GradprobeError


class NonfiniteOrigin(NamedTuple):
    """Where the first non-finite step's NaN/Inf was born (`monitor.nonfinite_origin`).

    Attributes:
        step: The step (as in `monitor.steps`).
        phase: `"forward"` (a layer's output), `"loss"` (every output finite,
            the loss not), `"backward"` (a layer's backward pass) or
            `"not reproduced"` (the replay ran finite, or could not run).
        layer: The layer's path (`"encoder/attention"`), or None.
        message: One sentence saying all of that.
    """

    step: int
    phase: str
    layer: str | None
    message: str


def _finite(value: Any) -> bool:
    return bool(np.all(np.isfinite(np.asarray(keras.ops.convert_to_numpy(value),
                                              dtype=np.float64))))


def find_origin(model: Any, data: Any, step: int) -> NonfiniteOrigin:
    """Replays one training step's forward and backward pass on `data` (the
    batch the train step received) and names where the first NaN/Inf appears.

    Args:
        model: The compiled model, with the weights the step started from.
        data: The batch, as `train_step(data)` received it (`(x, y)` or
            `(x, y, sample_weight)`).
        step: The step's number, for the message.

    Returns:
        A `NonfiniteOrigin`.
    """
    from gradprobe.core.engine import gradients

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

    def loss(outputs: Any) -> Any:
        return model.compute_loss(x=x, y=y, y_pred=outputs, sample_weight=sample_weight,
                                  training=True)

    try:
        g = gradients(model, x, loss, ["*", "*.weights"], training=True, compile=False,
                      unconnected="zero")
    except GradprobeError as e:
        return NonfiniteOrigin(step, "not reproduced", None,
                               f"the replay of step {step} could not run ({e})")
    acts = [k for k in g if g.kinds[k] == "activation"]
    for key in acts:
        if not _finite(g.activations[key]):
            return NonfiniteOrigin(step, "forward", key,
                                   f"it starts in the forward pass: {key!r} is the first "
                                   f"layer (in call order) whose output is not finite")
    if not _finite(g.target):
        return NonfiniteOrigin(step, "loss", None,
                               "it starts in the loss: every layer's output is finite, "
                               "the loss is not")
    weights: dict[str, list[str]] = {}
    for key in g:
        if g.kinds[key] == "weight":
            weights.setdefault(key.rsplit(".", 1)[0], []).append(key)
    # From the output toward the input: `after` is the layer nearer the output
    # (its output's gradient finite); a non-finite gradient of `key` (the
    # output of the layer before it) or of `after`'s weights was made by
    # `after`'s backward pass.
    after: str | None = None
    for key in reversed(acts):
        bad_weights = [w for w in weights.get(key, []) if not _finite(g[w])]
        if not _finite(g[key]):
            where = after or "the loss"
            made = f"the gradient of {key!r}'s output"
            return NonfiniteOrigin(step, "backward", after,
                                   f"it starts in the backward pass: the forward pass is "
                                   f"finite, and the backward pass of {where!r} makes {made} "
                                   "non-finite")
        if bad_weights:
            return NonfiniteOrigin(step, "backward", key,
                                   f"it starts in the backward pass: the forward pass is "
                                   f"finite, and the backward pass of {key!r} makes the "
                                   f"gradient of {bad_weights[0]!r} non-finite")
        after = key
    return NonfiniteOrigin(step, "not reproduced", None,
                           f"the replay of step {step} ran finite (dropout or other "
                           "randomness of that step differs in a replay)")


__all__ = ["NonfiniteOrigin", "find_origin"]
