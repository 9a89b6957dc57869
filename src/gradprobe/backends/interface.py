"""The backend interface: every primitive the rest of gradprobe calls on the
backend of the current Keras backend (`gradprobe.backends.get()`), as
`typing.Protocol`s that each backend module implements.

* `Backend`: what every backend provides (`tensorflow`, `jax`, `torch`);
* `TapeBackend`: the primitives of the tape capture (`CAPTURE == "tape"`,
  TensorFlow: a `tf.GradientTape` over the model's own stateful call), of its
  per-example methods and of the higher-order functions built on it;
* `FunctionalBackend`: the primitives of the functional capture
  (`CAPTURE == "functional"`, JAX and PyTorch: the forward pass as a function of
  its sources, differentiated by the backend);
* `AutogradTapeBackend`: the primitives of `gp.Tape` where the tape is
  autograd's graph (`TAPE == "autograd"`, PyTorch).

A backend module implements `Backend` and the protocols its `CAPTURE` and `TAPE` name;
`tests/test_layout.py` checks that each module defines every member. Code outside
`gradprobe.backends` reaches the backend only through `backends.get()` (and the
capabilities below), never by the backend's name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Backend(Protocol):
    """What every backend module provides."""

    NAME: str  # the Keras backend name
    CAPTURE: str  # "tape" or "functional": which capture strategy runs `gp.gradients`
    TAPE: str | None  # the tape of `gp.Tape`: "graph" (tf.GradientTape), "autograd" or None
    PER_EXAMPLE_METHOD: str  # the single-example method of `per_example=True`
    DIFFERENTIABLE_GRADIENTS: bool  # whether `gp.gradients`' results carry the caller's autodiff

    def stop_gradient(self, tree: Any) -> Any:
        """`tree` with every tensor a constant of autodiff."""

    def to_numpy(self, x: Any) -> Any:
        """A tensor as a NumPy array."""

    def is_floating(self, x: Any) -> bool:
        """Whether `x` is a floating-point tensor of this backend."""

    def control_flow(self, origin: Any) -> str | None:
        """The backend control-flow function the caller runs inside, below the
        frames of `origin` (a `backends.Origin`), or None."""

    def version(self) -> str:
        """The backend library and its version, for reports."""

    def in_graph(self) -> bool:
        """True while a graph is built in which tensors have no values (TensorFlow's
        `tf.function`); False on backends whose tracers are told apart per value."""

    def target_argument(self, value: Any) -> Any:
        """A target argument (classes, labels, weights) as the compiled gradient
        function of this backend takes it."""

    def target_arguments_shareable(self) -> bool:
        """Whether one target's arguments may be shared between calls (cached)."""

    def argmax_int32(self, scores: Any) -> Any:
        """Each row's arg-max class, int32."""

    def per_row(self, x: Any, idx: Any) -> Any:
        """`x[i, idx[i]]` for each row `i` of a `(batch, n, ...)` tensor."""


