"""The recorder of layer calls: while one forward pass of the model runs (its own
call, each requested layer's `call` wrapped by `gradprobe.core._patch`), it sees
every call of the hooked layers, in order, and adds a probe to the outputs of
the requested ones (a zero tensor whose gradient is the activation's).

`LayerCallRecorder` is the one recorder: it numbers each layer's calls, keeps
their order (the clock), leaves calls inside backend control flow alone (noted,
never probed) and replaces one call's output (`gradients_at`). What a probe is
differs by capture, in three small subclasses: `TapeRecorder` (the tape capture,
and `gp.Tape` and `gp.per_example_norms` on TensorFlow), `FunctionalRecorder`
(the functional capture and `gp.functional`) and `AutogradTapeRecorder` (`gp.Tape`
on PyTorch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras

from gradprobe import backends
from gradprobe.core.inputs import is_floating_tensor
from gradprobe.errors import GradprobeError


@dataclass
class LayerCall:
    """One recorded call of a layer: its `index` among that layer's calls, each
    output leaf as `(value the model consumed, probe or None)`, and its `clock`
    (the order of calls in the forward pass)."""

    layer_id: int
    index: int
    leaves: list[tuple[Any, Any]]
    clock: int


class LayerCallRecorder:
    """Sees every call of the hooked layers during one forward pass (or one trace
    of it). Layers in `probe_ids` are recorded (`calls`); `replace` is
    `(layer id, call or None, values)`: that call's output replaced by `values`."""

    def __init__(self, bk: Any, probe_ids: set[int]):
        self.bk = bk
        self.probe_ids = probe_ids
        self.origin = backends.Origin()
        self.calls: list[LayerCall] = []
        self.counts: dict[int, int] = {}
        self.first_clock: dict[int, int] = {}
        self.clock = 0
        self.in_control_flow: dict[int, str] = {}  # layer id -> the control-flow function
        self.replace: tuple | None = None

    def in_flow(self, layer: Any) -> bool:
        """Whether this call runs inside backend control flow (a loop or branch body:
        never captured, and reported by `assembly.collect_entries`); noted if so."""
        flow = self.bk.control_flow(self.origin)
        if flow is None:
            return False
        self.in_control_flow.setdefault(id(layer), flow)
        return True

    def count(self, layer: Any) -> tuple[int, int]:
        """`(layer id, index of this call among the layer's calls)`."""
        lid = id(layer)
        index = self.counts.get(lid, 0)
        self.counts[lid] = index + 1
        return lid, index

    def tick(self, lid: int) -> int:
        """The clock of this call (its place in the forward pass)."""
        self.first_clock.setdefault(lid, self.clock)
        clock, self.clock = self.clock, self.clock + 1
        return clock

    def replaced(self, layer: Any, lid: int, index: int, outputs: Any) -> Any:
        """`outputs`, or the replacement when this is the replaced call."""
        if self.replace is None or lid != self.replace[0]:
            return outputs
        _, call, values = self.replace
        if call is None and index:
            raise GradprobeError(
                f"Layer {layer.name!r} is called more than once; its activation cannot be "
                f"replaced unambiguously. Choose one call: '{layer.name}@0', "
                f"'{layer.name}@1', ...")
        if call is not None and index != call:
            return outputs
        return self.replacement_for(layer, outputs, values)

    def replacement_for(self, layer: Any, outputs: Any, values: Any) -> Any:
        """`values` as the output they replace (the capture's cast and checks)."""
        raise NotImplementedError  # (each subclass that replaces says how)

    def calls_of(self, layer: Any) -> list[LayerCall]:
        return [c for c in self.calls if c.layer_id == id(layer)]

    def close(self) -> None:
        """Lets go of the frames the recording started from (no call is hooked
        after the recording ends)."""
        self.origin.close()


def _packed(outputs: Any, leaves: list[Any], new: list[Any]) -> Any:
    if len(leaves) == 1 and not isinstance(outputs, (list, tuple, dict)):
        return new[0]
    return keras.tree.pack_sequence_as(outputs, new)


