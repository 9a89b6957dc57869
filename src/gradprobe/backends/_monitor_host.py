"""What the backends' halves of `gp.GradientMonitor` share, in NumPy and plain
Python (no backend library): the optimizer lookups and the installation of the
optimizer hooks (every backend), the host-side record of the steps of one
execution of the train function, and the TensorBoard event writer (JAX and
PyTorch).

On these backends the train step hands each step's statistics back as one small
array (JAX: an output of the jitted step; PyTorch: a tensor computed eagerly);
the arrays stay on the device until the callback reads the execution's status
(`Records.status`), where they are copied to the host at once.

`EventWriter` writes TensorBoard event files with the `tensorboard` package
alone (its protocol buffers and record format), without TensorFlow.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np

from gradprobe.core import _patch
from gradprobe.errors import GradprobeError
from gradprobe.monitor.layout import ACT_STATS, GRAD_STATS, Status, StatusLayout

# The head of each step's record vector, then flags (n), stats (n x GRAD_STATS),
# ratios (n), activation stats (m x ACT_STATS).
HEAD = ("applied", "seen", "skipped", "loss_scale")


def record_size(variables: int, layers: int) -> int:
    """The length of one step's record vector."""
    return len(HEAD) + variables * (2 + len(GRAD_STATS)) + layers * len(ACT_STATS)


# A record may end with the optimizer's iteration count as two float32 values,
# `count // ITERATION_SPLIT` and `count % ITERATION_SPLIT` (-1, 0 where unknown).
ITERATION_SPLIT = 65536


class Records:
    """The rows of the status (one per slot, as on TensorFlow) filled from the
    records of the steps that ran, numbered on the host.

    Args:
        layout: The status layout (variables, layers, slots).
    """

    def __init__(self, layout: StatusLayout):
        self.layout = layout
        n, m, k = layout.variables, layout.layers, layout.slots
        self.slot_step = np.full(k, -1.0)
        self.proof = np.full(k, -1.0)
        self.skipped = np.zeros(k)
        self.loss_scale = np.ones(k)
        self.flags = np.zeros((k, n))
        self.stats = np.zeros((k, n, len(GRAD_STATS)))
        self.ratios = np.zeros((k, n))
        self.acts = np.zeros((m, k, len(ACT_STATS)))
        self.size = record_size(n, m)
        self.pending: list[tuple[int, Any, Any]] = []  # (step, record, iterations)
        self.step = 0
        self.iterations = 0
        self.copies_step = -1

    def add(self, step: int, record: Any, iterations: Any = None) -> None:
        """The record (a device array, or None where the step ran without the
        hooks) of train step `step`, and the optimizer's iteration count after it."""
        self.step = step
        self.pending.append((step, record, iterations))

    def status(self, to_numpy: Any) -> Status:
        """The status after the steps added since the last call; `to_numpy`
        copies a device array to the host."""
        n, m, k = self.layout.variables, self.layout.layers, self.layout.slots
        pending, self.pending = self.pending, []
        for step, record, iterations in pending:
            row = step % k
            if iterations is not None:
                self.iterations = int(to_numpy(iterations))
            if record is None:
                self.slot_step[row] = self.proof[row] = -1.0
                continue
            v = np.asarray(to_numpy(record), dtype=np.float64).reshape(-1)
            if v.size == self.size + 2:  # the iteration count appended (hi, lo: exact in float32)
                if v[-2] >= 0:
                    self.iterations = int(v[-2]) * ITERATION_SPLIT + int(v[-1])
                v = v[:-2]
            self.slot_step[row] = step if v[0] > 0 else -1.0
            self.proof[row] = step if v[1] > 0 else -1.0
            self.skipped[row], self.loss_scale[row] = v[2], v[3]
            at = len(HEAD)
            self.flags[row] = v[at:at + n]
            at += n
            self.stats[row] = v[at:at + n * len(GRAD_STATS)].reshape(n, len(GRAD_STATS))
            at += n * len(GRAD_STATS)
            self.ratios[row] = v[at:at + n]
            at += n
            self.acts[:, row, :] = v[at:at + m * len(ACT_STATS)].reshape(m, len(ACT_STATS))
        return Status(step=int(self.step), iterations=int(self.iterations),
                      copies_step=int(self.copies_step), slot_step=self.slot_step.copy(),
                      proof=self.proof.copy(), skipped=self.skipped.copy(),
                      loss_scale=self.loss_scale.copy(), flags=self.flags.copy(),
                      stats=self.stats.copy(), ratios=self.ratios.copy(), acts=self.acts.copy())


