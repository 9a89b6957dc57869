"""Checks of attribution maps: deletion and insertion curves (Petsiuk et al.,
2018; Samek et al., 2017) and the model-randomisation sanity check (Adebayo et
al., 2018), for any map of any method (backend-neutral: `keras.ops` and NumPy)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from gradprobe.attribution._common import (
    Attribution,
    dtype_name,
    fixed_target,
    is_floating,
    take_rows,
)
from gradprobe.core import _sequence, _validate
from gradprobe.core.engine import resolve_request
from gradprobe.core.targets import evaluate, to_numpy
from gradprobe.errors import GradprobeError


# ------------------------------------------------------------------ ranks
def rankdata(a: Any) -> np.ndarray:
    """Ranks `1..n` of the values of a 1-D array, ties given their average rank
    (as `scipy.stats.rankdata(method="average")`)."""
    a = np.asarray(a, np.float64).ravel()
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    # the start of each run of equal values, and each value's run
    starts = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    run = np.cumsum(starts) - 1
    bounds = np.concatenate([np.nonzero(starts)[0], [a.size]])
    average = (bounds[:-1] + bounds[1:] + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(a.size, np.float64)
    ranks[order] = average[run]
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation of two arrays of the same size (flattened): the
    Pearson correlation of their ranks, ties averaged. `nan` when either array
    is constant (the correlation is undefined).

    Example:

    >>> from gradprobe.attribution.checks import spearman
    >>> spearman([1, 2, 2, 4], [10, 20, 20, 40])
    1.0
    >>> round(spearman([1, 2, 3, 4], [4, 3, 1, 2]), 3)
    -0.8
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.size != b.size:
        raise GradprobeError(
            f"spearman needs two arrays of the same size; got {a.size} and {b.size} values.")
    return _pearson(rankdata(a), rankdata(b))


# ------------------------------------------------------ deletion, insertion
@dataclass(frozen=True)
class Curve:
    """A deletion or insertion curve per example.

    Attributes:
        kind: `"deletion"` or `"insertion"`.
        fractions: The fraction of features removed (deletion) or inserted
            (insertion) at each point, `0` to `1`, shape `(steps + 1,)`.
        scores: The target's value on each modified input, `(batch, steps + 1)`.
        auc: The area under each example's curve, by the trapezoid rule over
            `fractions`, `(batch,)`.
        clean: The target's value on the unmodified inputs, `(batch,)`.
        normalized_auc: `auc / clean`, `(batch,)`: the area of the curve
            drawn as a fraction of the clean score (1 for a flat curve at the
            clean score). `nan` where the clean score is not positive, where the
            ratio has no meaning (for logits or losses, compare `auc`).
        order: The features of each example in the order they were removed or
            inserted (flat indices over the feature axes, most important first).
    """

    kind: str
    fractions: np.ndarray
    scores: np.ndarray
    auc: np.ndarray
    clean: np.ndarray
    normalized_auc: np.ndarray
    order: np.ndarray

    @property
    def mean_auc(self) -> float:
        """The area under the curve, averaged over the batch."""
        return float(np.mean(self.auc))

    def __repr__(self) -> str:
        return (f"Curve(kind={self.kind!r}, examples={len(self.auc)}, "
                f"points={len(self.fractions)}, mean_auc={self.mean_auc:.4g})")


def trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The trapezoid rule along the last axis of `y` (NumPy's `trapz`, spelled
    out: NumPy 2 renamed it)."""
    y = np.asarray(y, np.float64)
    dx = np.diff(np.asarray(x, np.float64))
    return ((y[..., 1:] + y[..., :-1]) * 0.5 * dx).sum(axis=-1)