class TapeRecorder(LayerCallRecorder):
    """The tape capture's recorder (TensorFlow): each floating output leaf of a
    recorded call gets a probe watched on `tape`. Layers in `input_ids` also have
    the first argument of each call kept (`inputs_of`), for methods that need a
    layer's input as well as its output gradient."""

    def __init__(self, tape: Any, probe_ids: set[int], input_ids: frozenset[int] = frozenset()):
        super().__init__(backends.get(), probe_ids)  # (the tape backend: CAPTURE == "tape")
        self.tape = tape
        self.input_ids = input_ids
        self.inputs_of: dict[tuple[int, int], Any] = {}
        self.context = self.bk.capture_context()
        self.returned: list[tuple[int, list[Any]]] = []  # (layer id, output leaves)

    def replacement_for(self, layer: Any, outputs: Any, values: Any) -> Any:
        return self.bk.cast_like(values, outputs)

    def hook(self, layer: Any, outputs: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # (a control-flow body, compiled: another graph; eager: run inline)
        if self.in_flow(layer) or not self.bk.in_capture_context(self.context):
            return outputs
        lid, index = self.count(layer)
        if lid in self.input_ids:
            self.inputs_of[(lid, index)] = args[0] if args else next(iter((kwargs or {}).values()))
        outputs = self.replaced(layer, lid, index, outputs)
        clock = self.tick(lid)
        if lid not in self.probe_ids:
            self.returned.append((lid, keras.tree.flatten(outputs)))
            return outputs
        leaves = keras.tree.flatten(outputs)
        recorded, new = [], []
        for leaf in leaves:
            if self.bk.is_floating(leaf):
                value, probe = self.bk.probe(self.tape, leaf)
            else:
                value, probe = leaf, None
            recorded.append((value, probe))
            new.append(value)
        self.calls.append(LayerCall(lid, index, recorded, clock))
        self.returned.append((lid, new))
        return _packed(outputs, leaves, new)

    def producers(self, tensors: Any) -> set[int]:
        """Ids of the layers whose call returned one of `tensors`."""
        wanted = {id(t) for t in keras.tree.flatten(tensors)}
        return {lid for lid, leaves in self.returned if any(id(t) in wanted for t in leaves)}


class FunctionalRecorder(LayerCallRecorder):
    """The functional capture's recorder, during one trace of the forward pass.

    Discovery (`table is None`): records each call (shapes and dtypes of its
    output leaves, its clock) and returns outputs unchanged. Probing: adds
    `probes[key]` to the output leaves the table names and keeps the probed
    values (the activations) under their keys.
    """

    def __init__(self, bk: Any, probe_ids: set[int], table: dict | None = None,
                 probes: dict | None = None):
        super().__init__(bk, probe_ids)
        self.table = table
        self.probes = probes
        self.returned: list[tuple[int, list[int]]] = []
        self.leaves_of: dict[int, list[list[Any]]] = {}
        self.values: dict[str, Any] = {}
        self.target_meta: dict = {}
        self.producers: set[int] = set()

    def replacement_for(self, layer: Any, outputs: Any, values: Any) -> Any:
        leaves = keras.tree.flatten(outputs)
        if len(leaves) != 1 or tuple(leaves[0].shape) != tuple(values.shape):
            raise GradprobeError(
                f"The replacement for layer {layer.name!r}'s output must have its shape "
                f"{[tuple(t.shape) for t in leaves]}; got {tuple(values.shape)}.")
        return keras.ops.cast(values, leaves[0].dtype)

    def hook(self, layer: Any, outputs: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self.in_flow(layer):  # (lax.scan for RNN cells: never probed)
            return outputs
        lid, index = self.count(layer)
        outputs = self.replaced(layer, lid, index, outputs)
        if self.table is not None:
            return self._probe(lid, index, outputs)
        clock = self.tick(lid)
        leaves = keras.tree.flatten(outputs)
        if lid not in self.probe_ids:
            self.returned.append((lid, [id(t) for t in leaves]))
            return outputs
        recorded = [(AbstractLeaf(leaf), (lid, index, j) if is_floating_tensor(leaf) else None)
                    for j, leaf in enumerate(leaves)]
        self.calls.append(LayerCall(lid, index, recorded, clock))
        self.returned.append((lid, [id(t) for t in leaves]))
        self.leaves_of.setdefault(lid, []).append(leaves)
        return outputs

    def _probe(self, lid: int, index: int, outputs: Any) -> Any:
        """A run's hook (after discovery): adds the probes the table names to
        this call's output leaves; keeps the leaves of each call (for the
        `output=` layer). Clocks and producers were learnt by discovery."""
        single = self.bk.is_array(outputs)  # (a tensor, or a tracer on JAX)
        leaves = [outputs] if single else keras.tree.flatten(outputs)
        new = []
        for j, leaf in enumerate(leaves):
            key = self.table.get((lid, index, j))
            if key is not None:
                leaf = self.bk.add_probe(leaf, self.probes[key])
                self.values[key] = leaf
            new.append(leaf)
        self.leaves_of.setdefault(lid, []).append(new)
        if single:
            return new[0]
        return keras.tree.pack_sequence_as(outputs, new)

    def output_layer_value(self, plan: Any) -> Any:
        if plan.output_layer is None:
            return None
        calls = self.leaves_of.get(id(plan.output_layer), [])
        if not calls:
            return None
        if len(calls) > 1:
            raise GradprobeError(
                f"output={plan.output!r} names a layer the forward pass calls {len(calls)} "
                "times; the target would be ambiguous. Use a callable target on the model "
                "output.")
        return calls[0][0] if len(calls[0]) == 1 else calls[0]


@dataclass(frozen=True)
class AbstractLeaf:
    """The shape and dtype of a traced value (what `assembly.collect_entries` reads)."""

    shape: tuple
    dtype: Any

    def __init__(self, leaf: Any):
        object.__setattr__(self, "shape", tuple(leaf.shape))
        object.__setattr__(self, "dtype", getattr(leaf, "dtype", None))


class AutogradTapeRecorder(LayerCallRecorder):
    """The watched layer calls of a `gp.Tape` block where the tape is autograd's
    graph (PyTorch): each floating output leaf replaced by a view
    (`tape_probe`) that is both the value the rest of the pass consumes and the
    tensor differentiated. Calls in Keras' control flow (an RNN's step loop) are
    left alone, as on the other backends."""

    def hook(self, layer: Any, outputs: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if id(layer) not in self.probe_ids or self.in_flow(layer):
            return outputs
        lid, index = self.count(layer)
        leaves = keras.tree.flatten(outputs)
        recorded, new = [], []
        for leaf in leaves:
            if is_floating_tensor(leaf):
                leaf = self.bk.tape_probe(leaf)
                recorded.append((leaf, leaf))
            else:
                recorded.append((leaf, None))
            new.append(leaf)
        self.calls.append(LayerCall(lid, index, recorded, self.tick(lid)))
        return _packed(outputs, leaves, new)
