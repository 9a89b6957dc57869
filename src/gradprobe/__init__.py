"""gradprobe: how does this output depend on that layer?

Gradients of a chosen scalar target (a class score, a loss) with respect to any
layer's activations, any layer's weights, or the input, for every kind of
Keras 3 model.

>>> import keras
>>> import numpy as np
>>> import gradprobe as gp
>>> model = keras.Sequential([
...     keras.Input((8, 8, 1)),
...     keras.layers.Conv2D(4, 3, activation="relu", name="conv2d"),
...     keras.layers.Flatten(),
...     keras.layers.Dense(10, name="dense"),
... ])
>>> x = np.random.default_rng(0).random((2, 8, 8, 1), dtype="float32")
>>> g = gp.gradients(model, x, target=3, wrt=["conv2d", "dense.kernel", "inputs"])
>>> list(g)
['inputs', 'conv2d', 'dense.kernel']
>>> g.summary()
<BLANKLINE>
...gradients by source...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The public names load on first use (PEP 562), so that `import gradprobe` and the
# `gradprobe` command's --help and argument errors do not import Keras and its
# backend (seconds, and TensorFlow's native log lines); `gp.gradients` and the rest
# import it the first time they are looked up.
_LAZY = {
    "Attribution": "gradprobe.attribution._common",
    "deletion_curve": "gradprobe.attribution.checks",
    "insertion_curve": "gradprobe.attribution.checks",
    "randomization_check": "gradprobe.attribution.checks",
    "grad_cam": "gradprobe.attribution.grad_cam",
    "grad_cam_layer": "gradprobe.attribution.grad_cam",
    "grad_cam_plus_plus": "gradprobe.attribution.grad_cam",
    "integrated_gradients": "gradprobe.attribution.integrated_gradients",
    "gradient_x_input": "gradprobe.attribution.saliency",
    "saliency": "gradprobe.attribution.saliency",
    "smoothgrad": "gradprobe.attribution.smoothgrad",
    "attribution_patching": "gradprobe.causal.attribution_patching",
    "Intervention": "gradprobe.causal.intervene",
    "intervene": "gradprobe.causal.intervene",
    "Patching": "gradprobe.causal.patching",
    "activation_patching": "gradprobe.causal.patching",
    "FunctionalForm": "gradprobe.core._functional_form",
    "functional": "gradprobe.core._functional_form",
    "clear_cache": "gradprobe.core.engine",
    "gradients": "gradprobe.core.engine",
    "Gradients": "gradprobe.core.result",
    "Finding": "gradprobe.core.stats",
    "Tape": "gradprobe.core.tape",
    "at": "gradprobe.core.targets",
    "loss": "gradprobe.core.targets",
    "GradprobeError": "gradprobe.errors",
    "hvp": "gradprobe.higher.hvp",
    "jacobian": "gradprobe.higher.jacobian",
    "gradient_penalty": "gradprobe.higher.penalty",
    "PerExampleNorms": "gradprobe.higher.per_example",
    "per_example_norms": "gradprobe.higher.per_example",
    "GradientMonitor": "gradprobe.monitor",
    "plot": "gradprobe.report",
    "write_report": "gradprobe.report.html",
}

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from gradprobe.attribution._common import Attribution
    from gradprobe.attribution.checks import deletion_curve, insertion_curve, randomization_check
    from gradprobe.attribution.grad_cam import grad_cam, grad_cam_layer, grad_cam_plus_plus
    from gradprobe.attribution.integrated_gradients import integrated_gradients
    from gradprobe.attribution.saliency import gradient_x_input, saliency
    from gradprobe.attribution.smoothgrad import smoothgrad
    from gradprobe.causal.attribution_patching import attribution_patching
    from gradprobe.causal.intervene import Intervention, intervene
    from gradprobe.causal.patching import Patching, activation_patching
    from gradprobe.core._functional_form import FunctionalForm, functional
    from gradprobe.core.engine import clear_cache, gradients
    from gradprobe.core.result import Gradients
    from gradprobe.core.stats import Finding
    from gradprobe.core.tape import Tape
    from gradprobe.core.targets import at, loss
    from gradprobe.errors import GradprobeError
    from gradprobe.higher.hvp import hvp
    from gradprobe.higher.jacobian import jacobian
    from gradprobe.higher.penalty import gradient_penalty
    from gradprobe.higher.per_example import PerExampleNorms, per_example_norms
    from gradprobe.monitor import GradientMonitor
    from gradprobe.report import plot
    from gradprobe.report.html import write_report


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")
    parent = importlib.import_module(module)
    value = getattr(parent, name, None)
    if value is None:  # a submodule (`plot`)
        value = importlib.import_module(f"{module}.{name}")
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "Finding",
    "FunctionalForm",
    "GradientMonitor",
    "GradprobeError",
    "Gradients",
    "Intervention",
    "Patching",
    "PerExampleNorms",
    "Tape",
    "activation_patching",
    "at",
    "attribution_patching",
    "clear_cache",
    "deletion_curve",
    "functional",
    "grad_cam",
    "grad_cam_layer",
    "grad_cam_plus_plus",
    "gradient_penalty",
    "gradient_x_input",
    "gradients",
    "hvp",
    "insertion_curve",
    "integrated_gradients",
    "intervene",
    "jacobian",
    "loss",
    "per_example_norms",
    "plot",
    "randomization_check",
    "saliency",
    "smoothgrad",
    "write_report",
]
