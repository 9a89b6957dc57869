"""What to differentiate with respect to: resolving `wrt` selectors.

A selector is one of

* `"name"`, a nested path `"encoder/block1/conv"`, or a unique path suffix:
  that layer's output (its activation), every call of it;
* `"name@i"`: only the `i`-th call of a layer the forward pass calls more than once;
* `"name.kernel"`, `"name.bias"`, `"name.gamma"`, ...: one variable of that layer
  (looked up in the layer itself first, then in its sublayers);
  `"name.weights"`: all trainable variables of that layer;
* `"inputs"` (every model input) or `"inputs:k"` (one input, by index or dict key);
* glob patterns: `"conv*"`, `"*"` (activations of the matching leaf layers);
  `"*.kernel"`, `"block1/*.weights"` (variables of every matching layer, leaf or
  not, the model itself included: `"*.weights"` is exactly
  `model.trainable_variables`);
* a layer object or a variable object.

Leaf layers are layers without sublayers, plus the built-in Keras layers whose
sublayers are internal (RNNs, `Bidirectional`, `MultiHeadAttention`, ...).
Every variable has one key, `"<owner path>.<name>"`, where the owner is the
innermost layer that tracks it (`"embed.class_token"`, `"lstm/lstm_cell.kernel"`);
a variable of the model itself is keyed `"<model name>.<name>"`. That key is the
one spelling gradprobe prints (results, `GradientMonitor` history, CSV and
TensorBoard tags); a variable's Keras path (`v.path`, `"sequential/dense/kernel"`)
or a unique `/`-suffix of it (`"dense/kernel"`) also selects it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras

from gradprobe.backends import _keras_private
from gradprobe.core import _validate
from gradprobe.errors import GradprobeError, closest, quoted

_CALL_INDEX = re.compile(r"^(?P<layer>.+)@(?P<call>\d+)$")
_GLOB_CHARS = set("*?[")


@dataclass(eq=False)
class LayerNode:
    """One layer instance in a model's layer tree."""

    layer: Any
    path: str
    parent: LayerNode | None
    children: list[LayerNode] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    sublayers: list[Any] = field(default_factory=list)  # direct sublayers, shared ones too

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def kind(self) -> str:
        return type(self.layer).__name__

    @property
    def is_input(self) -> bool:
        return isinstance(self.layer, keras.layers.InputLayer)

    @property
    def is_leaf(self) -> bool:
        if not self.children:
            return True
        return _is_builtin(self.layer) and not isinstance(self.layer, keras.Model)

    def loop_ancestor(self) -> LayerNode | None:
        """The RNN layer that calls this layer inside its time loop, if any."""
        node = self.parent
        while node is not None:
            if isinstance(node.layer, keras.layers.RNN):
                return node
            node = node.parent
        return None


def _is_builtin(layer: Any) -> bool:
    return type(layer).__module__.startswith("keras.")


def _children(layer: Any) -> list[Any]:
    return _keras_private.child_layers(layer)  # private Keras API, see there


