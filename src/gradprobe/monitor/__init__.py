"""`gp.GradientMonitor`: the gradients the optimizer actually applies, recorded
inside the train step of `model.fit`, at almost no cost.

Modules: `callback` (the Keras callback and its lifecycle), `layout` (the
named layout of the per-step status), `sinks` (history, CSV, TensorBoard,
console). All three are backend-neutral; the train-step and optimizer hooks that
compute the statistics in-graph are TensorFlow code, in
`gradprobe.backends.tensorflow_monitor`, and their private Keras APIs are in
`gradprobe.backends._keras_private`. The monitor runs on TensorFlow only.
"""

from gradprobe.monitor.callback import GradientMonitor
from gradprobe.monitor.layout import STATS, Skip
from gradprobe.monitor.sinks import read_csv

__all__ = ["STATS", "GradientMonitor", "Skip", "read_csv"]