class TapeBackend(Backend, Protocol):
    """The primitives of the tape capture (`CAPTURE == "tape"`)."""

    def new_tape(self, persistent: bool = False, watch_accessed_variables: bool = False) -> Any:
        """A gradient tape."""

    def watch(self, tape: Any, source: Any) -> None:
        """Watches a variable or tensor on `tape`."""

    def watchable(self, source: Any) -> Any:
        """What a tape watches for `source` (a Keras variable's backend variable)."""

    def probe(self, tape: Any, x: Any) -> tuple[Any, Any]:
        """`(value, probe)`: `x` plus a watched zero, and the zero."""

    def gradient(self, tape: Any, target: Any, sources: list[Any]) -> list[Any]:
        """d target / d sources (`None` for an unconnected source)."""

    def scaled_gradient(self, tape: Any, target: Any, sources: list[Any]) -> list[Any]:
        """`gradient` with loss scaling, for a model that computes in float16."""

    def jacobian(self, tape: Any, target: Any, source: Any) -> Any:
        """d target / d source, every element of `target`."""

    def batch_jacobian(self, tape: Any, target: Any, source: Any) -> Any:
        """The Jacobian of each row of `target` with respect to the same row of `source`."""

    def densify(self, g: Any) -> Any:
        """A gradient as a dense tensor."""

    def to_float32(self, x: Any) -> Any:
        """A float16/bfloat16 tensor in float32 (others unchanged)."""

    def cast_like(self, value: Any, like: Any) -> Any:
        """`value` in the dtype of `like`."""

    def zeros_like(self, x: Any) -> Any:
        """Zeros of the shape and dtype of `x`."""

    def capture_context(self) -> Any:
        """A token of the graph (or eager context) a capture starts in."""

    def in_capture_context(self, token: Any) -> bool:
        """Whether the current context is the one of `token`."""

    def name_scope(self, name: str) -> Any:
        """A name scope for the ops of a capture."""

    def executing_eagerly(self) -> bool:
        """Whether ops run eagerly (not inside a graph being built)."""

    def compile_function(self, fn: Callable) -> Any:
        """`fn` compiled (`tf.function`, relaxed shapes)."""

    def is_tensor(self, x: Any) -> bool:
        """Whether `x` is a tensor of this backend."""

    def is_eager_tensor(self, x: Any) -> bool:
        """Whether `x` is a tensor with values."""

    def to_tensor(self, x: Any, dtype: Any = None) -> Any:
        """An array as a tensor."""

    def constant_string(self, s: str) -> Any:
        """A string tensor."""

    def decode_string(self, t: Any) -> str:
        """The text of a string tensor."""

    def vectorized_map(self, fn: Callable[[Any], Any], elems: Any) -> Any:
        """`fn` mapped over the leading axis of `elems` (`tf.vectorized_map`)."""

    def onednn_enabled(self) -> bool:
        """Whether the backend runs oneDNN kernels (see `per_example.vectorized_map_crashes`)."""

    def forward_over_backward(self, variables: list[Any], vectors: list[Any],
                              grad_fn: Callable[[], list[Any]]) -> list[Any]:
        """The Hessian-vector products of `gp.hvp`, forward over backward."""

    def vector_dot(self, grads: list[Any], vectors: list[Any]) -> Any:
        """sum_i <grads[i], vectors[i]>."""

    def pre_activation_gradient(self, layer: Any, a: Any, dy: Any) -> Any:
        """The gradient at a layer's pre-activation, from its output gradient."""

    def conv_patches(self, layer: Any, a: Any) -> Any:
        """A convolution's input patches, `(batch, positions, patch size)`."""

    def gram_squares(self, A: Any, G: Any) -> Any:
        """Per-example squared norm of sum_t A_t G_t^T from the Gram matrices."""

    def outer_squares(self, A: Any, G: Any) -> Any:
        """Per-example squared norm of sum_t A_t G_t^T from the sum itself."""

    def embedding_squares(self, ids: Any, dy: Any) -> Any:
        """Per-example squared norm of an embedding's gradient."""

    def layer_norm_squares(self, layer: Any, x: Any, dy: Any) -> dict[int, Any]:
        """{id(variable): per-example squared norm} of a LayerNormalization's weights."""


class FunctionalBackend(Backend, Protocol):
    """The primitives of the functional capture (`CAPTURE == "functional"`); see
    `gradprobe.backends` for what each computes."""

    PER_EXAMPLE: bool  # whether per-example gradients are supported
    trace_count: int  # how many times functions compiled by `jit` were traced

    def value_and_grad(self, fn: Callable) -> Callable: ...

    def scaled_value_and_grad(self, fn: Callable) -> Callable: ...

    def connected(self, fn: Callable, diff: Any, *rest: Any) -> Any: ...

    def eval_shape(self, fn: Callable, *args: Any) -> Any: ...

    def abstract(self, x: Any) -> Any: ...

    def vmap(self, fn: Callable, in_axes: tuple) -> Callable: ...

    def jacobian(self, fn: Callable) -> Callable: ...

    def jit(self, fn: Callable) -> Callable: ...

    def value_of(self, variable: Any) -> Any: ...

    def zeros(self, shape: tuple, dtype: Any) -> Any: ...

    def add_probe(self, x: Any, probe: Any) -> Any: ...

    def is_array(self, x: Any) -> bool: ...

    def is_concrete(self, x: Any) -> bool: ...

    def trace_error(self, e: BaseException) -> str | None: ...

    def grad(self, fn: Callable, diff: Any, *rest: Any) -> Any: ...

    def hvp(self, fn: Callable, primal: Any, tangent: Any, *rest: Any) -> Any: ...

    def batch_jacobian(self, fn: Callable, source: Any, *rest: Any) -> Any: ...


class AutogradTapeBackend(Backend, Protocol):
    """The primitives of `gp.Tape` on a backend whose tape is autograd's graph
    (`TAPE == "autograd"`, PyTorch)."""

    def enable_grad(self) -> Any:
        """A context in which autograd records."""

    def watch(self, tensor: Any) -> Any:
        """`tensor` made to require a gradient (returned)."""

    def tape_probe(self, x: Any) -> Any:
        """`x` as the rest of the forward pass sees it, differentiable by the tape."""

    def tape_gradient(self, target: Any, sources: list, create_graph: bool) -> list:
        """d target (summed) / d sources, `None` for an unconnected source."""


# Which protocol a backend module implements, by its `CAPTURE` and its `TAPE`.
STRATEGIES: dict[str, type] = {"tape": TapeBackend, "functional": FunctionalBackend}
TAPES: dict[str | None, type] = {"graph": TapeBackend, "autograd": AutogradTapeBackend,
                                 None: Backend}


def members(protocol: type) -> set[str]:
    """The names a module implementing `protocol` (and the protocols it extends) defines."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls in (object, Protocol) or not getattr(cls, "_is_protocol", False):
            continue
        names |= {n for n in vars(cls) if not n.startswith("_")}
        names |= set(getattr(cls, "__annotations__", {}))
    return names
