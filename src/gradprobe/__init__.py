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

from gradprobe.attribution._common import Attribution
from gradprobe.attribution.grad_cam import grad_cam, grad_cam_layer, grad_cam_plus_plus
from gradprobe.attribution.integrated_gradients import integrated_gradients
from gradprobe.attribution.saliency import gradient_x_input, saliency
from gradprobe.attribution.smoothgrad import smoothgrad
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

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "Finding",
    "FunctionalForm",
    "GradientMonitor",
    "GradprobeError",
    "Gradients",
    "PerExampleNorms",
    "Tape",
    "at",
    "clear_cache",
    "functional",
    "grad_cam",
    "grad_cam_layer",
    "grad_cam_plus_plus",
    "gradient_penalty",
    "gradient_x_input",
    "gradients",
    "hvp",
    "integrated_gradients",
    "jacobian",
    "loss",
    "per_example_norms",
    "plot",
    "saliency",
    "smoothgrad",
    "write_report",
]
