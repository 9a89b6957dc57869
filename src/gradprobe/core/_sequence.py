"""Facts about text and sequence models that error messages need, read from the
model's functional graph before anything runs: which model input feeds which
embedding layer, and which outputs a model has."""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import keras

from gradprobe.backends import _keras_private
from gradprobe.core.selectors import LayerTree
from gradprobe.errors import quoted


def _input_names(tensor: Any) -> set[Any]:
    """The Input layers a symbolic tensor is computed from: each by its name, its
    tensor's name and its tensor's id (models name their inputs differently)."""
    # Private Keras API (gradprobe.backends._keras_private): a KerasTensor's history
    # and an operation's recorded calls are how Keras 3 records the functional graph.
    names: set[str] = set()
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        history = _keras_private.keras_history(t)
        if history is None:
            continue
        op = history[0]
        if isinstance(op, keras.layers.InputLayer):
            names.update((op.name, getattr(t, "name", None), id(t)))
            continue
        nodes = _keras_private.inbound_nodes(op)
        if history[1] < len(nodes):
            stack.extend(keras.tree.flatten(nodes[history[1]].input_tensors))
    return names


_feeds_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def embedding_lookups(model: Any) -> dict[Any, list[tuple[str, int]]]:
    """`embedding_feeds` with each embedding's vocabulary size: for each Input
    layer (by name, tensor name and tensor id), `[(selector, input_dim), ...]`.
    Cached per model until its layers change (input checks read it on every call)."""
    fingerprint = _keras_private.structure(model)
    try:
        cached = _feeds_cache.get(model)
    except TypeError:  # pragma: no cover - a model that cannot be weakly referenced
        cached = None
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    found = _embedding_lookups(model)
    with contextlib.suppress(TypeError):  # (a model that cannot be weakly referenced)
        _feeds_cache[model] = (fingerprint, found)
    return found


def embedding_feeds(model: Any) -> dict[Any, list[str]]:
    """For each Input layer (by name, tensor name and tensor id, see `_input_names`),
    the embedding calls its integer ids feed, as `wrt` selectors (see
    `_embedding_lookups`)."""
    return {k: [sel for sel, _ in v] for k, v in embedding_lookups(model).items()}


def _embedding_lookups(model: Any) -> dict[Any, list[tuple[str, int]]]:
    """For each Input layer (by name, tensor name and tensor id, see `_input_names`),
    the embedding calls its integer ids feed, as `wrt`
    selectors: `"token_embedding"`, or `"token_embedding@0"` when the layer is called
    more than once (a tied embedding that also computes the output logits).
    Empty for models without a functional graph (subclassed models)."""
    tree = LayerTree(model)
    feeds: dict[Any, list[tuple[str, int]]] = {}
    for node in tree.nodes:
        if not isinstance(node.layer, keras.layers.Embedding):
            continue
        try:
            name = node.name if tree.find(node.name) is node else node.path
        except Exception:  # an ambiguous bare name: the full path is unique
            name = node.path
        # Private Keras API (see `_input_names`): the layer's recorded symbolic calls.
        calls = _keras_private.inbound_nodes(node.layer)
        lookups = [keras.tree.flatten(c.input_tensors) for c in calls]
        lookups = [t[0] for t in lookups
                   if t and "int" in str(getattr(t[0], "dtype", ""))]  # not a tied reverse call
        if len(calls) == 1 or not lookups:
            selector = name
        elif len(lookups) == 1:
            # One lookup and float calls (a tied embedding's reverse call on the hidden
            # states, which come after the lookup): the lookup is the first call.
            selector = f"{name}@0"
        else:
            # Several lookups (an embedding shared by several id inputs): their order
            # in the forward pass is Keras' business, so no call index is claimed.
            selector = name
        entry = (selector, int(getattr(node.layer, "input_dim", 0) or 0))
        for tensor in lookups:
            for source in _input_names(tensor):
                feeds.setdefault(source, [])
                if entry not in feeds[source]:
                    feeds[source].append(entry)
    return feeds


def input_ids(model: Any, key: str, keys: list[str]) -> list[Any]:
    """What identifies the model input behind a result key (`"inputs:token_ids"`,
    `"inputs:1"`, `"inputs"`): the dict key, and its symbolic tensor's name and id."""
    part = key.split(":", 1)[1] if ":" in key else "0"
    try:
        struct = model.input  # public for functional models; raises for subclassed ones
    except (AttributeError, ValueError, RuntimeError):
        struct = None  # (and for a Sequential model never called: its `inputs` work)
    flat = list(getattr(model, "inputs", None) or [])
    tensor = None
    if isinstance(struct, dict):
        tensor = struct.get(part)
    elif part.isdigit() and len(flat) == len(keys) and int(part) < len(flat):
        tensor = flat[int(part)]
    if tensor is None:
        return [part]
    return [id(tensor), part, getattr(tensor, "name", None)]


def _fed(feeds: dict[Any, list[str]], ids: list[Any]) -> list[str]:
    for ident in ids:
        if ident is not None and feeds.get(ident):
            return feeds[ident]
    return []