class LayerTree:
    """The layers of a model, each instance once, with paths from the model."""

    def __init__(self, model: Any):
        self.model = model
        self.root = LayerNode(model, model.name, None)
        self.nodes: list[LayerNode] = []
        self.by_id: dict[int, LayerNode] = {id(model): self.root}
        self._walk(self.root)
        self.by_path = {alias: n for n in self.nodes for alias in [n.path, *n.aliases]}
        self._var_owner: dict[int, tuple[LayerNode, Any]] | None = None

    def _walk(self, parent: LayerNode) -> None:
        parent.sublayers = _children(parent.layer)
        for child in parent.sublayers:
            path = child.name if parent is self.root else f"{parent.path}/{child.name}"
            known = self.by_id.get(id(child))
            if known is not None:  # shared instance tracked by two parents
                known.aliases.append(path)
                continue
            node = LayerNode(child, path, parent)
            parent.children.append(node)
            self.by_id[id(child)] = node
            self.nodes.append(node)
            self._walk(node)

    # ---------------------------------------------------------------- lookup
    def leaves(self) -> list[LayerNode]:
        """Leaf layers, excluding Input layers and layers internal to an RNN."""
        out = []
        for n in self.nodes:
            if n.is_input or n.loop_ancestor() is not None:
                continue
            if n.is_leaf and not self._under_leaf(n):
                out.append(n)
        return out

    def _under_leaf(self, node: LayerNode) -> bool:
        parent = node.parent
        while parent is not None and parent is not self.root:
            if parent.is_leaf:
                return True
            parent = parent.parent
        return False

    def all_names(self) -> list[str]:
        return [n.name for n in self.nodes] + [n.path for n in self.nodes]

    def find(self, name: str) -> LayerNode:
        """The layer called `name`: a full path, a unique bare name or path suffix."""
        if name == self.root.name:
            return self.root
        node = self.by_path.get(name)
        if node is not None:
            return node
        relative = name
        if name.startswith(self.root.name + "/"):
            # A Keras path printed from the model's side (`sequential/dense`, as in
            # `v.path`): gradprobe's paths are relative to the model.
            relative = name[len(self.root.name) + 1:]
            node = self.by_path.get(relative)
            if node is not None:
                return node
        for matches in (
            [n for n in self.nodes if n.name == relative],
            [n for n in self.nodes if n.path.endswith("/" + relative)],
        ):
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise GradprobeError(
                    f"Layer name {name!r} is ambiguous: {len(matches)} layers in model "
                    f"{self.root.name!r} match it: {quoted(m.path for m in matches)}. "
                    "Use the full path."
                )
        layers = [n for n in self.nodes if not n.is_input]
        hint = closest(name, [n.name for n in layers] + [n.path for n in layers])
        where = ""
        if "/" in name:
            where = (" A path is relative to the model, outer layer first ('block/conv'); "
                     "a variable is 'layer.variable' or its Keras path (v.path).")
        raise GradprobeError(
            f"Model {self.root.name!r} has no layer named {name!r}."
            + (f" Did you mean {quoted(hint)}?" if hint else "") + where
            + f" Its layers are: {quoted(n.path for n in layers)}."
        )

    def node_of(self, layer: Any) -> LayerNode:
        node = self.by_id.get(id(layer))
        if node is None:
            raise GradprobeError(
                f"Layer {getattr(layer, 'name', layer)!r} ({type(layer).__name__}) is not part "
                f"of model {self.root.name!r}. Pass one of its layers or a layer name."
            )
        return node

    # ------------------------------------------------------------- variables
    def own_variables(self, node: LayerNode) -> list[Any]:
        """Variables of `node` that belong to none of its sublayers (a sublayer it
        shares with another parent included)."""
        inner = {id(v) for c in node.sublayers for v in c.weights}
        return [v for v in node.layer.weights if id(v) not in inner]

    def weight_units(self) -> list[tuple[LayerNode, list[Any]]]:
        """Every layer that owns variables a pattern can match, with those
        variables: each leaf layer with all its variables (its sublayers are
        internal), and the model and each non-leaf layer above the leaves with
        the variables it owns itself (e.g. a `class_token` added with
        `add_weight` next to sublayers). Together they hold every variable of
        the model exactly once."""
        units: list[tuple[LayerNode, list[Any]]] = []
        seen: set[int] = set()
        for node in [self.root, *self.nodes]:
            if node.is_input or (node is not self.root and self._under_leaf(node)):
                continue
            leaf = node is not self.root and node.is_leaf
            own = list(node.layer.weights) if leaf else self.own_variables(node)
            own = [v for v in own if id(v) not in seen]
            seen.update(id(v) for v in own)
            if own:
                units.append((node, own))
        return units

    def owner(self, var: Any) -> LayerNode | None:
        if self._var_owner is None:
            self._var_owner = {}
            for node in [self.root, *self.nodes]:
                for v in self.own_variables(node):
                    self._var_owner.setdefault(id(v), (node, v))
        found = self._var_owner.get(id(var))
        return found[0] if found else None

    def variable_key(self, var: Any) -> str:
        node = self.owner(var)
        short = _short_name(var)
        if node is None:
            return getattr(var, "path", None) or short
        return f"{node.path}.{short}"

    def variable_by_path(self, text: str) -> Any | None:
        """The model variable that `text` names by its Keras path (`v.path`, the
        spelling Keras prints, e.g. `"sequential/dense/kernel"`) or by a unique
        `/`-suffix of it (`"dense/kernel"`); `None` when none or several match.
        Its key (`variable_key`) is the one spelling gradprobe prints."""
        variables = list({id(v): v for v in self.model.weights}.values())
        for found in ([v for v in variables if getattr(v, "path", None) == text],
                      [v for v in variables
                       if (getattr(v, "path", None) or "").endswith("/" + text)]):
            if found:
                return found[0] if len(found) == 1 else None
        return None

    def descendants(self, node: LayerNode) -> Iterator[LayerNode]:
        for child in node.children:
            yield child
            yield from self.descendants(child)


