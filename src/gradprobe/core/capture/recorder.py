"""The recorder of layer calls: while one forward pass of the model runs (its own
call, each requested layer's `call` wrapped by `gradprobe.core._patch`), it sees
every call of the hooked layers, in order, and adds a probe to the outputs of
the requested ones (a zero tensor whose gradient is the activation's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras

from gradprobe import backends
from gradprobe.core.capture.functional_steps import replaced
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


class Recorder:
    """The tape strategy's recorder (TensorFlow): collects probed layer outputs
    while one forward pass runs.

    Layers in `probe_ids` get their outputs probed; layers in `input_ids` also
    have the first argument of each call kept (`inputs_of`), for methods that
    need a layer's input as well as its output gradient.
    """

    def __init__(self, tape: Any, probe_ids: set[int], input_ids: frozenset[int] = frozenset()):
        self.tape = tape
        self.probe_ids = probe_ids
        self.input_ids = input_ids
        self.inputs_of: dict[tuple[int, int], Any] = {}
        self.bk = bk = backends.get()  # (the tape backend: CAPTURE == "tape")
        self.context = bk.capture_context()
        self.calls: list[LayerCall] = []
        self.counts: dict[int, int] = {}
        self.first_clock: dict[int, int] = {}
        self.returned: list[tuple[int, list[Any]]] = []  # (layer id, output leaves)
        self.clock = 0
        self.origin = backends.Origin()
        self.in_control_flow: dict[int, str] = {}  # layer id -> the control-flow function
        self.replace_id: int | None = None  # this layer's output is replaced ...
        self.replace_call: int | None = None  # ... in this call (None: its only call) ...
        self.replacement: Any = None  # ... by this tensor

    def hook(self, layer: Any, outputs: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        flow = self.bk.control_flow(self.origin)
        if flow is not None:
            # A loop or branch body (compiled: another graph; eager: run inline):
            # never captured, in either mode, and reported by `assembly.collect_entries`.
            self.in_control_flow.setdefault(id(layer), flow)
            return outputs
        if not self.bk.in_capture_context(self.context):
            return outputs
        lid = id(layer)
        index = self.counts.get(lid, 0)
        self.counts[lid] = index + 1
        if lid in self.input_ids:
            self.inputs_of[(lid, index)] = args[0] if args else next(iter((kwargs or {}).values()))
        if lid == self.replace_id:
            if self.replace_call is None and index:
                raise GradprobeError(
                    f"Layer {layer.name!r} is called more than once; its activation cannot be "
                    f"replaced unambiguously. Choose one call: '{layer.name}@0', "
                    f"'{layer.name}@1', ...")
            if self.replace_call is None or index == self.replace_call:
                outputs = self.bk.cast_like(self.replacement, outputs)
        self.first_clock.setdefault(lid, self.clock)
        clock, self.clock = self.clock, self.clock + 1
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
        if len(leaves) == 1 and not isinstance(outputs, (list, tuple, dict)):
            return new[0]
        return keras.tree.pack_sequence_as(outputs, new)

    def close(self) -> None:
        """Lets go of the frames the recording started from (no call is hooked
        after the recording ends)."""
        self.origin = backends.Origin.empty()

    def calls_of(self, layer: Any) -> list[LayerCall]:
        return [c for c in self.calls if c.layer_id == id(layer)]

    def producers(self, tensors: Any) -> set[int]:
        """Ids of the layers whose call returned one of `tensors`."""
        wanted = {id(t) for t in keras.tree.flatten(tensors)}
        return {lid for lid, leaves in self.returned if any(id(t) in wanted for t in leaves)}


class FunctionalRecorder:
    """Sees every call of the hooked layers during one trace of the forward pass.

    Discovery (`table is None`): records each call (shapes and dtypes of its
    output leaves, its clock) and returns outputs unchanged. Probing: adds
    `probes[key]` to the output leaves the table names and keeps the probed
    values (the activations) under their keys.
    """

    def __init__(self, bk: Any, probe_ids: set[int], table: dict | None = None,
                 probes: dict | None = None):
        self.bk = bk
        self.probe_ids = probe_ids
        self.table = table
        self.probes = probes
        self.origin = backends.Origin()
        self.calls: list[LayerCall] = []
        self.counts: dict[int, int] = {}
        self.first_clock: dict[int, int] = {}
        self.returned: list[tuple[int, list[int]]] = []
        self.leaves_of: dict[int, list[list[Any]]] = {}
        self.in_control_flow: dict[int, str] = {}
        self.values: dict[str, Any] = {}
        self.clock = 0
        self.target_meta: dict = {}
        self.producers: set[int] = set()
        self.replace: tuple | None = None  # (layer id, call or None, values): see gradients_at

    def hook(self, layer: Any, outputs: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        flow = self.bk.control_flow(self.origin)
        if flow is not None:
            # A loop or branch body traced by the backend (lax.scan for RNN cells):
            # never probed; `assembly.collect_entries` reports it.
            self.in_control_flow.setdefault(id(layer), flow)
            return outputs
        lid = id(layer)
        index = self.counts.get(lid, 0)
        self.counts[lid] = index + 1
        if self.replace is not None and lid == self.replace[0]:
            outputs = replaced(layer, index, outputs, *self.replace[1:])
        if self.table is not None:
            return self._probe(lid, index, outputs)
        self.first_clock.setdefault(lid, self.clock)
        clock, self.clock = self.clock, self.clock + 1
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

    def calls_of(self, layer: Any) -> list[LayerCall]:
        return [c for c in self.calls if c.layer_id == id(layer)]

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

    def close(self) -> None:
        self.origin.close()


@dataclass(frozen=True)
class AbstractLeaf:
    """The shape and dtype of a traced value (what `assembly.collect_entries` reads)."""

    shape: tuple
    dtype: Any

    def __init__(self, leaf: Any):
        object.__setattr__(self, "shape", tuple(leaf.shape))
        object.__setattr__(self, "dtype", getattr(leaf, "dtype", None))


class TorchTapeRecorder:
    """The watched layer calls of a `gp.Tape` block on PyTorch: each floating
    output leaf replaced by a view (`backends.torch.tape_probe`) that is both the
    value the rest of the pass consumes and the tensor differentiated. Calls in
    Keras' control flow (an RNN's step loop) are left alone, as on the other
    backends."""

    def __init__(self, bk: Any, probe_ids: set[int]):
        self.bk = bk
        self.probe_ids = probe_ids
        self.origin = backends.Origin()
        self.calls: list[LayerCall] = []
        self.counts: dict[int, int] = {}
        self.clock = 0

    def hook(self, layer: Any, outputs: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if id(layer) not in self.probe_ids or self.bk.control_flow(self.origin) is not None:
            return outputs
        lid = id(layer)
        index = self.counts.get(lid, 0)
        self.counts[lid] = index + 1
        leaves = keras.tree.flatten(outputs)
        recorded, new = [], []
        for leaf in leaves:
            if is_floating_tensor(leaf):
                leaf = self.bk.tape_probe(leaf)
                recorded.append((leaf, leaf))
            else:
                recorded.append((leaf, None))
            new.append(leaf)
        self.calls.append(LayerCall(lid, index, recorded, self.clock))
        self.clock += 1
        if len(leaves) == 1 and not isinstance(outputs, (list, tuple, dict)):
            return new[0]
        return keras.tree.pack_sequence_as(outputs, new)

    def calls_of(self, layer: Any) -> list[LayerCall]:
        return [c for c in self.calls if c.layer_id == id(layer)]

    def close(self) -> None:
        self.origin.close()