# ---------------------------------------------------------------- TensorBoard without TensorFlow
_uid = itertools.count()


def check_tensorboard(log_dir: Any) -> None:
    """Raises a `GradprobeError` with the fix where the `tensorboard` package
    (which writes the event files on JAX and PyTorch) is not installed."""
    try:
        _tensorboard_modules()
    except ImportError as e:
        raise GradprobeError(
            "GradientMonitor(log_dir=...) on JAX and PyTorch writes TensorBoard event files "
            f"with the `tensorboard` package, which cannot be imported ({e}). Install it "
            "(pip install tensorboard; TensorFlow is not needed), or pass csv=... instead "
            f"of log_dir. Received: log_dir={log_dir!r}.") from None


def check_options(activations: bool, log_dir: Any) -> None:
    """Raises a `GradprobeError` at construction for what this backend cannot
    do: here only TensorBoard without the `tensorboard` package."""
    if log_dir is not None:
        check_tensorboard(log_dir)


def loss_scaler(optimizer: Any) -> Any:
    """The model's `LossScaleOptimizer`, or None."""
    return optimizer if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else None


def applying_optimizer(optimizer: Any) -> Any:
    """The optimizer whose update step applies the gradients."""
    scaler = loss_scaler(optimizer)
    return scaler.inner_optimizer if scaler is not None else optimizer


def enter_optimizer_hooks(stack: contextlib.ExitStack, optimizer: Any, applier: Any,
                          apply: Callable, applier_wrappers: dict[str, Callable]) -> None:
    """Enters on `stack` the wrapper of `optimizer.apply` and the wrappers of the
    applying optimizer's methods: on the optimizer itself, or on the inner
    optimizer of a `LossScaleOptimizer`."""
    if applier is optimizer:
        stack.enter_context(_patch.wrapped_methods(optimizer,
                                                   {"apply": apply, **applier_wrappers}))
    else:
        stack.enter_context(_patch.wrapped_methods(optimizer, {"apply": apply}))
        stack.enter_context(_patch.wrapped_methods(applier, applier_wrappers))


def build_model(model: Any, iterator: Any) -> None:
    """Not used on JAX and PyTorch: Keras' `fit` builds the model there before
    any callback runs.

    Raises:
        GradprobeError: Always, with the fix.
    """
    raise GradprobeError(f"GradientMonitor: model {model.name!r} is not built. Call the model "
                         "once on a batch (model(x[:1])) before fit.")


def _tensorboard_modules() -> tuple[Any, Any, Any]:
    # The record format and protocol buffers of the `tensorboard` package; neither
    # imports TensorFlow (its stub supplies the CRC).
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    return event_pb2, summary_pb2, RecordWriter


class EventWriter:
    """TensorBoard event files in `log_dir`, written with the `tensorboard`
    package (no TensorFlow): `scalar` and `histogram` write at the step of the
    enclosing `at_step`.

    Args:
        log_dir: The folder (created if missing).
    """

    def __init__(self, log_dir: str):
        event_pb2, summary_pb2, record_writer = _tensorboard_modules()
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        os.makedirs(log_dir, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_uid)}.gradprobe")
        self._file = open(os.path.join(log_dir, name), "wb")  # noqa: SIM115
        self._writer = record_writer(self._file)
        self._step = 0
        self._values: list[Any] = []
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self._file.flush()

    def _write(self, event: Any) -> None:
        self._writer.write(event.SerializeToString())

    @contextlib.contextmanager
    def at_step(self, step: int) -> Iterator[None]:
        self._step, self._values = int(step), []
        try:
            yield
        finally:
            values, self._values = self._values, []
            if values:
                self._write(self._event_pb2.Event(
                    wall_time=time.time(), step=self._step,
                    summary=self._summary_pb2.Summary(value=values)))
                self._file.flush()

    def scalar(self, tag: str, value: float) -> None:
        self._values.append(self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value)))

    def histogram(self, tag: str, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        v = v[np.isfinite(v)]
        if v.size:
            counts, edges = np.histogram(v, bins=30)
            lo, hi = float(v.min()), float(v.max())
        else:
            counts, edges, lo, hi = np.zeros(0), np.zeros(1), 0.0, 0.0
        histo = self._summary_pb2.HistogramProto(
            min=lo, max=hi, num=float(v.size), sum=float(v.sum()),
            sum_squares=float(np.dot(v, v)), bucket_limit=[float(e) for e in edges[1:]],
            bucket=[float(c) for c in counts])
        self._values.append(self._summary_pb2.Summary.Value(tag=tag, histo=histo))

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()
