"""PyTorch's primitives for the functional capture (see `gradprobe.backends`).

The only gradprobe module that imports `torch`. PyTorch differentiates eagerly
with its autograd graph, so the "probes" are not zero tensors added to the
activations (an addition per probe cost 21-28% in a study) but `view_as` views,
made as each layer output appears (`add_probe`): one `torch.autograd.grad` with
respect to those views gives the gradient of each use of an activation. The
discovery and dependency passes run the forward pass for real (PyTorch has no
abstract evaluation of a Keras model): once per request and input signature.
Private Keras access: the Keras mask of a tensor is read and written with
`keras.src.backend.common.masking` (see `add_probe`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import keras
import numpy as np
import torch

from gradprobe.backends import _keras_ops, _loss_scale

NAME = "torch"
CAPTURE = "functional"  # gp.gradients runs the functional capture
TAPE = "autograd"  # gp.Tape records autograd's graph
DIFFERENTIABLE_GRADIENTS = False  # one torch.autograd.grad, without create_graph

trace_count = 0  # nothing is compiled on PyTorch: calls run eagerly


class Probe:
    """A probe slot: `add_probe` fills it with the view that the rest of the
    forward pass consumes; the gradient is taken with respect to that view."""

    __slots__ = ("tensor",)

    def __init__(self) -> None:
        self.tensor: Any = None


def value_and_grad(fn: Any) -> Any:
    """`(diff, *rest) -> ((objective, aux), grads)` for `fn(diff, *rest) -> (objective, aux)`.

    Leaves of `diff` are `Probe` slots (filled during the call) or tensors (a
    variable's value, differentiated as a fresh leaf). A source the objective
    does not depend on gets zeros (`connected` tells which). The returned
    objective, auxiliary tensors and gradients are detached.
    """

    def run(diff: Any, *rest: Any) -> tuple[tuple[Any, Any], Any]:
        (objective, aux), grads, _ = _differentiate(fn, diff, rest)
        return (objective, aux), grads

    return run


def scaled_value_and_grad(fn: Any) -> Any:
    """`value_and_grad` for a forward pass that computes in float16: the gradients
    are loss-scaled and returned in float32 (`gradprobe.backends._loss_scale`):
    one forward pass, two backward passes (at scale 1, then at the chosen
    power of two)."""

    def run(diff: Any, *rest: Any) -> tuple[tuple[Any, Any], Any]:
        (objective, aux), grads, _ = _differentiate(fn, diff, rest, scaled=True)
        return (objective, aux), grads

    return run


def _backward(objective: Any, sources: list, scaled: bool) -> list:
    """`torch.autograd.grad` of `objective` for `sources` (`None` for an unused
    one); `scaled`: loss-scaled, in float32 (see `scaled_value_and_grad`)."""
    if not scaled:
        return list(torch.autograd.grad(objective, sources, allow_unused=True))
    first = torch.autograd.grad(objective, sources, retain_graph=True, allow_unused=True)
    scale = _loss_scale.scale_for(list(first))
    if scale is None:
        return list(first)
    second = torch.autograd.grad(objective, sources,
                                 grad_outputs=_loss_scale.seed(objective, scale),
                                 allow_unused=True)
    return _loss_scale.unscale(list(first), list(second), scale)


def _flatten(tree: Any) -> tuple[list, Any]:
    """`(leaves, pack)` for a tree of sources: `pack(new_leaves)` rebuilds it.

    The capture's `{"probes": {key: Probe}, "vars": {key: tensor}}` takes a
    fast path (plain dicts, in their own order: flattening and packing only
    need to agree); any other tree goes through `keras.tree`, whose PyTorch
    implementation (`torch.utils._pytree`) costs about 0.1 ms per call here."""
    if type(tree) is dict and all(type(v) is dict for v in tree.values()):
        inner = [(k, list(v)) for k, v in tree.items()]
        leaves = [tree[k][j] for k, keys in inner for j in keys]
        if all(isinstance(leaf, (Probe, torch.Tensor)) for leaf in leaves):
            def pack(new: list) -> dict:
                it = iter(new)
                return {k: {j: next(it) for j in keys} for k, keys in inner}

            return leaves, pack
    return keras.tree.flatten(tree), lambda new: keras.tree.pack_sequence_as(tree, new)


def _detached(tree: Any) -> Any:
    """`tree` with its tensors detached (a tensor, or a dict of tensors or of
    trees, without a walk through `keras.tree` where it is not needed)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if type(tree) is dict:
        return {k: _detached(v) for k, v in tree.items()}
    return keras.tree.map_structure(
        lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def _differentiate(fn: Any, diff: Any, rest: tuple, scaled: bool = False
                   ) -> tuple[tuple[Any, Any], Any, list[bool]]:
    leaves, pack = _flatten(diff)
    fresh = [leaf if isinstance(leaf, Probe) else leaf.detach().requires_grad_(True)
             for leaf in leaves]
    with torch.enable_grad():
        objective, aux = fn(pack(fresh), *rest)
        sources = [s.tensor if isinstance(s, Probe) else s for s in fresh]
        missing = [i for i, s in enumerate(sources) if s is None]
        if missing:  # pragma: no cover - discovery found every probed call
            raise RuntimeError(f"probe slots {missing} were not filled by the forward pass")
        wanted = [i for i, s in enumerate(sources) if s.requires_grad]
        found = _backward(objective, [sources[i] for i in wanted], scaled) if wanted and \
            objective.requires_grad else [None] * len(wanted)
    grads: list[Any] = [None] * len(sources)
    for i, g in zip(wanted, found):
        grads[i] = g
    used = [g is not None for g in grads]
    grads = [torch.zeros_like(s) if g is None else g for s, g in zip(sources, grads)]
    return (objective.detach(), _detached(aux)), pack(grads), used


PER_EXAMPLE = True
PER_EXAMPLE_METHOD = "loop"  # the single-example passes run one after the other


def vmap(fn: Any, in_axes: tuple) -> Any:
    """`fn` run on each example in turn (the arguments whose axis is 0 sliced,
    the others passed whole), the results stacked: a Python loop, since Keras
    layers on PyTorch are not written for `torch.func.vmap` (they read
    `.shape`, call `.item()`, draw from the global generator)."""

    def run(*args: Any) -> Any:
        mapped = [a for a, axis in zip(args, in_axes) if axis == 0]
        leaves = keras.tree.flatten(mapped)
        n = int(leaves[0].shape[0])
        rows = []
        for i in range(n):
            call = [keras.tree.map_structure(lambda t, i=i: t[i], a) if axis == 0 else a
                    for a, axis in zip(args, in_axes)]
            rows.append(fn(*call))
        return keras.tree.map_structure(lambda *xs: torch.stack(xs), *rows)

    return run


def jacobian(fn: Any) -> Any:
    """For `fn(diff, *rest) -> (value, aux)` with `value` shaped `(batch,)`: a
    function `(diff, *rest) -> (jacobian, aux)`, each leaf of `jacobian` shaped
    `(batch, *leaf_shape)`: one forward pass, one backward pass per example."""

    def run(diff: Any, *rest: Any) -> tuple[Any, Any]:
        leaves = keras.tree.flatten(diff)
        fresh = [leaf.detach().requires_grad_(True) for leaf in leaves]
        with torch.enable_grad():
            value, aux = fn(keras.tree.pack_sequence_as(diff, fresh), *rest)
            rows = []
            for i in range(int(value.shape[0])):
                found = torch.autograd.grad(value[i], fresh, retain_graph=True,
                                            allow_unused=True) if value.requires_grad                     else [None] * len(fresh)
                rows.append([torch.zeros_like(f) if g is None else g
                             for f, g in zip(fresh, found)])
        stacked = [torch.stack(col) for col in zip(*rows)] if rows else \
            [torch.zeros((0, *f.shape), dtype=f.dtype) for f in fresh]
        aux = keras.tree.map_structure(
            lambda t: t.detach() if isinstance(t, torch.Tensor) else t, aux)
        return keras.tree.pack_sequence_as(diff, stacked), aux

    return run


def jit(fn: Any) -> Any:
    """Eager on PyTorch: the function itself."""
    return fn


def eval_shape(fn: Any, *args: Any) -> Any:
    """Runs `fn` (for real: PyTorch has no abstract evaluation), without autograd."""
    with torch.no_grad():
        return fn(*args)


def abstract(x: Any) -> Any:
    """The value itself (the discovery pass runs on real values on PyTorch)."""
    return x


def connected(fn: Any, diff: Any, *rest: Any) -> Any:
    """For each leaf of `diff`: whether the objective of `fn(diff, *rest)`
    depends on it, from the autograd graph of one real pass (an unused source
    gets no gradient at all, as on TensorFlow's tape)."""
    _, _, used = _differentiate(fn, diff, rest)
    return _flatten(diff)[1](used)


def value_of(variable: Any) -> Any:
    """A variable's current value, outside autograd (Keras' torch variables are
    `nn.Parameter`s: differentiating all of them would cost a graph per weight)."""
    return variable.value.detach()


def zeros(shape: tuple, dtype: Any) -> Probe:
    """A fresh probe slot (the view is made in `add_probe`)."""
    return Probe()


def add_probe(x: Any, probe: Any) -> Any:
    """`x` as the rest of the forward pass sees it, with its gradient for this use
    recorded in `probe`: a view of `x` when `x` is in the autograd graph, else a
    new leaf that requires a gradient (nothing before it needs one). `x`'s Keras
    mask is carried over."""
    # Keras keeps masks in a table keyed by tensor id when a tensor takes no
    # attribute (keras.src.backend.common.tensor_attributes).
    from gradprobe.backends._keras_private import get_keras_mask, set_keras_mask

    if not isinstance(probe, Probe):  # a zero tensor (not made by this backend)
        y = x + probe
    else:
        y = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
        probe.tensor = y
    mask = get_keras_mask(x)
    if mask is not None:
        set_keras_mask(y, mask)
    return y


def stop_gradient(tree: Any) -> Any:
    return keras.tree.map_structure(
        lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def is_array(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def is_concrete(x: Any) -> bool:
    """A tensor with values (not a fake tensor of torch.compile's tracing)."""
    if not isinstance(x, torch.Tensor):
        return False
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return not (compiling is not None and compiling())


# Keras' control flow on PyTorch (keras/src/backend/torch/core.py, rnn.py): Python
# loops and branches. A layer called there is reported as on TensorFlow and JAX,
# where its per-step outputs cannot be probed, so that results agree across backends.
_CONTROL_FLOW = {
    ("core.py", "scan"), ("core.py", "while_loop"), ("core.py", "fori_loop"),
    ("core.py", "map"), ("core.py", "associative_scan"), ("core.py", "cond"),
    ("core.py", "switch"), ("rnn.py", "rnn"),
}


_FLOW_PATH = os.path.join("backend", "torch")
_flow_of_code: dict[Any, str | None] = {}  # code object -> control-flow name or None


def control_flow(origin: Any) -> str | None:
    """The Keras control-flow function the calling code runs inside, below the
    frames of `origin`; `None` if none.

    As `Origin.control_flow`, but with each code object's answer kept: PyTorch
    runs every probed layer call eagerly, so this walk runs on every call of
    every probed layer (not once per trace, as on JAX)."""
    ids = origin.ids
    frame = sys._getframe(1)
    while frame is not None and id(frame) not in ids:
        code = frame.f_code
        try:
            name = _flow_of_code[code]
        except KeyError:
            if len(_flow_of_code) > 100_000:  # (code made at run time, e.g. by exec)
                _flow_of_code.clear()
            name = _flow_of_code[code] = code.co_name if (
                (os.path.basename(code.co_filename), code.co_name) in _CONTROL_FLOW
                and _FLOW_PATH in code.co_filename) else None
        if name is not None:
            return name
        frame = frame.f_back
    return None


def trace_error(e: BaseException) -> str | None:
    """Nothing is traced on PyTorch."""
    return None


def version() -> str:
    return torch.__version__


# ------------------------------------------- higher order (gp.hvp, gp.jacobian, gp.Tape)
def _fresh(tree: Any) -> Any:
    """`tree`'s tensors as new autograd leaves (detached copies that require a gradient)."""
    return keras.tree.map_structure(lambda t: t.detach().requires_grad_(True), tree)


def _zeros_for_none(grads: Any, like: list) -> list:
    return [torch.zeros_like(s) if g is None else g for s, g in zip(like, grads)]


def grad(fn: Any, diff: Any, *rest: Any) -> Any:
    """The gradient of the scalar `fn(diff, *rest)` with respect to `diff`,
    kept in the autograd graph (`create_graph=True`), so that it is
    differentiable with respect to anything the forward pass used (the model's
    parameters). A source the value does not depend on gets zeros."""
    leaves = keras.tree.flatten(diff)
    fresh = [leaf.detach().requires_grad_(True) for leaf in leaves]
    with torch.enable_grad():
        value = fn(keras.tree.pack_sequence_as(diff, fresh), *rest)
        found = torch.autograd.grad(value, fresh, create_graph=True, allow_unused=True) \
            if value.requires_grad else [None] * len(fresh)
    return keras.tree.pack_sequence_as(diff, _zeros_for_none(found, fresh))


def hvp(fn: Any, primal: Any, tangent: Any, *rest: Any) -> Any:
    """The Hessian-vector product of the scalar `fn(primal, *rest)`: double
    backward (the gradient kept in the graph, its dot product with `tangent`
    differentiated again). Returned detached."""
    leaves = keras.tree.flatten(primal)
    vectors = keras.tree.flatten(tangent)
    fresh = [leaf.detach().requires_grad_(True) for leaf in leaves]
    with torch.enable_grad():
        value = fn(keras.tree.pack_sequence_as(primal, fresh), *rest)
        first = torch.autograd.grad(value, fresh, create_graph=True, allow_unused=True) \
            if value.requires_grad else [None] * len(fresh)
        terms = [torch.sum(g * v.to(g.dtype)) for g, v in zip(first, vectors)
                 if g is not None and g.requires_grad]
        second = [None] * len(fresh)
        if terms:
            second = torch.autograd.grad(torch.stack(terms).sum(), fresh, allow_unused=True)
    out = [g.detach() for g in _zeros_for_none(second, fresh)]
    return keras.tree.pack_sequence_as(primal, out)


def batch_jacobian(fn: Any, source: Any, *rest: Any) -> Any:
    """For `fn(source, *rest)` shaped `(batch, *out)` with examples independent:
    the per-example Jacobian, shaped `(batch, *out, *source.shape[1:])`: one
    backward pass of the batch sum per output element. Returned detached."""
    fresh = source.detach().requires_grad_(True)
    with torch.enable_grad():
        value = fn(fresh, *rest)
        summed = value.sum(dim=0).reshape(-1)
        rows = []
        for i in range(summed.shape[0]):
            g = torch.autograd.grad(summed[i], fresh, retain_graph=True, allow_unused=True)[0] \
                if summed.requires_grad else None
            rows.append(torch.zeros_like(fresh) if g is None else g.detach())
    j = torch.stack(rows, dim=1) if rows else torch.zeros((fresh.shape[0], 0, *fresh.shape[1:]),
                                                          dtype=fresh.dtype)
    return j.reshape((fresh.shape[0], *value.shape[1:], *fresh.shape[1:]))


def tape_gradient(target: Any, sources: list, create_graph: bool) -> list:
    """`torch.autograd.grad` of `target` (summed) for `gp.Tape`: `None` for a
    source `target` does not depend on. The graph is kept (a tape may be
    persistent, and an outer tape differentiates through the same forward pass)."""
    wanted = [i for i, s in enumerate(sources) if s.requires_grad]
    out: list = [None] * len(sources)
    if not wanted or not target.requires_grad:
        return out
    with torch.enable_grad():
        found = torch.autograd.grad(target.sum(), [sources[i] for i in wanted],
                                    retain_graph=True, create_graph=create_graph,
                                    allow_unused=True)
    for i, g in zip(wanted, found):
        out[i] = g
    return out


def enable_grad() -> Any:
    """A context in which autograd records (`torch.enable_grad()`)."""
    return torch.enable_grad()


def watch(tensor: Any) -> Any:
    """Makes a leaf tensor require a gradient (a non-leaf is already recorded);
    returns it."""
    if not tensor.requires_grad:
        if tensor.grad_fn is not None or not tensor.is_leaf:
            return tensor
        tensor.requires_grad_(True)
    return tensor


def tape_probe(x: Any) -> Any:
    """`x` as the rest of the forward pass sees it, differentiable by `gp.Tape`:
    a view of `x` in the autograd graph, or a new leaf when nothing before `x`
    required a gradient. `x`'s Keras mask is carried over."""
    probe = Probe()
    return add_probe(x, probe)


# ------------------------------------------------------------ targets
argmax_int32 = _keras_ops.argmax_int32
per_row = _keras_ops.per_row


def in_graph() -> bool:
    """Never: Keras runs PyTorch eagerly (torch.compile's fakes are told apart per value)."""
    return False


def is_floating(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def target_argument(value: Any) -> Any:
    """A target argument as a tensor on the model's device (a tensor stays as it is)."""
    if keras.ops.is_tensor(value):
        return value
    return keras.ops.convert_to_tensor(value)


def target_arguments_shareable() -> bool:
    return False