def deletion_curve(model: keras.Model, inputs: Any, attribution: Any, target: Any, *,
                   steps: int = 20, baseline: Any = 0.0, baseline_id: int | None = None,
                   output: Any = None, training: bool = False,
                   batch_size: int | None = None) -> Curve:
    """The deletion curve of an attribution map: the target's score as the
    features are removed (set to the baseline), most important first.

    Features are ranked by the absolute attribution: for an image (inputs of
    rank 3 or more, channels last) a feature is a pixel, scored by the sum of
    `|map|` over the channels (a map shaped like the inputs, or one already
    reduced to `(batch, height, width)`); for a vector input each element; for
    token ids (an integer input) each position, scored by `|map|` summed over
    the embedding axis (a map `(batch, steps, features)` from an embedding
    layer) or by `|map|` itself (`(batch, steps)`). Ties keep the features'
    order. The features are removed in `steps` equal chunks (chunk `j` ends at
    `round(j * features / steps)` features), and the model is evaluated on all
    `batch * (steps + 1)` modified inputs in batches of `batch_size`. A good
    map makes the score fall fast: a small area under the curve.

    Args:
        model, inputs, target, output, training: As in `gp.gradients`; a
            `"predicted"` target is fixed to each example's class on the clean
            inputs. The target must give one value per example. Single-input
            models.
        attribution: The maps: an `Attribution` or an array, one map per example.
        steps: The number of chunks the features are removed in.
        baseline: What a removed feature of a floating-point input becomes: a
            number, or an array broadcastable to the inputs (a blurred image, a
            per-channel mean).
        baseline_id: For token ids: the id a removed token becomes (a padding
            or mask token id), required for integer inputs, in the embedding's
            range.
        batch_size: Modified inputs per model call (default: all at once).

    Returns:
        A `Curve`: `fractions`, `scores`, `auc` (trapezoid rule over the
        fraction removed, 0 to 1), `clean`, `normalized_auc` (`auc / clean`,
        where the clean score is positive), `order`.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
    >>> model.set_weights([np.array([[1.0], [2.0], [3.0], [4.0]])])
    >>> x = np.ones((1, 4), "float32")
    >>> maps = gp.gradient_x_input(model, x, 0)      # w * x = [1, 2, 3, 4]
    >>> curve = gp.deletion_curve(model, x, maps, 0, steps=4)
    >>> curve.scores[0].tolist()                     # 10, then 4, 3, 2, 1 removed
    [10.0, 6.0, 3.0, 1.0, 0.0]
    >>> float(curve.auc[0])
    3.75
    """
    return _curve("deletion", model, inputs, attribution, target, steps=steps,
                  baseline=baseline, baseline_id=baseline_id, output=output,
                  training=training, batch_size=batch_size)


def insertion_curve(model: keras.Model, inputs: Any, attribution: Any, target: Any, *,
                    steps: int = 20, baseline: Any = 0.0, baseline_id: int | None = None,
                    output: Any = None, training: bool = False,
                    batch_size: int | None = None) -> Curve:
    """The insertion curve of an attribution map: the target's score as the
    features are inserted into the baseline (every feature at the baseline, or
    `baseline_id` for tokens), most important first. A good map makes the score
    rise fast: a large area under the curve. Features, ranking, chunks and
    arguments as in `gp.deletion_curve`; `fractions` is the fraction inserted.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
    >>> model.set_weights([np.array([[1.0], [2.0], [3.0], [4.0]])])
    >>> x = np.ones((1, 4), "float32")
    >>> maps = gp.gradient_x_input(model, x, 0)
    >>> curve = gp.insertion_curve(model, x, maps, 0, steps=4)
    >>> curve.scores[0].tolist()
    [0.0, 4.0, 7.0, 9.0, 10.0]
    >>> float(curve.normalized_auc[0])               # auc 6.25 / clean score 10
    0.625
    """
    return _curve("insertion", model, inputs, attribution, target, steps=steps,
                  baseline=baseline, baseline_id=baseline_id, output=output,
                  training=training, batch_size=batch_size)


def _map_array(attribution: Any) -> np.ndarray:
    if isinstance(attribution, Attribution):
        return np.asarray(attribution, np.float64)
    if ops.is_tensor(attribution) or isinstance(attribution, keras.Variable):
        return to_numpy(attribution).astype(np.float64)
    return _validate.numeric_array("attribution", attribution,
                                   "the attribution maps, one per example").astype(np.float64)


def feature_scores(x_shape: tuple, integer: bool, attribution: Any) -> np.ndarray:
    """`(batch, features)`: the score of each feature (pixel, element, token) of
    each example, from a map shaped like the inputs or reduced over channels."""
    arr = _map_array(attribution)
    n = x_shape[0]
    # token ids (batch, steps): one score per position; images: per pixel
    feature_shape = x_shape[1:-1] if len(x_shape) >= 3 and not integer else x_shape[1:]
    if arr.shape == (n, *feature_shape):
        scores = np.abs(arr)
    elif arr.ndim == len(feature_shape) + 2 and arr.shape[:-1] == (n, *feature_shape):
        scores = np.abs(arr).sum(axis=-1)  # channels, or an embedding's features
    else:
        reduced = (n, *feature_shape)
        raise GradprobeError(
            f"Expected `attribution` to hold one map per example shaped like the inputs "
            f"{tuple(x_shape)} or {reduced} (one score per "
            f"{'token' if integer else 'pixel' if len(x_shape) >= 3 else 'feature'}"
            f"{', or with a last axis of embedding features' if integer else ''}). "
            f"Received: attribution of shape {arr.shape}")
    if not np.all(np.isfinite(scores)):
        raise GradprobeError(
            "Expected `attribution` to hold finite values; it has NaN or infinite values, "
            f"which cannot be ranked. Received: attribution of shape {arr.shape}")
    return scores.reshape(n, -1)