def integer_input_hint(model: Any, keys: list[str], bad: list[str],
                       arg: str = "wrt") -> tuple[str, str]:
    """Of the requested integer inputs `bad`, the one to name in the error (the one
    that feeds an embedding, e.g. token ids rather than a padding mask), and the
    hint: the embedding layer to differentiate at instead, as the argument `arg`
    (`wrt=` for gp.gradients, `layer=` for the attribution methods)."""
    try:
        feeds = embedding_feeds(model)
    except Exception:  # pragma: no cover - an exotic graph: fall back to the plain hint
        feeds = {}
    order = _declared_input_order(model)
    fed = sorted((k for k in bad if _fed(feeds, input_ids(model, k, keys))),
                 key=lambda k: order.get(k.split(":", 1)[-1], len(order)))
    key = fed[0] if fed else bad[0]
    others = [k for k in bad if k != key]
    also = (f" The other requested input(s) {quoted(others)} are integer too (ids and masks "
            "have no gradient; they are held fixed).") if others else ""
    targets = _fed(feeds, input_ids(model, key, keys))
    if targets:
        first = targets[0]
        tied = (" (the layer is called more than once: a tied embedding that also "
                "computes the output logits; @0 is the lookup)" if "@" in first else "")
        hint = (f" It feeds the embedding layer {first.split('@')[0]!r}: differentiate with "
                f"respect to that layer's output instead: {arg}={first!r}{tied}.")
        if len(targets) > 1:
            hint += f" It also feeds {quoted(targets[1:])}."
        return key, hint + also
    if feeds:
        selectors = [s for sel in feeds.values() for s in sel]
        selectors = list(dict.fromkeys(selectors))
        return key, (f" It feeds no embedding layer (a mask or an index input: it has no "
                     f"gradient and is held fixed). Differentiate with respect to an embedding's "
                     f"output instead: {arg}={selectors[0]!r} (embedding calls: "
                     f"{quoted(selectors)})." + also)
    tree = LayerTree(model)
    embeddings = [n.path for n in tree.nodes if isinstance(n.layer, keras.layers.Embedding)]
    if embeddings:
        hint = (" Differentiate with respect to the embedding layer's output instead: "
                f"{arg}={embeddings[0]!r}.")
        if len(embeddings) > 1:
            hint += f" Embedding layers: {quoted(embeddings)}."
    else:
        hint = " Differentiate with respect to the first layer that turns them into floats."
    return key, hint + also


def _declared_input_order(model: Any) -> dict[str, int]:
    """Input-layer names in the order the model declares its inputs."""
    try:
        struct = model.input  # public for functional models; raises for subclassed ones
    except (AttributeError, ValueError, RuntimeError):
        return {}
    names = list(struct) if isinstance(struct, dict) else \
        [getattr(t, "name", "") for t in keras.tree.flatten(struct)]
    return {name: i for i, name in enumerate(names)}


def declared_outputs(model: Any) -> list[str] | int | None:
    """The outputs of a functional model, known without running it: the dict keys
    (keras-hub backbones: `sequence_output`, `pooled_output`), the output names,
    or their number; `None` when the model does not declare them (subclassed)."""
    try:
        struct = model.output  # public for functional models; raises for subclassed ones
    except (AttributeError, ValueError, RuntimeError):
        return None
    if isinstance(struct, dict):
        return list(struct) if len(struct) > 1 else None
    leaves = keras.tree.flatten(struct)
    if len(leaves) < 2:
        return None
    names = list(getattr(model, "output_names", None) or [])
    return names if len(names) == len(leaves) else len(leaves)


def declared_output(model: Any, output: Any) -> Any:
    """The symbolic output `output` selects (`None`: the only one) of a functional
    model, or `None` when it cannot be told without running the model."""
    try:
        struct = model.output  # public for functional models; raises for subclassed ones
    except (AttributeError, ValueError, RuntimeError):
        return None
    leaves = keras.tree.flatten(struct)
    if output is None:
        return leaves[0] if len(leaves) == 1 else None
    if isinstance(output, bool):
        return None
    if isinstance(output, int):
        return leaves[output] if -len(leaves) <= output < len(leaves) else None
    if isinstance(struct, dict):
        return struct.get(output)
    names = list(getattr(model, "output_names", None) or [])
    return leaves[names.index(output)] if output in names and len(names) == len(leaves) \
        else None


def input_lookups(model: Any, keys: list[str]) -> list[list[tuple[str, int]]]:
    """For each input leaf (by result key), the embedding calls its ids feed, with
    their vocabulary sizes."""
    try:
        feeds = embedding_lookups(model)
    except Exception:  # pragma: no cover - an exotic graph: no range to check
        return [[] for _ in keys]
    if not feeds:
        return [[] for _ in keys]
    out = []
    for key in keys:
        found: list[tuple[str, int]] = []
        for ident in input_ids(model, key, keys):
            if ident is not None and feeds.get(ident):
                found = feeds[ident]
                break
        out.append(found)
    return out
