"""What the benchmarks share: the models, wall and CPU timing, interleaved rounds.

The machine the benchmarks run on may be shared: every timing records CPU time
(`time.process_time`, all threads of the process) as well as wall time, rounds
alternate the order of the variants, and `load_note` says how loaded the
machine was.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import keras

CLASS = 0  # the class score every benchmark differentiates


def small_cnn() -> keras.Model:
    """Three conv/batch-norm/pool blocks and two dense layers, 32x32x3 inputs."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    h = inp
    for i, f in enumerate([16, 32, 64]):
        h = keras.layers.Conv2D(f, 3, padding="same", activation="relu", name=f"conv{i}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.MaxPooling2D(name=f"pool{i}")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dense(64, activation="relu", name="fc")(h)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(h), name="small_cnn")


def resnet50(size: int | None = None) -> keras.Model:
    """`keras.applications.ResNet50(weights=None)`, for `size`x`size` inputs (224 if None)."""
    keras.utils.set_random_seed(0)
    if size is None:
        return keras.applications.ResNet50(weights=None)
    return keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """`(wall seconds, CPU seconds)` of one call `fn(*args)`."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(fns: dict[str, Callable[..., Any]], args: tuple, rounds: int,
                reps: int = 1) -> dict[str, tuple[float, float]]:
    """Median `(wall, CPU)` seconds per call of each function, over `rounds`
    rounds of `reps` calls each; the order of the functions alternates between
    rounds (forwards, then backwards), so that drifts of the machine's load hit
    every function alike."""
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    items = list(fns.items())

    def run(fn):
        for _ in range(reps):
            fn(*args)

    for i in range(rounds):
        for label, fn in items if i % 2 == 0 else items[::-1]:
            wall, cpu = timed(run, fn)
            samples[label].append((wall / reps, cpu / reps))
    return {k: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v))
            for k, v in samples.items()}


def load_note() -> str:
    """The machine's load, for a table's title."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
