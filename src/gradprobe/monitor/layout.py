"""The named layout of what each training step hands back to the monitor.

The in-graph state lives in a few variables (see
`gradprobe.backends.tensorflow_monitor.StepProbe`); after each execution of the
train function they are read as ONE float64 vector (one output costs far less
than several). `StatusLayout` names every part of that vector,
and `Status` is the vector unpacked into named NumPy arrays.

A multi-step execution (`steps_per_execution=k`) runs k train steps per call;
every per-step part has `slots = k` rows, and step `s` lives in row `s % k`
(consecutive steps never share a row within one execution).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import numpy as np

# The statistics of a gradient, in the order the history, the CSV and the
# TensorBoard tags use them.
STATS = ("norm", "max_abs", "zero_fraction", "nonfinite", "update_ratio")
# What the graph computes per gradient on a recorded step (update_ratio comes
# from a separate hook, after the update).
GRAD_STATS = ("norm", "max_abs", "zero_fraction", "nonfinite", "dead_units")
# What the graph computes per activation gradient on a recorded step.
ACT_STATS = ("norm", "max_abs", "zero_fraction", "nonfinite")
# Step-level columns of the CSV (after `step`).
STEP_COLUMNS = ("skipped", "loss_scale")


class Skip(IntEnum):
    """Why the optimizer applied no update at a step (`monitor.skipped`)."""

    APPLIED = 0      # the update was applied
    OVERFLOW = 1     # dynamic loss scaling skipped it: the scaled gradients overflowed
    ACCUMULATED = 2  # gradient accumulation: added to the accumulators, applied later
    NONFINITE = 3    # replay=True: a NaN/Inf gradient, the update not applied (replayed)


class Status(NamedTuple):
    """One read of the monitor's state, after an execution of the train function."""

    step: int                # the monitor's step counter: number of the last step its hook saw
    iterations: int          # the applying optimizer's raw iteration count (independent of the hooks)
    copies_step: int         # the step whose gradients the histogram copies hold (-1: none)
    slot_step: np.ndarray    # (slots,) step number written by the `apply` hook
    proof: np.ndarray        # (slots,) step number written where the step's statistics were made
    skipped: np.ndarray      # (slots,) a `Skip` code
    loss_scale: np.ndarray   # (slots,) the loss scale of that step (1 without loss scaling)
    flags: np.ndarray        # (slots, n) 1 where that variable's gradient had a NaN/Inf
    stats: np.ndarray        # (slots, n, len(GRAD_STATS))
    ratios: np.ndarray       # (slots, n) update ratio ||delta w|| / ||w||
    acts: np.ndarray         # (m, slots, len(ACT_STATS))


@dataclass(frozen=True)
class StatusLayout:
    """Where each `Status` field sits in the flat float64 status vector.

    Args:
        variables: Number of monitored variables (`n`).
        layers: Number of monitored activation layers (`m`).
        slots: Rows per per-step part (`steps_per_execution`).
    """

    variables: int
    layers: int
    slots: int

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        n, m, k = self.variables, self.layers, self.slots
        return [("step", ()), ("iterations", ()), ("copies_step", ()),
                ("slot_step", (k,)), ("proof", (k,)), ("skipped", (k,)),
                ("loss_scale", (k,)), ("flags", (k, n)),
                ("stats", (k, n, len(GRAD_STATS))), ("ratios", (k, n)),
                ("acts", (m, k, len(ACT_STATS)))]

    @functools.cached_property
    def _slices(self) -> list[tuple[str, int, int, tuple[int, ...]]]:
        out, at = [], 0
        for name, shape in self.shapes():
            size = int(np.prod(shape, dtype=np.int64))
            out.append((name, at, at + size, shape))
            at += size
        return out

    @property
    def size(self) -> int:
        return self._slices[-1][2]

    def unpack(self, flat: np.ndarray) -> Status:
        flat = np.asarray(flat, dtype=np.float64).reshape(-1)
        if flat.size != self.size:
            raise ValueError(f"status vector of {flat.size} values; layout expects {self.size}")
        return Status(**{name: int(flat[a]) if shape == () else flat[a:b].reshape(shape)
                         for name, a, b, shape in self._slices})
