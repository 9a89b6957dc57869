"""The Keras backend gradprobe computes on, behind one small interface.

`keras.backend.backend()` chooses the implementation, `get()` returns it. Every
primitive the rest of gradprobe calls is listed in `gradprobe.backends.interface`
(`Backend`, and `TapeBackend` or `FunctionalBackend` as the module's `CAPTURE`
says); each backend module implements them (`tests/test_layout.py` checks it).
The functional capture (`gradprobe.core.capture.functional`) uses these:

* `NAME`: the Keras backend name.
* `value_and_grad(fn)`: for `fn(diff, *rest) -> (objective, aux)`, a function
  `(diff, *rest) -> ((objective, aux), grads)`, `grads` shaped like `diff` (a
  pytree of floating arrays); `scaled_value_and_grad(fn)`: the same for a model
  that computes in float16, its gradients loss-scaled and in float32 (the rule
  is in `gradprobe.backends._loss_scale`).
* `connected(fn, diff, *rest)`: for each leaf of `diff`, whether the objective
  of `fn` depends on it at all (a structural test, on abstract values: a
  gradient that is zero only because of the numbers, such as a dead ReLU,
  counts as connected, as on TensorFlow's tape).
* `eval_shape(fn, *args)`: runs `fn` on abstract values (shapes and dtypes
  only), for discovery passes that must not compute.
* `PER_EXAMPLE_METHOD`: how per-example gradients (`per_example=True`) are
  computed from single-example passes (`"vmap"` on JAX, `"loop"` on PyTorch);
  `vmap(fn, in_axes)`: `fn` mapped over the leading axis of the arguments whose
  axis is 0 (`jax.vmap`; a Python loop that stacks the results on PyTorch);
  `jacobian(fn)`: for `fn(diff, *rest) -> (value, aux)` with `value` shaped
  `(batch,)`, `(diff, *rest) -> (jacobian, aux)` with leaves shaped
  `(batch, *leaf_shape)` (`jax.jacrev`; one backward per example on PyTorch).
* `jit(fn)`: a compiled, cached version of `fn`; `trace_count` counts how many
  times functions compiled by it were traced.
* `value_of(variable)`: a Keras variable's current value, as the forward pass
  takes it (outside autograd on PyTorch).
* `zeros(shape, dtype)`: a probe (a zero array on JAX; on PyTorch a slot that
  `add_probe` fills with a `view_as` view), `add_probe(x, probe)` (keeps a Keras mask),
  `stop_gradient(tree)`, `to_numpy(x)`, `is_array(x)`.
* `trace_error(e)`: the name of the tracing error behind exception `e` (a
  model whose call needs concrete values), or `None`.
* `control_flow(origin)`: the backend control-flow function (`"scan"`,
  `"while_loop"`, `"cond"`, ...) the calling code runs inside, below the frames
  in `origin` (an `Origin`), or `None`. A layer called there runs once per loop
  step in a traced body: a probe added there would be summed over steps.

TensorFlow's primitives are in `gradprobe.backends.tensorflow` (the tape-based
capture of `gradprobe.core.capture.tape`); JAX's are in `gradprobe.backends.jax` and
PyTorch's in `gradprobe.backends.torch`: the only modules that import
`tensorflow`, `jax` and `torch` (a ruff rule keeps them there). Every private
Keras API gradprobe uses is in `gradprobe.backends._keras_private`.

TensorFlow is optional (`pip install "gradprobe[jax]"` needs no TensorFlow): the
modules that call TensorFlow's primitives bind `tensorflow_backend` (and
`tensorflow_attribution_backend`), which import `gradprobe.backends.tensorflow`
(and with it TensorFlow) on first use, so `import gradprobe` and every function on
JAX or PyTorch run without TensorFlow installed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from types import ModuleType
from typing import Any

import keras

from gradprobe.errors import GradprobeError

FUNCTIONAL = ("jax", "torch")  # backends whose CAPTURE is "functional" (core/capture/functional.py)
SUPPORTED_ELSEWHERE = ("JAX and PyTorch run every function but the "
                       "tf.distribute strategies and gp.Tape on JAX (use gp.functional there)")


def name() -> str:
    """The Keras backend in use (`"tensorflow"`, `"jax"`, `"torch"`, ...)."""
    return keras.backend.backend()


def runs_on(functional: tuple[str, ...] = ()) -> bool:
    """Whether a function that runs on TensorFlow and on the `functional` backends
    runs on the current one."""
    current = name()
    return current == "tensorflow" or current in functional


def is_functional() -> bool:
    """True when `gp.gradients` runs through the functional capture."""
    return name() in FUNCTIONAL


_MODULES = {"tensorflow": "gradprobe.backends.tensorflow", "jax": "gradprobe.backends.jax",
            "torch": "gradprobe.backends.torch"}
_loaded: dict[str, Any] = {}


def get() -> Any:
    """The backend module of the current Keras backend: an implementation of
    `gradprobe.backends.interface.Backend` and of the capture protocol its
    `CAPTURE` names (imported on first use)."""
    current = name()
    module = _loaded.get(current)
    if module is None:
        if current not in _MODULES:
            raise GradprobeError(
                f"gradprobe has no backend for Keras backend {current!r}; it runs on "
                "'tensorflow', 'jax' and 'torch'.")
        module = _loaded[current] = importlib.import_module(_MODULES[current])
    return module


class Deferred:
    """A module imported on first attribute access, so that importing gradprobe
    imports no backend library: `Deferred("gradprobe.backends.tensorflow").gradient`
    imports that module (and TensorFlow) when first read. Not a module in
    `sys.modules`: the real module is imported, and cached, by `importlib`."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", None)

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:  # (importlib caches it too, at about 2 us an access)
            module = importlib.import_module(self._name)
            object.__setattr__(self, "_module", module)
        return getattr(module, attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        raise AttributeError(f"{self._name} is read-only through Deferred")

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}>"