def _short_name(var: Any) -> str:
    name = getattr(var, "name", "") or ""
    return name.split("/")[-1].split(":")[0]


# --------------------------------------------------------------------- sources
@dataclass(frozen=True)
class ActivationSource:
    """The output of a layer (every call, or one call)."""

    node: LayerNode
    call: int | None
    requested: str
    explicit: bool
    also: tuple[str, ...] = ()  # other selectors that named the same source

    @property
    def spec(self) -> tuple:
        return ("act", id(self.node.layer), self.call)


@dataclass(frozen=True)
class WeightSource:
    """One variable."""

    var: Any
    key: str
    node: LayerNode | None
    requested: str
    explicit: bool
    also: tuple[str, ...] = ()  # other selectors that named the same source

    @property
    def spec(self) -> tuple:
        return ("var", id(self.var))


@dataclass(frozen=True)
class InputSource:
    """The model input(s): all of them (`index=None`) or one, by index or dict key."""

    index: int | str | None
    requested: str
    also: tuple[str, ...] = ()

    @property
    def spec(self) -> tuple:
        return ("inp", self.index)


Source = ActivationSource | WeightSource | InputSource


def resolve(tree: LayerTree, wrt: Any) -> list[Source]:
    """Turns a `wrt` argument into a list of sources (duplicates removed: a source
    named by several selectors appears once, with the first in `requested` and the
    others in `also`)."""
    items = _as_list(wrt)
    if not items:
        raise GradprobeError(
            "`wrt` is empty: name at least one source, e.g. wrt='dense' (a layer's "
            "activation), wrt='dense.kernel' (a weight), wrt='inputs', or wrt='*'."
        )
    out: list[Source] = []
    where: dict[tuple, int] = {}
    for item in items:
        for src in _resolve_one(tree, item):
            i = where.get(src.spec)
            if i is None:
                where[src.spec] = len(out)
                out.append(src)
                continue
            # the same source named twice (wrt=["inner/d1", "d1"]): one source, both
            # names kept so that each works as a key of the result
            first = out[i]
            names = (first.requested, *first.also)
            changes: dict[str, Any] = {}
            if src.requested not in names:
                changes["also"] = (*first.also, src.requested)
            if getattr(src, "explicit", False) and not getattr(first, "explicit", True):
                changes["explicit"] = True
            if changes:
                out[i] = dataclasses.replace(first, **changes)
    return out


def _as_list(wrt: Any) -> list[Any]:
    if wrt is None:
        return []
    if isinstance(wrt, (str, keras.layers.Layer, keras.Variable)):
        return [wrt]
    if isinstance(wrt, (Sequence, set, frozenset)):
        return list(wrt)
    return [wrt]


def _resolve_one(tree: LayerTree, item: Any) -> list[Source]:
    if isinstance(item, keras.Variable):
        _validate.part_of_model(item, tree.model)
        key = tree.variable_key(item)
        return [WeightSource(item, key, tree.owner(item), key, True)]
    if isinstance(item, keras.layers.Layer):
        _validate.part_of_model(item, tree.model, known=id(item) in tree.by_id)
        node = tree.node_of(item)
        _check_selectable(node, node.path)
        return [ActivationSource(node, None, node.path, True)]
    if not isinstance(item, str):
        raise GradprobeError(
            f"Cannot use {item!r} ({type(item).__name__}) in `wrt`: pass a layer name, "
            "'name.kernel', 'inputs', a glob pattern, a layer or a variable."
        )
    text = item.strip()
    if not text:
        raise GradprobeError("An empty string is not a `wrt` selector.")
    if text == "inputs" or text.startswith("inputs:"):
        index: int | str | None = None
        if ":" in text:
            raw = text.split(":", 1)[1]
            index = int(raw) if raw.isdigit() else raw
        return [InputSource(index, text)]

    layer_part, var_part = text, None
    if "." in text and text not in tree.by_path:
        layer_part, var_part = text.rsplit(".", 1)

    if _GLOB_CHARS & set(layer_part):
        return _resolve_pattern(tree, text, layer_part, var_part)

    call: int | None = None
    m = _CALL_INDEX.match(layer_part)
    if m and layer_part not in tree.by_path:
        layer_part, call = m.group("layer"), int(m.group("call"))
        if var_part is not None:
            raise GradprobeError(
                f"{text!r}: a call index selects one call's activation; weights are shared "
                f"by all calls. Use {layer_part + '.' + var_part!r}."
            )
    try:
        node = tree.find(layer_part)
    except GradprobeError:
        # Not a layer: a variable named by its Keras path ("sequential/dense/kernel",
        # as `v.path` and Keras print it) is keyed by its selector ("dense.kernel").
        var = tree.variable_by_path(text) if var_part is None and call is None else None
        if var is None:
            raise
        return [WeightSource(var, tree.variable_key(var), tree.owner(var), text, True)]
    if var_part is None:
        _check_selectable(node, text)
        return [ActivationSource(node, call, text, True)]
    return [WeightSource(v, tree.variable_key(v), tree.owner(v), text, True)
            for v in _variables(tree, node, var_part, text)]


