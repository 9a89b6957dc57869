"""`gp.Tape`: a `tf.GradientTape` that knows the model's layers."""

from __future__ import annotations

import contextlib
from typing import Any

import keras
import numpy as np

from gradprobe import backends
from gradprobe.core import _patch, _validate
from gradprobe.core.capture.recorder import AutogradTapeRecorder, TapeRecorder
from gradprobe.core.inputs import is_floating_tensor
from gradprobe.core.keys import input_keys
from gradprobe.core.plan import to_specs
from gradprobe.core.selectors import LayerTree, resolve
from gradprobe.errors import GradprobeError, quoted


class Tape:
    """Records a forward pass you write yourself, with every watched layer's
    output captured (per call) so you can use activations in losses and take
    gradients by layer name.

    Inside the `with` block, call the model (and any other code) as usual.
    Afterwards, `tape.activation("name")` is the very tensor the rest of the
    forward pass consumed, and `tape.gradient(target, sources)` accepts layer
    names, weight names (`"dense.kernel"`), `"inputs"`, patterns, layer objects,
    variables and plain tensors, in any mix, returning them in the structure
    given. A layer called more than once (a shared layer, or a model called
    several times in the block) has one entry per call: `"name@0"`, `"name@1"`.

    Nested tapes give exact higher-order gradients: a gradient taken by an inner
    tape inside an outer tape's block is differentiable by the outer tape.

    On PyTorch the tape is autograd's graph: the captured activations are views
    of the layer outputs, `tape.gradient` is `torch.autograd.grad` (with
    `create_graph=True` when `differentiable=True`, keeping the graph so that
    an outer tape, or a persistent one, can differentiate again), and write the
    loss with `torch` or `keras.ops`. Autograd records outside the block as
    well, so a value computed after the block from the captured activations is
    differentiable there. On JAX, which has no tape, use `gp.functional`.

    Args:
        model: The Keras model whose layers are watched.
        watch: Selectors as in `gp.gradients(wrt=...)`; default `"*"` (every leaf
            layer). Add `"inputs"` to differentiate with respect to the model
            input, or container layers by name; `[]` watches no layer. Trainable
            variables are always watched, as by `tf.GradientTape`.
        persistent: Allow several `gradient` calls.

    Example (TensorFlow, PyTorch):

    >>> model = keras.Sequential([keras.Input((3,)),
    ...                           keras.layers.Dense(4, activation="tanh", name="l1"),
    ...                           keras.layers.Dense(2, name="l2")])
    >>> x = np.ones((5, 3), "float32")
    >>> with gp.Tape(model, watch=["l1", "inputs"]) as tape:
    ...     y = model(x)
    ...     loss = keras.ops.sum(y) + keras.ops.sum(tape.activation("l1") ** 2)
    >>> g = tape.gradient(loss, ["l1", "l2.kernel", "inputs"])
    >>> [tuple(t.shape) for t in g]
    [(5, 4), (4, 2), (5, 3)]
    """

    def __init__(self, model: keras.Model, watch: Any = "*", persistent: bool = False):
        _validate.backend_supported("gp.Tape", backends.FUNCTIONAL)
        if backends.get().TAPE is None:  # (JAX)
            raise GradprobeError(
                f"gp.Tape is not available on the {backends.name()!r} backend of Keras: it "
                "has no tape. "
                "Write chained and second-order gradients with gp.functional(model, x, "
                "target, wrt=...), the probed forward pass as a pure function of (probes, "
                "variables, inputs) to compose with jax.grad / jax.jvp (gp.gradients, too, "
                "is differentiable under jax.grad). gp.Tape runs on TensorFlow and PyTorch.")
        _validate.model(model)
        _validate.flag("persistent", persistent, "whether several gradients can be taken")
        self.model = model
        self.persistent = persistent
        self._watch = watch
        self._tree: LayerTree | None = None
        self._tape: Any = None
        self._recorder: TapeRecorder | None = None
        self._stack: contextlib.ExitStack | None = None
        self._inputs: list[list[tuple[str, Any]]] = []  # per model call: (key, probe)
        self._state = "new"
        self._used = False
        self._bk: Any = None  # the PyTorch primitives, on that backend

    # ------------------------------------------------------------------ block
    def __enter__(self) -> Tape:
        if self._state != "new":
            raise GradprobeError("A gp.Tape can be entered once; create a new one.")
        if backends.get().TAPE == "autograd":
            return self._enter_torch()
        acts, vars_, inputs = self._resolve_watch()
        self._acts = acts
        self._tape = backends.get().new_tape(persistent=True, watch_accessed_variables=True)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self._tape)
        self._recorder = TapeRecorder(self._tape, {id(a.layer) for a in acts})
        return self._record(acts, inputs, vars_)

    def _resolve_watch(self) -> tuple[list, list, list]:
        self._tree = LayerTree(self.model)
        empty = self._watch is None or (isinstance(self._watch, (list, tuple))
                                        and not self._watch)
        return ([], [], []) if empty else to_specs(self._tree, resolve(self._tree, self._watch))

    def _enter_torch(self) -> Tape:
        """PyTorch: autograd records; the hooks make each watched layer output (and
        input) a view whose gradient `torch.autograd.grad` can take."""
        self._bk = backends.get()
        acts, _, inputs = self._resolve_watch()
        self._acts = acts
        self._recorder = AutogradTapeRecorder(self._bk, {id(a.layer) for a in acts})
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self._bk.enable_grad())
        return self._record(acts, inputs)

    def _record(self, acts: list, inputs: list, vars_: list = ()) -> Tape:
        """Watches `vars_` (TensorFlow's tape) and hooks the watched layers (and the
        inputs) into the open stack: the block records from here; anything that
        fails closes the stack."""
        assert self._stack is not None and self._recorder is not None
        try:
            for v in vars_:
                backends.get().watch(self._tape, v.var)
            self._stack.enter_context(
                _patch.wrapped_calls([a.layer for a in acts], self._recorder.hook))
            if inputs:
                self._stack.enter_context(_patch.wrapped_inputs(self.model, self._probe_inputs))
        except BaseException:
            self._stack.close()
            raise
        self._state = "recording"
        return self

    def __exit__(self, *exc: Any) -> None:
        self._state = "closed"
        assert self._stack is not None
        self._stack.close()
        if self._recorder is not None:
            self._recorder.close()

    def _probe_inputs(self, inputs: Any) -> Any:
        torch_mode = self._bk is not None
        if not torch_mode and not backends.get().in_capture_context(self._recorder.context):
            return inputs
        keys = input_keys(inputs)
        leaves = keras.tree.flatten(inputs)
        call, new = [], []
        for key, leaf in zip(keys, leaves):
            if torch_mode:
                if isinstance(leaf, np.ndarray) and leaf.dtype.kind == "f":
                    leaf = keras.ops.convert_to_tensor(leaf)  # (as the model would)
                if is_floating_tensor(leaf):
                    value = self._bk.tape_probe(leaf)
                    call.append((key, value))
                    leaf = value
                new.append(leaf)
            elif backends.get().is_floating(leaf):
                value, probe = backends.get().probe(self._tape, leaf)
                call.append((key, probe))
                new.append(value)
            else:
                new.append(leaf)
        self._inputs.append(call)
        if len(leaves) == 1 and not isinstance(inputs, (list, tuple, dict)):
            return new[0]
        return keras.tree.pack_sequence_as(inputs, new)

    def watch(self, tensor: Any) -> None:
        """Watches a plain tensor, like `tf.GradientTape.watch`."""
        if self._state != "recording":
            raise GradprobeError("tape.watch must be called inside the `with` block.")
        if self._bk is not None:
            if not is_floating_tensor(tensor):
                raise _validate.fail("tensor", tensor, "a floating-point tensor to watch.")
            self._bk.watch(tensor)
            return
        backends.get().watch(self._tape, tensor)

    # ------------------------------------------------------------- captured
    def keys(self) -> list[str]:
        """The keys of every captured activation and input, in call order."""
        return list(self._captured())

    def _captured(self) -> dict[str, tuple[Any, str]]:
        """key -> (probe, requested layer path) for every captured call."""
        self._check_recorded("look up captured activations")
        out: dict[str, tuple[Any, str]] = {}
        for spec in self._acts:
            calls = self._recorder.calls_of(spec.layer)
            for call in calls:
                base = f"{spec.path}@{call.index}" if len(calls) > 1 else spec.path
                leaves = call.leaves
                for j, (_, probe) in enumerate(leaves):
                    if probe is not None:
                        out[f"{base}:{j}" if len(leaves) > 1 else base] = (probe, spec.path)
        for i, call in enumerate(self._inputs):
            for key, probe in call:
                k = key if len(self._inputs) == 1 else key.replace("inputs", f"inputs@{i}", 1)
                out[k] = (probe, "inputs")
        return out

    def activation(self, name: str | Any) -> Any:
        """The captured output of a watched layer (or `"inputs"`), as consumed by
        the rest of the forward pass, so a loss written on it is differentiable.

        Args:
            name: A layer name or path, `"name@i"` for one call of a layer called
                more than once, `"inputs"`, or a layer object.
        """
        keys = self._keys_for(name)
        if len(keys) > 1:
            raise GradprobeError(
                f"{self._label(name)} has {len(keys)} captured values: {quoted(keys)}. "
                "Pick one.")
        return self._captured()[keys[0]][0]

    def _label(self, name: Any) -> str:
        return repr(name) if isinstance(name, str) else repr(getattr(name, "name", name))

    def _keys_for(self, name: Any) -> list[str]:
        captured = self._captured()
        if isinstance(name, str) and name in captured:
            return [name]
        if isinstance(name, str) and (name == "inputs" or name.startswith("inputs")):
            keys = [k for k in captured if captured[k][1] == "inputs"
                    and (name == "inputs" or k == name or k.startswith(name + "@"))]
            if keys:
                return keys
            raise GradprobeError(
                "The model inputs were not captured: add 'inputs' to watch= and call the "
                "model inside the `with gp.Tape(...)` block.")
        node = (self._tree.node_of(name) if isinstance(name, keras.layers.Layer)
                else self._tree.find(str(name).split("@")[0]))
        call = None
        if isinstance(name, str) and "@" in name and name.rsplit("@", 1)[1].isdigit():
            call = int(name.rsplit("@", 1)[1])
        if not any(a.layer is node.layer for a in self._acts):
            raise GradprobeError(
                f"Layer {node.path!r} was not watched by this tape: pass it in watch= "
                f"(watch={[*self._as_list(self._watch), node.path]!r}).")
        keys = [k for k, (_, path) in captured.items() if path == node.path]
        if not keys:
            raise GradprobeError(
                f"Layer {node.path!r} was watched but never called inside the `with` block: "
                "call the model inside the block.")
        if call is not None:
            keys = [k for k in keys if k.split(":")[0] == f"{node.path}@{call}"] or (
                keys if call == 0 and len(keys) == 1 else [])
            if not keys:
                raise GradprobeError(
                    f"{name!r}: layer {node.path!r} has calls {quoted(self._calls(node.path))}.")
        return keys

    def _calls(self, path: str) -> list[str]:
        return [k for k, (_, p) in self._captured().items() if p == path]

    @staticmethod
    def _as_list(watch: Any) -> list:
        return list(watch) if isinstance(watch, (list, tuple)) else [watch]

    def _check_recorded(self, what: str) -> None:
        if self._state == "new":
            raise GradprobeError(
                f"Cannot {what} before the tape has recorded: use `with gp.Tape(model) as "
                "tape:` and call the model inside the block.")

    # -------------------------------------------------------------- gradient
    def gradient(self, target: Any, sources: Any, *, differentiable: bool = True,
                 unconnected: str = "raise") -> Any:
        """Gradients of `target` with respect to `sources`, in the structure given.

        Args:
            target: A tensor computed inside the `with` block (summed if it is not
                a scalar, like `tf.GradientTape.gradient`).
            sources: One source or a list/tuple/dict of them: layer names or paths
                (`"name@i"` for one call), weight selectors (`"dense.kernel"`,
                `"dense.weights"`), `"inputs"`, glob patterns, layer objects,
                variables or plain tensors. An entry that stands for several
                tensors (a pattern, a layer called more than once) becomes a dict
                from key to gradient.
            differentiable: Keep the result differentiable by an outer tape
                (`True`), or treat it as a constant.
            unconnected: `"raise"` or `"zero"`, as in `gp.gradients`.

        Returns:
            The gradients, in the structure of `sources`.
        """
        self._check_recorded("take a gradient")
        if self._used and not self.persistent:
            raise GradprobeError(
                "This gp.Tape is not persistent and has already computed a gradient; use "
                "gp.Tape(model, persistent=True) to take several.")
        _validate.choice("unconnected", unconnected, ("raise", "zero"))
        _validate.flag("differentiable", differentiable)
        for t in keras.tree.flatten(target):
            if self._bk is None:
                _validate.tensor("target", t, "computed inside the `with` block")
            elif not is_floating_tensor(t):
                raise _validate.fail("target", t, "a floating-point tensor, computed from the "
                                                  "recorded forward pass.")
        self._used = True
        if isinstance(sources, dict):
            items = list(sources.values())
        elif isinstance(sources, (list, tuple)):
            items = list(sources)
        else:
            items = [sources]
        groups = [self._expand(item) for item in items]
        flat = [t for group in groups for _, t in group]
        if self._bk is not None:
            flat = [t.value if isinstance(t, keras.Variable) else t for t in flat]
            grads = self._bk.tape_gradient(_summed(target, self._bk), flat, differentiable)
        else:
            grads = self._tape.gradient(target, [backends.get().watchable(t) for t in flat])
            grads = [backends.get().densify(g) for g in grads]
        missing = [(key, t) for (key, t), g in zip([kt for grp in groups for kt in grp], grads)
                   if g is None]
        if missing and unconnected == "raise":
            self._raise_unconnected(target, [k for k, _ in missing])
        if self._bk is not None:
            grads = [keras.ops.zeros_like(t) if g is None else g for t, g in zip(flat, grads)]
            if not differentiable:
                grads = self._bk.stop_gradient(grads)
        else:
            grads = [backends.get().zeros_like(t) if g is None else g for t, g in zip(flat, grads)]
            if not differentiable:
                grads = [backends.get().stop_gradient(g) for g in grads]
        it = iter(grads)
        results = []
        for group in groups:
            values = {key: next(it) for key, _ in group}
            results.append(next(iter(values.values())) if len(values) == 1 else values)
        if isinstance(sources, dict):
            return dict(zip(sources.keys(), results))
        if isinstance(sources, (list, tuple)):
            return type(sources)(results)
        return results[0]

    def _expand(self, item: Any) -> list[tuple[str, Any]]:
        """(key, tensor or variable) pairs that one source item stands for."""
        is_tensor = keras.ops.is_tensor if self._bk is not None else backends.get().is_tensor
        if is_tensor(item) and not isinstance(item, keras.Variable):
            return [(getattr(item, "name", "tensor"), item)]
        if isinstance(item, keras.Variable):
            return [(self._tree.variable_key(item), item)]
        if isinstance(item, str) and ("." in item or any(c in item for c in "*?[")):
            text = item
            if not (text in self._tree.by_path or text == "inputs"):
                watched = {id(a.layer) for a in self._acts}
                captured = self._captured()
                out = []
                for src in resolve(self._tree, text):
                    if hasattr(src, "var"):
                        out.append((src.key, src.var))
                    elif id(src.node.layer) in watched or src.explicit:
                        out.extend((k, captured[k][0]) for k in self._keys_for(src.node.layer))
                if not out:
                    raise GradprobeError(
                        f"Pattern {text!r} matches no layer watched by this tape; watched: "
                        f"{quoted(a.path for a in self._acts)}.")
                return out
        captured = self._captured()
        return [(k, captured[k][0]) for k in self._keys_for(item)]

    def _raise_unconnected(self, target: Any, keys: list[str]) -> None:
        recorded = [p for p, _ in self._captured().values()]
        if self._bk is not None:
            params = [v.value for v in self.model.trainable_variables]
            if all(g is None for g in self._bk.tape_gradient(_summed(target, self._bk), recorded + params,
                                                             False)):
                raise GradprobeError(
                    f"The target does not depend on anything this gp.Tape recorded (asked for "
                    f"{quoted(keys)}), nor on the model's weights: compute it from the "
                    "forward pass run inside the `with gp.Tape(model) as tape:` block.")
            raise GradprobeError(
                f"The target does not depend on {quoted(keys)}: those sources are not on the "
                "path from the recorded computation to the target (on PyTorch, a model call "
                "made after the block is not captured). Remove them, or pass "
                "unconnected='zero'.")
        watched = [v for v in getattr(self._tape, "watched_variables", lambda: [])()]
        probe = self._tape.gradient(target, recorded + list(watched)) if recorded or watched \
            else []
        if all(g is None for g in probe):
            raise GradprobeError(
                f"The target does not depend on anything this gp.Tape recorded (asked for "
                f"{quoted(keys)}). Most likely it, or an activation it uses, was computed "
                "outside the `with gp.Tape(model) as tape:` block, where nothing is "
                "recorded: compute it inside the block.")
        raise GradprobeError(
            f"The target does not depend on {quoted(keys)}: those sources are not on the "
            "path from the recorded computation to the target. Remove them, or pass "
            "unconnected='zero'.")


def _summed(target: Any, bk: Any) -> Any:
    """The sum of every element of `target` (a tensor or a structure of them), as
    `tf.GradientTape.gradient` differentiates it (recorded even under the
    caller's `torch.no_grad()`)."""
    leaves = keras.tree.flatten(target)
    with bk.enable_grad():
        total = keras.ops.sum(leaves[0])
        for t in leaves[1:]:
            total = total + keras.ops.sum(t)
    return total