# TensorFlow's primitives, imported when first used (on the TensorFlow backend only).
tensorflow_backend = Deferred("gradprobe.backends.tensorflow")
tensorflow_attribution_backend = Deferred("gradprobe.backends.tensorflow_attribution")
# The monitor's train-step and optimizer hooks on TensorFlow.
tensorflow_monitor_backend = Deferred("gradprobe.backends.tensorflow_monitor")


class _MonitorBackend:
    """The module holding `gp.GradientMonitor`'s train-step and optimizer hooks
    for the Keras backend in use (`tensorflow_monitor`, `jax_monitor` or
    `torch_monitor`), chosen at each attribute access (imported on first use)."""

    __slots__ = ()
    _MODULES = {"tensorflow": "gradprobe.backends.tensorflow_monitor",
                "jax": "gradprobe.backends.jax_monitor",
                "torch": "gradprobe.backends.torch_monitor"}

    def module(self) -> ModuleType:
        current = name()
        if current not in self._MODULES:
            raise GradprobeError(f"gp.GradientMonitor has no hooks for Keras backend {current!r}; "
                                 "it runs on TensorFlow, JAX and PyTorch.")
        return importlib.import_module(self._MODULES[current])

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.module(), attr)

    def __repr__(self) -> str:
        return "<gp.GradientMonitor hooks of the current Keras backend>"


# The monitor's hooks of the current backend (`monitor_backend.StepProbe`, ...).
monitor_backend = _MonitorBackend()
# TensorFlow itself (a ruff rule bans this name outside backends/, like `import tensorflow`).
tensorflow_library = Deferred("tensorflow")

_LIBRARIES = {"tensorflow": ("TensorFlow", "tensorflow"), "jax": ("JAX", "jax"),
              "torch": ("PyTorch", "torch")}


def version() -> str:
    """The backend library and its version, for reports (`"TensorFlow 2.21.0"`)."""
    current = name()
    label, dist = _LIBRARIES.get(current, (current, current))
    try:
        return f"{label} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return label


def static_shape(x: Any) -> tuple:
    """The static shape of an array of any backend (or a NumPy array), as a tuple
    (`None` for an unknown dimension of a symbolic TensorFlow tensor)."""
    return tuple(x.shape.as_list()) if hasattr(x.shape, "as_list") else tuple(x.shape)


def dtype_name(x: Any) -> str:
    """The dtype of an array of any backend by name (`"float32"`), for messages."""
    dtype = getattr(x, "dtype", None)
    return getattr(dtype, "name", str(dtype))


def composite_kind(x: object) -> str | None:
    """`"sparse"` or `"ragged"` for TensorFlow's sparse and ragged tensors, which
    no gradprobe function takes; `None` for anything else (and always when
    TensorFlow is not imported: no such tensor can exist then)."""
    if sys.modules.get("tensorflow") is None:  # not imported (or blocked): no such tensor
        return None
    from gradprobe.backends import tensorflow

    return tensorflow.composite_kind(x)


class Origin:
    """The frames active when a capture starts (its own callers). The frames are
    held, so that their ids cannot be reused by new frames while it lasts."""

    def __init__(self) -> None:
        self.frames, frame = [], sys._getframe(1)
        while frame is not None:
            self.frames.append(frame)
            frame = frame.f_back
        self.ids = frozenset(id(f) for f in self.frames)

    @classmethod
    def empty(cls) -> Origin:
        """An origin with no frames (a recording that has ended)."""
        origin = cls.__new__(cls)
        origin.frames, origin.ids = [], frozenset()
        return origin

    def close(self) -> None:
        self.frames, self.ids = [], frozenset()

    def control_flow(self, entry_points: set[tuple[str, str]], path_part: str) -> str | None:
        """The backend control-flow function (one of `entry_points`, by file name
        and function name, in a file whose path contains `path_part`) that the
        caller of the backend's `control_flow` runs inside, below these frames;
        `None` if none. Each backend names its own entry points."""
        frame = sys._getframe(2)
        while frame is not None and id(frame) not in self.ids:
            code = frame.f_code
            if (os.path.basename(code.co_filename), code.co_name) in entry_points and \
                    path_part in code.co_filename:
                return code.co_name
            frame = frame.f_back
        return None
