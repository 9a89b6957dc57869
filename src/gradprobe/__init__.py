"""gradprobe: how does this output depend on that layer?

Gradients of a chosen scalar target (a class score, a loss) with respect to any
layer's activations, any layer's weights, or the input, for every kind of
Keras 3 model.

>>> import gradprobe as gp
>>> g = gp.gradients(model, x, target=3, wrt=["conv2d", "dense.kernel", "inputs"])
>>> g.summary()
"""

from gradprobe import plot
from gradprobe._functional_form import FunctionalForm, functional
from gradprobe.attribution import Attribution
from gradprobe.engine import clear_cache, gradients
from gradprobe.errors import GradprobeError
from gradprobe.grad_cam import grad_cam, grad_cam_layer, grad_cam_plus_plus
from gradprobe.hvp import hvp
from gradprobe.integrated_gradients import integrated_gradients
from gradprobe.jacobian import jacobian
from gradprobe.monitor import GradientMonitor
from gradprobe.penalty import gradient_penalty
from gradprobe.per_example import PerExampleNorms, per_example_norms
from gradprobe.report import write_report
from gradprobe.result import Gradients
from gradprobe.saliency import gradient_x_input, saliency
from gradprobe.smoothgrad import smoothgrad
from gradprobe.stats import Finding
from gradprobe.tape import Tape
from gradprobe.targets import at, loss

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