def _curve(kind: str, model: Any, inputs: Any, attribution: Any, target: Any, *, steps: int,
           baseline: Any, baseline_id: Any, output: Any, training: bool,
           batch_size: int | None) -> Curve:
    steps = _validate.count("steps", steps, "the number of chunks the features are "
                            f"{'removed' if kind == 'deletion' else 'inserted'} in")
    _validate.optional_count("batch_size", batch_size, "modified inputs per model call")
    req = resolve_request(model, inputs, target, output=output, training=training)
    leaves = keras.tree.flatten(req.x)
    if len(leaves) != 1:
        raise GradprobeError(
            f"gp.{kind}_curve works on single-input models; this model takes {len(leaves)} "
            f"inputs. Received: inputs={_validate.shown(inputs)}")
    x = leaves[0]
    shape = tuple(int(d) for d in x.shape)
    n = shape[0]
    integer = not is_floating(x)
    scores = feature_scores(shape, integer, attribution)
    features = scores.shape[1]
    base = _baseline(req.model, x, integer, baseline, baseline_id)
    req = req.fixed()
    _validate.total_work(f"gp.{kind}_curve(steps={steps})", "steps", steps + 1, n)

    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(features)[None, :].repeat(n, 0), axis=1)
    counts = np.floor(np.arange(steps + 1) * features / steps + 0.5).astype(np.int64)
    counts[-1] = features
    fractions = counts / features
    total = n * (steps + 1)
    size = total if not batch_size or batch_size >= total else int(batch_size)
    # a removed (deletion) or inserted (insertion) feature broadcast over the channels
    mask_shape = (-1, *shape[1:]) if integer or len(shape) < 3 else (-1, *shape[1:-1], 1)
    values = []
    for lo in range(0, total, size):
        r = np.arange(lo, min(total, lo + size))
        idx, j = r % n, r // n  # row r: example r % n at point r // n
        changed = rank[idx] < counts[j][:, None]  # (rows, features)
        keep_x = ~changed if kind == "deletion" else changed
        mask = ops.convert_to_tensor(keep_x.reshape(mask_shape))
        xs = take_rows(x, idx)
        rows = ops.where(mask, xs, ops.cast(take_rows(base, idx), x.dtype))
        ev = evaluate(req.model, rows, req.target.take(idx), output=req.output,
                      training=req.training)
        req.target.check(ev.meta)
        value = ev.value
        if tuple(getattr(value, "shape", ())) != (len(r),):
            raise GradprobeError(
                f"gp.{kind}_curve needs a target with one value per example (a class, "
                f"'predicted', gp.loss(...) with a per-example loss, gp.at(...)); this "
                f"target gives a value of shape {tuple(getattr(value, 'shape', ()))} for "
                f"{len(r)} inputs. Received: target={_validate.shown(target)}")
        values.append(to_numpy(value).astype(np.float64))
    flat = np.concatenate(values)
    curve = flat.reshape(steps + 1, n).T
    auc = trapezoid(curve, fractions)
    clean = curve[:, 0] if kind == "deletion" else curve[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized = np.where(clean > 0, auc / np.where(clean > 0, clean, 1.0), np.nan)
    return Curve(kind, fractions, curve, auc, clean, normalized, order)


def _baseline(model: Any, x: Any, integer: bool, baseline: Any, baseline_id: Any) -> Any:
    """The baseline broadcast to `x`'s shape and dtype."""
    shape = tuple(int(d) for d in x.shape)
    if integer:
        if baseline_id is None:
            raise GradprobeError(
                "Expected `baseline_id` to be the token id a removed token becomes (the "
                "padding or mask token's id): the inputs are integer token ids "
                f"({dtype_name(x)}), which have no numeric baseline. Received: baseline_id=None")
        if not _validate._is_int(baseline_id):
            raise _validate.fail("baseline_id", baseline_id,
                                 "an integer token id (the padding or mask token's id)")
        from gradprobe.attribution._common import input_keys

        lookups = _sequence.input_lookups(model, input_keys(x))[0]
        _validate.token_ids("baseline_id", np.asarray([int(baseline_id)]), lookups,
                            spec=dtype_name(x))
        return ops.full(shape, int(baseline_id), dtype=dtype_name(x))
    if baseline_id is not None:
        raise _validate.fail("baseline_id", baseline_id,
                             "None: the inputs are floating point (use baseline=)")
    if isinstance(baseline, keras.Variable):
        baseline = baseline.value
    b = to_numpy(baseline) if ops.is_tensor(baseline) else baseline
    b = _validate.numeric_array("baseline", b, "the value of a removed feature")
    _validate.baseline(b, np.empty(shape, dtype_name(x)))
    if not np.all(np.isfinite(b)):
        raise _validate.fail("baseline", baseline, "finite values")
    return ops.broadcast_to(ops.cast(ops.convert_to_tensor(b), x.dtype), shape)


# -------------------------------------------------------- randomisation
_METHODS = ("saliency", "gradient_x_input", "integrated_gradients", "smoothgrad")


@dataclass(frozen=True)
class Randomization:
    """The model-randomisation check (Adebayo et al., 2018), one row per step
    of the cascade.

    Attributes:
        layers: The layer re-initialised at each step, from the output down
            (step `k` has layers `0..k` re-initialised).
        spearman: `(steps, batch)`: Spearman's rank correlation between the
            `|map|` of the randomised model and of the original model, per
            example (`nan` where a map is constant).
        pearson: `(steps, batch)`: the Pearson correlation of the same `|map|`
            values (a simple similarity of the maps' magnitudes).
        method: The attribution method's name.
    """

    layers: tuple[str, ...]
    spearman: np.ndarray
    pearson: np.ndarray
    method: str

    @property
    def mean_spearman(self) -> np.ndarray:
        """`(steps,)`: the Spearman correlation averaged over the batch (NaN ignored)."""
        return _nanmean(self.spearman)

    @property
    def mean_pearson(self) -> np.ndarray:
        return _nanmean(self.pearson)

    def rows(self) -> list[tuple[str, float, float]]:
        """`(layer, mean Spearman, mean Pearson)` per step, the table's rows."""
        return [(name, float(s), float(p)) for name, s, p in
                zip(self.layers, self.mean_spearman, self.mean_pearson)]

    def summary(self) -> str:
        """The table as text: one line per step of the cascade."""
        width = max([len("re-initialised down to")] + [len(n) for n in self.layers])
        lines = [f"model randomisation check ({self.method}, |map|)",
                 f"{'re-initialised down to':<{width}}  spearman  pearson"]
        for name, s, p in self.rows():
            lines.append(f"{name:<{width}}  {s:8.3f}  {p:7.3f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Randomization(method={self.method!r}, layers={list(self.layers)!r}, "
                f"mean_spearman={np.round(self.mean_spearman, 3).tolist()!r})")


def _nanmean(a: np.ndarray) -> np.ndarray:
    out = np.full(a.shape[0], np.nan)
    for i, row in enumerate(a):
        ok = row[~np.isnan(row)]
        if ok.size:
            out[i] = ok.mean()
    return out


def _weighted_layers(model: Any) -> list[Any]:
    return [layer for layer in model.layers if layer.weights]


def _cascade(model: Any, layers: Any) -> list[str]:
    """The names of the layers to re-initialise, from the output down."""
    weighted = _weighted_layers(model)
    if layers is None:
        if not weighted:
            raise GradprobeError(
                "gp.randomization_check re-initialises layers with weights; this model has "
                "none. Received: layers=None")
        return [layer.name for layer in reversed(weighted)]
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise _validate.fail("layers", layers,
                             "None (every layer with weights, from the output down) or a "
                             "non-empty list of layer names, in the order to re-initialise")
    names = {layer.name for layer in weighted}
    for name in layers:
        if not isinstance(name, str) or name not in names:
            raise _validate.fail(
                "layers", layers,
                f"a list of names of layers with weights ({', '.join(sorted(names))}); "
                f"{name!r} is not one")
    if len(set(layers)) != len(layers):
        raise _validate.fail("layers", layers, "a list of distinct layer names")
    return list(layers)


def _clone(model: Any) -> Any:
    try:
        clone = keras.models.clone_model(model)
    except Exception as e:
        raise GradprobeError(
            f"gp.randomization_check re-initialises a copy of the model "
            f"(keras.models.clone_model), which failed for {type(model).__name__} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). "
            "Subclassed models need get_config/from_config to be cloned.") from e
    clone.set_weights(model.get_weights())
    return clone


def _initializer(layer: Any, variable: Any) -> Any:
    """The layer's initialiser of `variable` (`kernel_initializer` for `kernel`)."""
    short = variable.path.split("/")[-1] if hasattr(variable, "path") else variable.name
    return getattr(layer, f"{short}_initializer", None)


def reinitialize(layer: Any, seed: int) -> None:
    """Re-initialises every weight of `layer` (a clone's layer) with the layer's
    own initialiser for it, seeded with `seed` (plus the weight's index); a
    weight without a known initialiser is drawn from a normal distribution with
    the weight's own mean and standard deviation."""
    for k, v in enumerate(layer.weights):
        init = _initializer(layer, v)
        shape, dtype = tuple(v.shape), dtype_name(v)
        if init is not None:
            init = keras.initializers.get(init)
            config = init.get_config()
            if "seed" in config:
                config["seed"] = (int(seed) * 1000 + k) % (2**31 - 1)
                init = type(init).from_config(config)
            value = init(shape, dtype=dtype)
        else:
            old = to_numpy(v.value).astype(np.float64)
            rng = np.random.default_rng((int(seed), k))
            value = rng.normal(old.mean(), old.std() or 1.0, shape).astype(dtype)
        v.assign(value)


def randomization_check(model: keras.Model, inputs: Any, target: Any,
                        method: str | Callable[..., Any] = "saliency", *,
                        layers: Sequence[str] | None = None, seed: int = 0,
                        output: Any = None, training: bool = False,
                        **method_kwargs: Any) -> Randomization:
    """The model-randomisation sanity check (Adebayo et al., 2018): does the map
    depend on the weights? Cascading re-initialisation from the output down: at
    step `k` a copy of the model (`keras.models.clone_model` with the model's
    weights; the model itself is never changed) has layers `0..k` of the cascade
    re-initialised with their own initialisers (seeded), the map is recomputed
    with the same method and target, and compared with the original model's
    map by Spearman's rank correlation of `|map|` (ties averaged) and the
    Pearson correlation of `|map|`. A map that stays close to the original
    while the weights are random does not explain the model.

    Args:
        model, inputs, target, output, training: As in `gp.gradients`; a
            `"predicted"` target is fixed to the original model's classes.
        method: `"saliency"`, `"gradient_x_input"`, `"integrated_gradients"`,
            `"smoothgrad"`, or a callable `method(model, inputs, target,
            output=..., training=..., **method_kwargs)` returning an
            `Attribution` or an array (e.g. a Grad-CAM with its layer).
        layers: The layer names to re-initialise, in order (default: every
            layer with weights, from the output down).
        seed: The seed of the re-initialisation (the same seed, the same
            randomised weights on a backend); also SmoothGrad's noise seed, so
            that every map of the check sees the same noise.
        **method_kwargs: Passed to the method (`steps=`, `layer=`, ...).

    Returns:
        A `Randomization`: `layers`, `spearman` and `pearson` `(steps, batch)`,
        `mean_spearman`, `rows()`, `summary()`.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.GlobalAveragePooling2D(name="gap"),
    ...     keras.layers.Dense(3, name="dense"),
    ... ])
    >>> images = np.random.default_rng(0).random((2, 8, 8, 1), dtype="float32")
    >>> check = gp.randomization_check(model, images, "predicted")
    >>> check.layers
    ('dense', 'conv')
    >>> check.spearman.shape            # (steps of the cascade, batch)
    (2, 2)
    """
    seed = _validate.seed(seed)
    if seed is None:
        raise _validate.fail("seed", seed, "a non-negative integer, the random seed")
    _validate.flag("training", training)
    if not callable(method):
        _validate.choice("method", method, _METHODS, "the attribution method, or a callable")
    _validate.model(model)
    cascade = _cascade(model, layers)
    classes = fixed_target(model, inputs, target, output, training)
    fn, name = _method(method)

    kwargs = dict(method_kwargs)
    if name == "smoothgrad":  # the same noise for every map: only the weights differ
        kwargs.setdefault("seed", seed)

    def attribute(m: Any) -> np.ndarray:
        result = fn(m, inputs, classes, output=output, training=training, **kwargs)
        arr = _map_array(result)
        return np.abs(arr.reshape(arr.shape[0], -1))

    original = attribute(model)
    n = original.shape[0]
    spearmans = np.empty((len(cascade), n))
    pearsons = np.empty((len(cascade), n))
    clone = _clone(model)
    by_name = {layer.name: layer for layer in clone.layers}
    for k, layer_name in enumerate(cascade):
        reinitialize(by_name[layer_name], seed * 7919 + k)
        maps = attribute(clone)
        for i in range(n):
            spearmans[k, i] = spearman(original[i], maps[i])
            pearsons[k, i] = _pearson(original[i], maps[i])
    return Randomization(tuple(cascade), spearmans, pearsons, name)


def _method(method: Any) -> tuple[Callable[..., Any], str]:
    if callable(method):
        return method, getattr(method, "__name__", type(method).__name__)
    import gradprobe as gp

    return getattr(gp, method), method
