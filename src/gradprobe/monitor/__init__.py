"""`gp.GradientMonitor`: the gradients the optimizer actually applies, recorded
inside the train step of `model.fit`, at almost no cost.

Modules: `callback` (the Keras callback and its lifecycle), `hooks` (the
train-step and optimizer hooks: the only place touching private Keras APIs),
`layout` (the named layout of the per-step status), `sinks` (history, CSV,
TensorBoard, console).
"""

from gradprobe.monitor.callback import GradientMonitor
from gradprobe.monitor.layout import STATS, Skip
from gradprobe.monitor.sinks import read_csv

__all__ = ["STATS", "GradientMonitor", "Skip", "read_csv"]
