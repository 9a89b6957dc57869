"""Attribution patching (`gp.attribution_patching`): the first-order estimate of
every activation-patching effect from one clean forward pass, one corrupted
forward pass and one backward pass (Nanda, 2023; Syed et al., 2023):

    effect[layer, position] ~ sum over the other axes of
        d target / d activation (base run) * (source activation - base activation)

The gradients and the base activations come from one `gp.gradients` call on the
base inputs with respect to every selected layer call; the source activations
from one recorded forward pass. On a model whose target is linear in an
activation, the estimate equals exact patching.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from gradprobe.causal.patching import Patching, prepare_runs
from gradprobe.core.targets import to_numpy


def attribution_patching(model: keras.Model, clean: Any, corrupted: Any, target: Any,
                         layers: Any = "*", *, positions: Any = None,
                         direction: str = "denoise", output: Any = None,
                         training: bool = False) -> Patching:
    """The gradient estimate of `gp.activation_patching`'s table.

    Same arguments and the same table (`Patching`, `method="attribution"`) as
    `gp.activation_patching`, from one forward pass on each input and one
    backward pass on the base run instead of one forward pass per patched
    activation. Compare the two with `estimate.agreement(exact)` or
    `estimate.table(other=exact)`. A layer the target does not depend on gets
    zeros.

    Args:
        model: A Keras 3 model of any kind.
        clean: The clean inputs.
        corrupted: The corrupted inputs, same structure and shapes.
        target: A per-example target, as in `gp.activation_patching`.
        layers: Selectors as in `wrt=` (default `"*"`).
        positions: `None`, `"all"` or a list of positions along axis 1.
        direction: `"denoise"` (gradients at the corrupted run, times clean minus
            corrupted activations) or `"noise"` (at the clean run, times
            corrupted minus clean).
        output: As in `gp.gradients`.
        training: Passed to the model.

    Returns:
        A `Patching` table.

    Example:

    >>> import keras, numpy as np
    >>> import gradprobe as gp
    >>> model = keras.Sequential([keras.Input((3,)),
    ...                           keras.layers.Dense(4, name="hidden"),
    ...                           keras.layers.Dense(2, name="out")])
    >>> clean, corrupted = np.ones((2, 3), "float32"), np.zeros((2, 3), "float32")
    >>> exact = gp.activation_patching(model, clean, corrupted, 0)
    >>> estimate = gp.attribution_patching(model, clean, corrupted, 0)
    >>> bool(np.allclose(estimate.effects, exact.effects, atol=1e-5))   # a linear model
    True
    """
    runs = prepare_runs(model, clean, corrupted, target, layers, positions, direction, output,
                        training)
    wrt = [u.wrt for u in runs.units]
    g = runs.request.gradients(wrt, unconnected="zero")
    n, positions = runs.n, runs.positions
    per_example = np.zeros((len(runs.units), len(positions), n))
    for i, unit in enumerate(runs.units):
        grad = np.asarray(to_numpy(g[unit.key]), np.float64)
        base = np.asarray(to_numpy(g.activations[unit.key]), np.float64)
        source = np.asarray(to_numpy(runs.source_acts[unit.key]), np.float64)
        product = grad * (source - base)
        if positions == [None]:
            per_example[i, 0] = product.reshape(n, -1).sum(axis=1)
        else:
            along = product.reshape(n, product.shape[1], -1).sum(axis=2)
            per_example[i] = along[:, positions].T
    return Patching("attribution", direction, [u.key for u in runs.units], positions,
                    per_example.mean(axis=2), per_example, runs.clean, runs.corrupted,
                    forward_passes=3, backward_passes=1)