def _check_selectable(node: LayerNode, text: str) -> None:
    if node.is_input:
        raise GradprobeError(
            f"{text!r} is an Input layer: it is not called during the forward pass. "
            "Use wrt='inputs' for the gradient with respect to the model input."
        )
    loop = node.loop_ancestor()
    if loop is not None:
        raise GradprobeError(
            f"Layer {node.path!r} ({node.kind}) runs inside the time loop of {loop.path!r} "
            f"({loop.kind}); its per-step outputs are internal to that loop. Select "
            f"{loop.path!r} for the RNN's output, or {node.path + '.weights'!r} for its weights."
        )


def _variables(tree: LayerTree, node: LayerNode, var_part: str, text: str) -> list[Any]:
    layer = node.layer
    if var_part == "weights":
        found = list(layer.trainable_weights)
        if not found:
            raise GradprobeError(
                f"Layer {node.path!r} ({node.kind}) has no trainable weights"
                + (" (it is frozen: trainable=False)." if layer.weights else ".")
                + " Select its activation with "
                + f"{node.path!r} instead."
            )
        return found
    own = [v for v in tree.own_variables(node) if _short_name(v) == var_part]
    if own:
        return own[:1]
    inner = [(d, v) for d in tree.descendants(node)
             for v in tree.own_variables(d) if _short_name(v) == var_part]
    if len(inner) == 1:
        return [inner[0][1]]
    if len(inner) > 1:
        raise GradprobeError(
            f"{text!r} is ambiguous: {len(inner)} sublayers of {node.path!r} have a variable "
            f"{var_part!r}: {quoted(f'{d.path}.{var_part}' for d, _ in inner)}."
        )
    if not layer.weights and not getattr(layer, "built", True):
        raise GradprobeError(
            f"Layer {node.path!r} ({node.kind}) is not built: it was never called, so it has "
            f"no variables yet (asked for {text!r}). Call the model once, or check that its "
            "call() uses this layer."
        )
    names = sorted({_short_name(v) for v in layer.weights})
    hint = closest(var_part, names + ["weights"])
    raise GradprobeError(
        f"Layer {node.path!r} ({node.kind}) has no variable {var_part!r}."
        + (f" Did you mean {quoted(hint)}?" if hint else "")
        + (f" Its variables are: {quoted(names)}; 'weights' selects all trainable ones."
           if names else " It has no variables at all.")
    )


def _matches(node: LayerNode, pattern: str) -> bool:
    return fnmatch.fnmatchcase(node.path, pattern) or fnmatch.fnmatchcase(node.name, pattern)


def _resolve_pattern(tree: LayerTree, text: str, layer_pat: str,
                     var_part: str | None) -> list[Source]:
    out: list[Source] = []
    if var_part is None:
        out = [ActivationSource(n, None, text, False) for n in tree.leaves()
               if _matches(n, layer_pat)]
    else:
        trainable = {id(v) for v in tree.model.trainable_variables}
        for node, owned in tree.weight_units():
            if not _matches(node, layer_pat):
                continue
            if var_part == "weights":
                vars_ = [v for v in owned if id(v) in trainable]
            else:
                vars_ = [v for v in owned if fnmatch.fnmatchcase(_short_name(v), var_part)]
            out.extend(WeightSource(v, tree.variable_key(v), tree.owner(v), text, False)
                       for v in vars_)
    if not out:
        if var_part is None:
            what, names = "layer", [n.path for n in tree.leaves()]
            listing = "Its leaf layers are"
        else:
            what = f"layer with a variable {var_part!r}"
            names = [tree.variable_key(v) for _, owned in tree.weight_units() for v in owned]
            listing = "Its variables are"
        raise GradprobeError(
            f"Pattern {text!r} matches no {what} of model {tree.root.name!r}. "
            f"{listing}: {quoted(names)}."
        )
    return out
