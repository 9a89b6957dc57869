"""The scalar objective: which output, and which function of it.

`target` takes one of these forms (per-example values are summed over the
batch, so activation and input gradients come out per example):

* `int k`: the score `outputs[:, k]` of every example (for outputs of rank > 3,
  such as segmentation maps, the last axis is the class axis and the other
  non-batch axes are summed; a rank-3 sequence output needs `gp.at`);
* a sequence or array of ints, one per example: each example's own class;
* `"predicted"`: each example's arg-max class;
* `gp.at(position, target, mask=None, log_prob=False)`: on a sequence output
  `(batch, steps, classes)`, the class (or token) score at one position per
  example, optionally as a log-probability (a causal LM's next token);
* `gp.loss(loss_fn, y_true, sample_weight=None)`: a Keras loss against labels;
* a callable `f(outputs) -> tensor` returning a scalar or one value per example.
"""

from __future__ import annotations

import copy
import functools
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import keras
import numpy as np

from gradprobe import backends
from gradprobe.core import _sequence, _validate
from gradprobe.errors import GradprobeError, quoted

# Every target computes with `keras.ops` and runs on every Keras backend; the row
# gather and arg-max are the backend's (`_pick`, `_argmax`: `Backend.per_row` and
# `argmax_int32`; TensorFlow's are written so that `tf.vectorized_map` converts them).


def _rank(x: Any) -> int | None:
    """The rank of a tensor of any backend (`None` when TensorFlow does not know it)."""
    shape = x.shape
    return shape.rank if hasattr(shape, "rank") else len(shape)


def _dtype(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def _is_floating(x: Any) -> bool:
    return keras.backend.is_float_dtype(_dtype(x))


def _argument(value: Any) -> Any:
    """A target argument (classes, labels, weights) as the compiled gradient function
    takes it (`Backend.target_argument`: a tensor on TensorFlow, whose `tf.function`
    would trace again for each new NumPy value; a NumPy array on JAX, which `jax.jit`
    takes as it is). A tensor stays as it is."""
    return backends.get().target_argument(value)


def to_numpy(x: Any) -> np.ndarray:
    """A tensor of any backend (or an array) as a NumPy array."""
    return x if isinstance(x, np.ndarray) else keras.ops.convert_to_numpy(x)


def _argmax(scores: Any) -> Any:
    """Each row's arg-max class, int32 (`Backend.argmax_int32`; TensorFlow's is
    written so that `tf.vectorized_map` converts it, which Keras' `argmax` is not)."""
    return backends.get().argmax_int32(scores)


def _pick(x: Any, idx: Any) -> Any:
    """`x[i, idx[i]]` for each example `i` of a `(batch, n, ...)` tensor: a class
    score of `(batch, classes)` scores, or a position of a `(batch, steps, classes)`
    sequence (`Backend.per_row`)."""
    return backends.get().per_row(x, idx)


@dataclass(frozen=True, eq=False)
class LossTarget:
    """A Keras loss against labels, used as the target. Build it with `gp.loss`."""

    fn: Any
    y_true: Any
    sample_weight: Any = None


def loss(loss_fn: Any, y_true: Any, sample_weight: Any = None) -> LossTarget:
    """A loss as the target: `loss_fn(y_true, outputs)`.

    Args:
        loss_fn: A `keras.losses.Loss` object (its own reduction applies, e.g. the
            batch mean), a loss function returning one value per example (summed
            over the batch), or a loss name such as `"sparse_categorical_crossentropy"`.
        y_true: The labels, one entry per example.
        sample_weight: Optional per-example weights.

    Returns:
        A target for `gp.gradients(..., target=...)`.

    A crossentropy loss that expects probabilities (`from_logits=False`, the
    default of the loss names and functions) on outputs that cannot be ones
    (values outside [0, 1], or categorical rows not summing to 1), or a
    categorical one with `from_logits=True` on softmax outputs, raises a
    `ProbabilityWarning` naming the loss, the evidence and the fix. The check
    reads the outputs once they exist: in an eager run, or after the first call
    of a compiled one (never inside traced code).

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")])
    >>> x = np.ones((2, 4), "float32")
    >>> y = np.array([0, 2])
    >>> loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    >>> g = gp.gradients(model, x, gp.loss(loss_fn, y), wrt="dense.kernel")
    >>> tuple(g["dense.kernel"].shape)
    (4, 3)
    """
    if isinstance(loss_fn, str):
        try:
            loss_fn = keras.losses.get(loss_fn)
        except ValueError:
            raise _validate.fail(
                "loss_fn", loss_fn, "a Keras loss object, a loss function or the name of a "
                "Keras loss (e.g. 'sparse_categorical_crossentropy', 'mse').") from None
    if not callable(loss_fn) or isinstance(loss_fn, type):
        raise _validate.fail(
            "loss_fn", loss_fn, "a Keras loss object (e.g. keras.losses.MeanSquaredError()), "
            "a loss function or a loss name.")
    _validate.numeric_array("y_true", y_true, "the labels, one entry per example")
    if sample_weight is not None:
        weights = _validate.numeric_array("sample_weight", sample_weight,
                                          "one weight per example")
        if not np.all(np.isfinite(weights)):
            raise _validate.fail("sample_weight", sample_weight,
                                 "finite per-example weights (no NaN or inf).")
    if is_sparse_loss(loss_fn):
        _validate.labels(y_true, None, ignore=getattr(loss_fn, "ignore_class", None))
    return LossTarget(loss_fn, y_true, sample_weight)


class ProbabilityWarning(UserWarning):
    """A loss that expects probabilities was given outputs that cannot be ones
    (or a `from_logits=True` loss outputs that already are): see `gp.loss`.

    Attributes:
        loss: The loss' name, e.g. `"sparse_categorical_crossentropy"`.
        evidence: What the outputs showed, e.g. `"they range over [-8.1, 9.3]"`.
        from_logits: The loss' `from_logits` setting.
    """

    def __init__(self, message: str, loss: str = "", evidence: str = "",
                 from_logits: bool = False):
        super().__init__(message)
        self.loss, self.evidence, self.from_logits = loss, evidence, from_logits


# The Keras losses whose `from_logits=False` form expects probabilities: "softmax"
# (rows along the last axis sum to 1) or "sigmoid" (each value in [0, 1]).
PROBABILITY_LOSSES = {
    "categorical_crossentropy": "softmax",
    "sparse_categorical_crossentropy": "softmax",
    "categorical_focal_crossentropy": "softmax",
    "binary_crossentropy": "sigmoid",
    "binary_focal_crossentropy": "sigmoid",
}
_CLASS_NAMES = {"categorical_crossentropy": "CategoricalCrossentropy",
                "sparse_categorical_crossentropy": "SparseCategoricalCrossentropy",
                "categorical_focal_crossentropy": "CategoricalFocalCrossentropy",
                "binary_crossentropy": "BinaryCrossentropy",
                "binary_focal_crossentropy": "BinaryFocalCrossentropy"}


def probability_loss(fn: Any) -> tuple[str, str, bool] | None:
    """`(name, kind, from_logits)` for a crossentropy loss of `PROBABILITY_LOSSES`
    (a Keras loss object, its function, or a `functools.partial` of it), else
    `None` (also when its `from_logits` setting cannot be read)."""
    keywords: dict[str, Any] = {}
    while isinstance(fn, functools.partial):
        keywords = {**fn.keywords, **keywords}
        fn = fn.func
    if isinstance(fn, keras.losses.Loss):
        inner = getattr(fn, "fn", None)
        name = getattr(inner, "__name__", "")
        try:
            from_logits = fn.get_config().get("from_logits")
        except Exception:  # (a custom loss whose config cannot be read: no check)
            return None
    else:
        name = getattr(fn, "__name__", "")
        from_logits = keywords.get("from_logits", False)
    if name not in PROBABILITY_LOSSES or not isinstance(from_logits, bool):
        return None
    return name, PROBABILITY_LOSSES[name], from_logits


def _eps(dtype: Any) -> float:
    try:
        return float(np.finfo(dtype).eps)
    except (TypeError, ValueError):  # bfloat16 and other ml_dtypes
        return {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}.get(str(dtype), 2.0 ** -7)


def probability_problem(fn: Any, values: Any) -> ProbabilityWarning | None:
    """Checks concrete outputs `values` against what the loss `fn` expects.

    A loss with `from_logits=False` needs probabilities: values in [0, 1], and for
    the categorical ones rows (last axis) summing to 1, both within a few units of
    the dtype's precision (times the number of classes for a sum). A categorical
    loss with `from_logits=True` on rows that already are probabilities would
    apply a second softmax. Returns the warning to raise, or `None`.
    """
    info = probability_loss(fn)
    if info is None:
        return None
    name, kind, from_logits = info
    values = np.asarray(values)
    if values.size == 0 or values.dtype.kind != "f":
        return None
    eps = _eps(values.dtype)
    v = values.astype(np.float64)
    if not np.all(np.isfinite(v)):
        return None  # non-finite outputs are reported by the statistics
    lo, hi = float(v.min()), float(v.max())
    in_range = lo >= -4 * eps and hi <= 1 + 4 * eps
    classes = v.shape[-1] if v.ndim >= 2 else 1
    sums = v.sum(axis=-1) if v.ndim >= 2 else None
    tol = 4 * classes * eps
    rows_sum_to_one = sums is not None and classes > 1 and \
        float(np.max(np.abs(sums - 1.0))) <= tol
    cls = _CLASS_NAMES[name]
    if not from_logits:
        if not in_range:
            evidence = f"they range over [{lo:.3g}, {hi:.3g}], outside [0, 1]: they look like logits"
        elif kind == "softmax" and sums is not None and classes > 1 and not rows_sum_to_one:
            evidence = (f"their rows sum to between {float(sums.min()):.3g} and "
                        f"{float(sums.max()):.3g}, not 1: they are not a softmax")
        else:
            return None
        return ProbabilityWarning(
            f"gp.loss: {name} expects probabilities (from_logits=False), but the model's "
            f"outputs cannot be ones: {evidence}. Treated as probabilities they are clipped "
            f"and rescaled, and the gradients are wrong (many exact zeros). If the model "
            f"outputs logits, pass from_logits=True, e.g. gp.loss(keras.losses.{cls}("
            f"from_logits=True), y).", name, evidence, False)
    if kind == "softmax" and in_range and rows_sum_to_one:
        evidence = ("every value is in [0, 1] and every row sums to 1: they already are "
                    "probabilities (a softmax output)")
        return ProbabilityWarning(
            f"gp.loss: {name} was given from_logits=True, but the model's outputs look like "
            f"probabilities: {evidence}; with from_logits=True they get a second softmax. "
            f"Pass from_logits=False (e.g. keras.losses.{cls}()).", name, evidence, True)
    return None


def _concrete(x: Any) -> np.ndarray | None:
    """`x` as a NumPy array when its values exist here (eager), else `None` (a
    tensor being traced by tf.function, jax.jit or torch.func): no host sync is
    forced inside traced code."""
    if isinstance(x, np.ndarray):
        return x
    if backends.get().in_graph():
        return None
    try:
        return np.asarray(keras.ops.convert_to_numpy(x))
    except Exception:  # a tracer: its values do not exist yet
        return None


def is_sparse_loss(fn: Any) -> bool:
    """True for sparse categorical losses, whose labels are class indices."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    names = [getattr(fn, "__name__", ""), getattr(getattr(fn, "fn", None), "__name__", ""),
             type(fn).__name__]
    return any("sparse_categorical" in n or n.startswith("SparseCategorical") for n in names)


class Target:
    """A resolved target: how to compute the objective from the selected output.

    Made once per public call (`make_target`); the chunks of a batched method
    use views of it (`take`), and `"predicted"` is fixed once (`fixed`).
    """

    kind: str = ""
    needs_single_output = True
    predicts = False  # True while the class is each example's arg-max (see `fixed`)

    def __init__(self, cache_key: Any, args: dict[str, Any]):
        self.cache_key = cache_key
        self.args = args

    def compute(self, out: Any, args: dict[str, Any]) -> tuple[Any, Any, dict]:
        """Returns `(value, objective, meta)`: the target value (scalar or per
        example), the scalar that is differentiated, and facts to check later."""
        raise NotImplementedError

    def check(self, meta: dict) -> None:
        """Raises for problems that are only visible once the model has run."""

    def check_outputs(self, outputs: Any, meta: dict) -> None:
        """Warns about the model's (concrete) outputs after a compiled run (a loss
        that expects probabilities given logits, see `LossValueTarget`)."""

    def take(self, rows: Any) -> Target:
        """This target for the examples `rows` of its batch (example indices: a
        chunk, or copies of examples, as batched attribution evaluates them): a
        view whose per-example arguments are taken at `rows`, with the same
        cache key (so the same compiled function). Nothing is validated or
        resolved again. A target with no per-example argument is its own view."""
        return self

    def for_cache(self) -> Target:
        """A copy for a cached plan, without the arguments of this call (they
        arrive with each call: only what the cache key fixes is read from it)."""
        target = copy.copy(self)
        target.args = {}
        return target

    def fixed(self, selected: Any) -> Target:
        """This target with `"predicted"` fixed to each example's class in
        `selected` (the selected output of the original inputs), so that
        modified copies of an example keep its class; other targets are their
        own fixed form."""
        return self


def class_scores(out: Any, what: str, sequence_ok: bool = False,
                 form: str = "'predicted'") -> Any:
    """The `(batch, classes)` scores of the selected output. A rank-3 output is a
    sequence `(batch, steps, classes)`: its position must be chosen with `gp.at`
    (unless `sequence_ok`, for a slice that `gp.at` already took)."""
    if not _is_floating(out):
        raise GradprobeError(f"{what}: the selected output has dtype {_dtype(out)}; "
                             "class scores must be floating point.")
    rank = _rank(out)
    if rank is None or rank < 2:
        raise GradprobeError(
            f"{what}: the selected output has shape {tuple(out.shape)}, with no class axis. "
            "Use a callable target instead, e.g. target=lambda y: y."
        )
    if rank == 3 and not sequence_ok:
        raise GradprobeError(sequence_error(what, tuple(out.shape), form))
    if rank > 2:
        out = keras.ops.sum(out, axis=tuple(range(1, rank - 1)))
    return out


def sequence_error(what: str, shape: tuple, form: str = "'predicted'") -> str:
    """The error for a class target on a sequence output; `form` is how the class
    part is written in the `gp.at` example (`3`, `classes`, `'predicted'`)."""
    return (
        f"{what}: the selected output has shape {shape}, a sequence (batch, steps, classes); "
        "a class score summed over every position (padding included), or the arg-max of "
        "position-summed scores, means nothing there. Pick the position first: "
        f"target=gp.at(-1, {form}) (the last position), gp.at('last', {form}, "
        f"mask=padding_mask) (each example's last non-padding position) or "
        f"gp.at(positions, {form}) (one position per example); add log_prob=True for the "
        "log-probability of the token (a causal LM's next-token explanation). A callable "
        "target also works.")


class ClassTarget(Target):
    """The score of one class per example (the same class, or each its own)."""

    kind = "class"

    def __init__(self, classes: np.ndarray, same: bool, raw: Any = None):
        self.classes = classes
        self.raw = raw
        self._largest: int | None = None
        super().__init__(("class",), {"classes": _argument(np.asarray(classes, np.int32))})
        self.label = f"class {int(classes[0])}" if same else "per-example classes"
        self.form = str(int(classes[0])) if same else "classes"

    def compute(self, out, args):
        scores = class_scores(out, f"target={self.label}", form=self.form)
        n = scores.shape[-1]
        idx = args["classes"]
        if n is not None:
            idx = keras.ops.minimum(idx, n - 1)  # checked against `n` after the run
        value = _pick(scores, idx)
        return value, keras.ops.sum(value), {"num_classes": n}

    def check(self, meta):
        n = meta.get("num_classes")
        if n is not None and self.largest >= n:
            _validate.classes_in_range(self.classes, n, self.raw)

    @property
    def largest(self) -> int:
        """The largest class index (computed once)."""
        if self._largest is None:
            self._largest = int(self.classes.max()) if self.classes.size else -1
        return self._largest

    def take(self, rows):
        view = copy.copy(self)
        view._largest = None
        view.classes = self.classes[np.asarray(rows)]
        view.args = {"classes": _argument(np.asarray(view.classes, np.int32))}
        return view


class PredictedTarget(Target):
    """The score of each example's arg-max class."""

    kind = "predicted"
    predicts = True

    def __init__(self):
        super().__init__(("predicted",), {})

    def compute(self, out, args):
        scores = class_scores(out, "target='predicted'")
        value = _pick(scores, _argmax(scores))
        return value, keras.ops.sum(value), {"num_classes": scores.shape[-1]}

    def fixed(self, selected):
        classes = np.argmax(to_numpy(class_scores(selected, "target='predicted'")), axis=-1)
        return ClassTarget(_validate.class_indices(classes.astype(np.int64), classes),
                           same=False, raw=classes)


@dataclass(frozen=True, eq=False)
class PositionSpec:
    """A class (or token) score at one position of a sequence output. Build it
    with `gp.at`."""

    position: Any
    target: Any = "predicted"
    mask: Any = None
    log_prob: bool = False
    kind: str = "fixed"  # "fixed": one position for all; "each": one per example
    positions: Any = None  # the int, or the int64 array of per-example positions

    def take(self, rows: Any) -> PositionSpec:
        """The same target for the examples `rows` of the batch (a subset, or a
        repetition): used by batched and repeated attribution."""
        rows = np.asarray(rows)
        target = self.target
        if not isinstance(target, (str, int, np.integer)):
            target = np.asarray(target)[rows]
        if self.kind == "fixed":
            return PositionSpec(self.position, target, None, self.log_prob, "fixed",
                                self.positions)
        positions = self.positions[rows]
        return PositionSpec(positions, target, None, self.log_prob, "each", positions)

    def with_classes(self, classes: Any) -> PositionSpec:
        """The same position choice with `classes` (one per example) as the target:
        `"predicted"` resolved once, so that copies of an example keep its class."""
        return PositionSpec(self.position, np.asarray(classes, np.int64), self.mask,
                            self.log_prob, self.kind, self.positions)

    def resolve_predicted(self, selected: Any) -> PositionSpec:
        """`"predicted"` fixed to each example's arg-max class at its position in
        `selected`, the output of the original inputs `(batch, steps, classes)`: so
        that noisy or interpolated copies of an example keep its class."""
        if not (isinstance(self.target, str) and self.target == "predicted"):
            return self
        out = np.asarray(selected)
        if out.ndim < 3:
            raise GradprobeError(
                f"target={self!r}: gp.at picks a position on axis 1 of a sequence output "
                f"(batch, steps, classes); the selected output has shape {out.shape}.")
        pos = np.broadcast_to(np.asarray(self.positions), (out.shape[0],)).astype(np.int64)
        _validate.positions_in_range(pos, out.shape[1], self.position)
        picked = out[np.arange(out.shape[0]), pos]
        if picked.ndim > 2:
            picked = picked.sum(axis=tuple(range(1, picked.ndim - 1)))
        return self.with_classes(np.argmax(picked, axis=-1))

    def __repr__(self) -> str:
        pos = "'last'" if isinstance(self.position, str) else _validate.shown(self.position)
        extra = ", mask=..." if self.mask is not None else ""
        extra += ", log_prob=True" if self.log_prob else ""
        return f"gp.at({pos}, {_validate.shown(self.target)}{extra})"


def at(position: int | Sequence[int] | str, target: Any = "predicted", *, mask: Any = None,
       log_prob: bool = False) -> PositionSpec:
    """The score of a class (or token) at one position of a sequence output.

    For outputs shaped `(batch, steps, classes)`: the logits of a causal language
    model (`(batch, steps, vocabulary)`), or a token classifier. The position is
    chosen first, then the class at that position, so padding positions never
    contribute. An `int` target or `"predicted"` on such an output without
    `gp.at` is an error.

    Args:
        position: Which step of axis 1: an `int` (the same position for every
            example; negative values count from the end, `-1` is the last), a
            sequence of ints (one position per example), or `"last"` with
            `mask=` (each example's last non-padding position, as for a
            right-padded batch of a causal LM).
        target: The class (or token id) at that position: an `int`, a sequence
            of ints (one per example), or `"predicted"` (each example's arg-max
            at its position, and only there).
        mask: With `position="last"`, the padding mask, shape `(batch, steps)`:
            nonzero (or `True`) at real tokens (keras-hub's `padding_mask`).
        log_prob: Use the log-probability `log_softmax(scores)[target]` at that
            position instead of the raw score (logit): what a next-token
            explanation of a causal LM needs.

    Returns:
        A target for `gp.gradients(..., target=...)` and the functions built on it.

    Example:

    >>> import keras_hub      # a tiny GPT-2 built from a config: nothing is downloaded
    >>> backbone = keras_hub.models.GPT2Backbone(
    ...     vocabulary_size=7, num_layers=1, num_heads=2, hidden_dim=8,
    ...     intermediate_dim=16, max_sequence_length=8)
    >>> causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    >>> ids = np.array([[1, 2, 3, 4, 0, 0], [5, 6, 2, 0, 0, 0]])
    >>> x = {"token_ids": ids, "padding_mask": (ids != 0).astype("int32")}
    >>> nxt = gp.at("last", "predicted", mask=x["padding_mask"], log_prob=True)
    >>> g = gp.gradients(causal_lm, x, nxt, wrt="token_embedding@0")
    >>> np.asarray(g.target).shape   # log p(predicted next token), one value per example
    (2,)
    """
    kind, positions = _validate.position(position, mask)
    _validate.flag("log_prob", log_prob, "whether to take the log-softmax of the scores")
    if isinstance(target, str):
        if target != "predicted":
            raise _validate.fail("target", target, "an int class (token) index, one int per "
                                                   "example, or 'predicted'.")
    elif isinstance(target, (bool, np.bool_)):
        raise _validate.fail("target", target, "an int class (token) index; a bool is not one.")
    elif isinstance(target, (int, np.integer)):
        _validate.class_indices(np.asarray([int(target)], np.int64), target)
    else:
        arr = _validate.numeric_array("target", target, "one class (token) index per example")
        if arr.ndim != 1 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise _validate.fail("target", target, f"an int, a 1-D sequence of ints (one "
                                                   f"class per example; got shape {arr.shape} "
                                                   f"and dtype {arr.dtype}), or 'predicted'.")
        _validate.class_indices(arr.astype(np.int64), target)
    lengths = {len(v) for v in (positions, None if isinstance(target, (str, int, np.integer))
                                else np.asarray(target)) if isinstance(v, np.ndarray)}
    if len(lengths) > 1:
        raise _validate.fail("target", target, f"one class per example, as many as the "
                                               f"positions ({len(positions)}).")
    return PositionSpec(position, target, mask, bool(log_prob), kind, positions)


class PositionTarget(Target):
    """The class (or token) score, or log-probability, at one position per example."""

    kind = "position"

    def __init__(self, spec: PositionSpec, batch_size: int):
        self.spec = spec
        self.batch_size = batch_size
        self.classes: np.ndarray | None = None
        args: dict[str, Any] = {}
        if spec.kind == "each":
            _per_example("position", spec.positions, batch_size, spec.position)
            args["positions"] = _argument(np.asarray(spec.positions, np.int32))
        if isinstance(spec.target, (int, np.integer)) and not isinstance(spec.target, str):
            self.classes = np.full((batch_size,), int(spec.target), np.int64)
        elif not isinstance(spec.target, str):
            self.classes = np.asarray(spec.target, np.int64)
            _per_example("target", self.classes, batch_size, spec.target)
        if self.classes is not None:
            args["classes"] = _argument(self.classes.astype(np.int32))
        fixed = spec.positions if spec.kind == "fixed" else None
        self.predicts = self.classes is None
        super().__init__(("position", spec.kind, fixed, self.classes is None, spec.log_prob),
                         args)

    def take(self, rows):
        # (the view of a validated spec: its positions and classes taken at `rows`)
        return PositionTarget(self.spec.take(rows), len(rows))

    def fixed(self, selected):
        if not self.predicts:
            return self
        return PositionTarget(self.spec.resolve_predicted(to_numpy(selected)), self.batch_size)

    def compute(self, out, args):
        # Only what the cache key fixes may be read from `self` here: a cached plan
        # keeps the first target of its key, and later calls only change `args`.
        what = "target=gp.at(...)"
        rank = _rank(out)
        if not _is_floating(out) or rank is None or rank < 3:
            raise GradprobeError(
                f"{what}: gp.at picks a position on axis 1 of a sequence output (batch, steps, "
                f"classes); the selected output has shape {tuple(out.shape)} and dtype "
                f"{_dtype(out)}. Use an int class or 'predicted' directly for a "
                "(batch, classes) output.")
        shape = keras.ops.shape(out)  # static where known; on TensorFlow, a tensor if not
        steps = shape[1]
        if self.spec.kind == "fixed":
            pos = keras.ops.full((shape[0],), self.spec.positions, "int32")
        else:
            pos = args["positions"]
        # Positions are checked against the output's length after the run (`check`);
        # clipping keeps the gather from failing before that.
        pos = keras.ops.clip(pos, -steps, steps - 1)
        pos = keras.ops.where(pos < 0, pos + steps, pos)
        picked = _pick(out, pos)
        scores = class_scores(picked, what, sequence_ok=True)
        if self.spec.log_prob:
            scores = keras.ops.log_softmax(scores, axis=-1)
        n = scores.shape[-1]
        if self.classes is None:
            idx = _argmax(scores)
        else:
            idx = args["classes"]
            if n is not None:
                idx = keras.ops.minimum(idx, n - 1)  # checked against `n` after the run
        value = _pick(scores, idx)
        return value, keras.ops.sum(value), {"num_classes": n, "steps": out.shape[1]}

    def check(self, meta):
        steps = meta.get("steps")
        spec = self.spec
        if spec.mask is not None and steps is not None and np.shape(spec.mask)[1] != steps:
            raise _validate.fail("mask", spec.mask, f"a padding mask with the output's "
                                 f"{steps} positions (axis 1); it has {np.shape(spec.mask)[1]}.")
        positions = np.atleast_1d(np.asarray(spec.positions))
        _validate.positions_in_range(positions, steps, spec.position if not isinstance(
            spec.position, str) else spec.positions)
        if self.classes is not None:
            _validate.classes_in_range(self.classes, meta.get("num_classes"), spec.target)


def _per_example(name: str, arr: np.ndarray, batch_size: int, raw: Any) -> None:
    if arr.shape[0] != batch_size:
        raise _validate.fail(name, raw, f"one entry per example: {batch_size} for the "
                                        f"{batch_size} examples of the inputs (got {arr.shape[0]}).")


class LossValueTarget(Target):
    kind = "loss"

    def __init__(self, spec: LossTarget, batch_size: int):
        args = {"y_true": _argument(spec.y_true)}
        if spec.sample_weight is not None:
            args["sample_weight"] = _argument(spec.sample_weight)
        for name, value in args.items():
            if _rank(value) and value.shape[0] != batch_size:
                raise GradprobeError(
                    f"Expected `{name}` of gp.loss to have one entry per example: it has "
                    f"{value.shape[0]} entries but the inputs have {batch_size} examples. "
                    f"Received: {name}={_validate.shown(getattr(spec, name))}")
        self.fn = spec.fn
        self.sparse = is_sparse_loss(spec.fn)
        self.labels = np.asarray(spec.y_true) if self.sparse else None
        self._rows_of: dict[str, np.ndarray] | None = None  # see `take`
        # Whether the outputs were checked against what the loss expects (see
        # `check_outputs`): one list, shared by the views of `take`: once per target.
        self._checked = [probability_loss(spec.fn) is None]
        super().__init__(("loss", spec.fn, "sample_weight" in args), args)

    def take(self, rows):
        rows = np.asarray(rows)
        if self._rows_of is None:  # (the arrays the views are taken from, converted once)
            self._rows_of = {name: to_numpy(value) for name, value in self.args.items()}
        view = copy.copy(self)
        view.args = {name: _argument(arr[rows]) for name, arr in self._rows_of.items()}
        view.labels = None if self.labels is None else self.labels[rows]
        view._rows_of = None
        return view

    def for_cache(self):
        target = super().for_cache()
        target._rows_of = None
        # A cached plan serves later calls: its own flag (each eager call is checked;
        # a compiled one once per trace, see `check_outputs`).
        target._checked = [probability_loss(self.fn) is None]
        return target

    def compute(self, out, args):
        y_true = args["y_true"]
        sw = args.get("sample_weight")
        meta = {}
        n = out.shape[-1] if self.sparse and _rank(out) else None
        if n is not None:
            # Labels are checked against `n` after the run (`check`); clipping keeps the
            # loss op from failing (or returning NaN on GPU) before that.
            meta["num_classes"] = int(n)
            # (Negative labels were refused by gp.loss, except Keras' `ignore_class`.)
            y_true = keras.ops.minimum(y_true, keras.ops.cast(n - 1, _dtype(y_true)))
        if _is_floating(out) and _is_floating(y_true) and _dtype(y_true) != _dtype(out):
            y_true = keras.ops.cast(y_true, _dtype(out))
        if isinstance(self.fn, keras.losses.Loss):
            value = self.fn(y_true, out, sample_weight=sw)
        else:
            value = self.fn(y_true, out)
            rank = _rank(value)
            if rank and rank > 1:
                value = keras.ops.mean(value, axis=tuple(range(1, rank)))
            if sw is not None:
                value = value * keras.ops.cast(keras.ops.reshape(sw, (-1,)), _dtype(value))
        if not self._checked[0]:
            values = _concrete(out)
            if values is None:  # traced: checked after the run (`check_outputs`)
                meta["probabilities"] = {"output": None, "checked": False}
            else:
                self._warn_probabilities(values)
        return value, keras.ops.sum(value), meta

    def _warn_probabilities(self, values: Any) -> None:
        self._checked[0] = True
        problem = probability_problem(self.fn, values)
        if problem is not None:
            warnings.warn(problem, stacklevel=4)

    def check_outputs(self, outputs: Any, meta: dict) -> None:
        """After a traced (compiled) run: the outputs against what the loss expects,
        on the first call of each trace only (`meta` is the trace's own record, the
        one entry of it that changes), and only where the selected output is one of
        the model's outputs (`evaluate` noted which)."""
        pending = meta.get("probabilities")
        if not pending or pending["checked"] or self._checked[0]:
            return
        pending["checked"] = True
        index = pending["output"]
        leaves = keras.tree.flatten(outputs)
        if index is not None and index < len(leaves):
            values = _concrete(leaves[index])
            if values is not None:
                self._warn_probabilities(values)

    def check(self, meta):
        if meta.get("num_classes") is not None:
            _validate.labels(self.labels, meta["num_classes"],
                             ignore=getattr(self.fn, "ignore_class", None))


class CallableTarget(Target):
    kind = "callable"
    needs_single_output = False

    def __init__(self, fn: Callable):
        self.fn = fn
        super().__init__(("callable", fn), {})

    def compute(self, out, args):
        batch_size = keras.tree.flatten(out)[0].shape[0]
        value = self.fn(out)
        if value is None or not (keras.ops.is_tensor(value) or np.isscalar(value)
                                 or isinstance(value, np.ndarray)):
            raise GradprobeError(
                f"The target callable returned {type(value).__name__}; it must return a "
                "tensor: a scalar, or one value per example."
            )
        value = keras.ops.convert_to_tensor(value)
        shape = tuple(value.shape)
        if shape not in ((), (batch_size,)):
            raise GradprobeError(
                f"The target callable returned a tensor of shape {shape}; it must be a "
                f"scalar or one value per example, shape ({batch_size},). Reduce it, "
                "e.g. lambda y: keras.ops.sum(y[:, 3]) or lambda y: y[:, 3]."
            )
        if not _is_floating(value):
            raise GradprobeError(
                f"The target callable returned dtype {_dtype(value)}; a gradient needs a "
                "floating-point target."
            )
        return value, keras.ops.sum(value), {}


def make_target(target: Any, batch_size: int) -> Target:
    """Resolves the `target` argument of `gp.gradients` for a batch of `batch_size`:
    once per public call (an already resolved `Target` is returned as it is)."""
    if isinstance(target, Target):
        return target
    if isinstance(target, LossTarget):
        return LossValueTarget(target, batch_size)
    if isinstance(target, PositionSpec):
        return PositionTarget(target, batch_size)
    if isinstance(target, str):
        if target == "predicted":
            return PredictedTarget()
        raise _validate.fail(
            "target", target, "an int class index, a sequence of ints (one per example), "
            "'predicted' (the only string target), gp.loss(loss_fn, y_true), or a callable.")
    if isinstance(target, (bool, np.bool_)):
        raise _validate.fail("target", target, "an int class index; a bool is not one.")
    if isinstance(target, (int, np.integer)):
        if not -2**63 <= int(target) < 2**63:
            raise _validate.fail("target", target, "a class index in the range of the selected "
                                                   "output's last axis.")
        return _same_class(int(target), batch_size, target)
    if isinstance(target, keras.losses.Loss):
        raise _validate.fail(
            "target", target, f"gp.loss({type(target).__name__}(...), y_true): a loss object "
            "needs labels, so pass it through gp.loss instead of the bare loss.")
    if callable(target) and not (isinstance(target, np.ndarray) or keras.ops.is_tensor(target)):
        return CallableTarget(target)
    if isinstance(target, (Sequence, np.ndarray)) or keras.ops.is_tensor(target):
        try:
            arr = np.asarray(target)
        except (ValueError, TypeError):
            arr = np.asarray(None)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
            raise _validate.fail(
                "target", target, f"a 1-D sequence of ints, one class per example (got "
                f"shape {arr.shape} and dtype {arr.dtype}).")
        if arr.shape[0] != batch_size:
            raise _validate.fail(
                "target", target, f"one class per example: {batch_size} classes for the "
                f"{batch_size} examples of the inputs (got {arr.shape[0]}).")
        return ClassTarget(_validate.class_indices(arr.astype(np.int64), target), same=False,
                           raw=target)
    raise _validate.fail(
        "target", target, "an int class index, a sequence of ints (one per example), "
        "'predicted', gp.loss(loss_fn, y_true), or a callable f(outputs) returning a scalar or "
        "one value per example.")


# The target of one class for a whole batch, by (backend, class, batch size): made
# once and shared by the calls that ask for it (a Target is never modified: views
# and cache copies are new objects). Making it again costs about 0.1 ms between the
# calls of a compiled model, more than the rest of gradprobe's own Python per call.
# Not on PyTorch, whose class tensor would stay on the device it was made on.
_SAME_CLASS: OrderedDict = OrderedDict()
_SAME_CLASS_LOCK = threading.Lock()
_SAME_CLASS_KEPT = 64


def _same_class(k: int, batch_size: int, raw: Any) -> ClassTarget:
    bk = backends.get()
    cacheable = bk.target_arguments_shareable()
    key = (bk.NAME, k, batch_size)
    if cacheable:
        with _SAME_CLASS_LOCK:
            target = _SAME_CLASS.get(key)
            if target is not None:
                _SAME_CLASS.move_to_end(key)
                return target
    _validate.class_indices(np.asarray([k], np.int64), raw)
    target = ClassTarget(np.full((batch_size,), k, dtype=np.int64), same=True, raw=k)
    if cacheable:
        with _SAME_CLASS_LOCK:
            _SAME_CLASS[key] = target
            while len(_SAME_CLASS) > _SAME_CLASS_KEPT:
                _SAME_CLASS.popitem(last=False)
    return target


# ---------------------------------------------------------------- output choice
def output_names(model: Any) -> list[str]:
    names = getattr(model, "output_names", None)
    return list(names) if names else []


def check_output_choice(model: Any, output: Any, target: Target) -> None:
    """Before any trace: a target that needs one output, on a model that declares
    several (a keras-hub backbone's `sequence_output` and `pooled_output`), needs
    `output=`. Models that declare no outputs (subclassed) are checked after the run
    by `select_output`."""
    if isinstance(target, (ClassTarget, PredictedTarget)):
        tensor = _sequence.declared_output(model, output)
        if tensor is not None and len(tensor.shape) == 3:
            what = f"target={target.label}" if isinstance(target, ClassTarget) else \
                "target='predicted'"
            form = target.form if isinstance(target, ClassTarget) else "'predicted'"
            raise GradprobeError(sequence_error(what, tuple(tensor.shape), form))
    if output is not None or not target.needs_single_output:
        return
    declared = _sequence.declared_outputs(model)
    if declared is None:
        return
    shown = quoted(declared) if isinstance(declared, list) else \
        f"{declared} unnamed: use an index"
    example = repr(declared[0]) if isinstance(declared, list) else "0"
    raise _validate.fail(
        "output", output, f"the output the target is computed from: model "
        f"{getattr(model, 'name', '?')!r} has {len(declared) if isinstance(declared, list) else declared} "
        f"outputs ({shown}) and target {target.kind!r} needs one. Pass e.g. output={example}.")


def pattern_unconnected(model: Any, output: Any, sources: list, unconnected: str) -> str:
    """The rule for patterns on a model with several outputs: with `output=` chosen,
    a `wrt` made only of patterns (`"*.weights"`, `"encoder/*"`) asks for whatever
    of them the selected output depends on, so the sources that feed only the other
    outputs (a BERT backbone's pooler, for `output="sequence_output"`) get exact zero
    gradients, listed in `Gradients.unconnected`, instead of an error. A source named
    explicitly that the output does not depend on still raises (with
    `unconnected="raise"`, the default)."""
    if unconnected != "raise" or output is None or not sources:
        return unconnected
    if any(getattr(s, "explicit", True) for s in sources):  # inputs count as explicit
        return unconnected
    return "zero" if _sequence.declared_outputs(model) is not None else unconnected


def select_output(outputs: Any, output: Any, names: list[str], layer_value: Any,
                  target: Target) -> Any:
    """The tensor (or structure) the target is computed from."""
    leaves = keras.tree.flatten(outputs)
    if output is None:
        if len(leaves) == 1:
            return leaves[0]
        if not target.needs_single_output:
            return outputs
        shown = list(outputs) if isinstance(outputs, dict) else (names or list(range(len(leaves))))
        raise GradprobeError(
            f"The model has {len(leaves)} outputs ({quoted(shown)}) and target {target.kind!r} "
            "needs one: pass output=<name or index>."
        )
    if isinstance(output, (bool, np.bool_)) or not isinstance(output, (str, int, np.integer)):
        raise _validate.fail("output", output, "an output name or index (or a layer name).")
    if isinstance(output, (int, np.integer)):
        if not -len(leaves) <= output < len(leaves):
            raise _validate.fail("output", output, f"an output index in [{-len(leaves)}, "
                                                   f"{len(leaves) - 1}]: the model has "
                                                   f"{len(leaves)} output(s).")
        return leaves[output]
    if isinstance(outputs, dict) and output in outputs:
        return outputs[output]
    if output in names and len(names) == len(leaves):
        return leaves[names.index(output)]
    if layer_value is not None:
        return layer_value
    shown = list(outputs) if isinstance(outputs, dict) else names
    raise GradprobeError(
        f"The model has no output named {output!r}. Its outputs are "
        f"{quoted(shown) if shown else f'{len(leaves)} unnamed (use an index)'}; a layer "
        "name also works, to compute the target on that layer's activation."
    )


# ------------------------------------------------------------- the objective
class Evaluation(NamedTuple):
    """What one forward pass gives the target (see `evaluate`).

    Attributes:
        outputs: The model's outputs.
        selected: The tensor (or structure) the target is computed from.
        value: The target value: a scalar, or one value per example.
        objective: The scalar that is differentiated (`value` summed).
        meta: Facts for `Target.check`, known once the model has run.
    """

    outputs: Any
    selected: Any
    value: Any
    objective: Any
    meta: dict


def _stateless_call(model: Any, x: Any, training: bool) -> Any:
    with keras.StatelessScope():  # moving statistics and seed states stay untouched
        return model(x, training=training)


def evaluate(model: Any, x: Any, target: Target, args: dict[str, Any] | None = None, *,
             output: Any = None, training: bool = False,
             call: Callable[[Any, Any, bool], Any] | None = None,
             layer_value: Callable[[], Any] | None = None,
             names: list[str] | None = None) -> Evaluation:
    """Calls the model, selects the output and computes the target: the one
    place where a forward pass becomes the objective (the capture on every
    backend, attribution's target values, `gp.hvp`, per-example passes).

    Args:
        model: The model.
        x: Its inputs, as `call` takes them.
        target: A resolved target (`make_target`).
        args: The target's arguments (default `target.args`; a compiled caller
            passes the arguments it was given, a cached plan's target has none).
        output: The `output=` of the request (name, index, layer name or `None`).
        training: Passed to the model.
        call: `call(model, x, training) -> outputs`, the forward pass under the
            caller's hooks, scopes and error handling; default: the model's own
            call in a `keras.StatelessScope`.
        layer_value: Called once `call` has returned: the activation of the
            layer that `output=` names when it is not a model output (`None`
            when there is none).
        names: The model's output names (default `output_names(model)`; a
            cached plan keeps them).

    Returns:
        An `Evaluation`: `outputs`, `selected`, `value`, `objective`, `meta`.
        Run it inside the caller's tape (TensorFlow, PyTorch) or differentiated
        function (JAX) to differentiate `objective`.

    Example:

    >>> from gradprobe.core.targets import evaluate, make_target
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4)])
    >>> x = np.ones((3, 2), "float32")
    >>> ev = evaluate(model, x, make_target(3, len(x)))
    >>> tuple(ev.value.shape)   # outputs[:, 3], one score per example
    (3,)
    """
    outputs = (call or _stateless_call)(model, x, training)
    selected = select_output(outputs, output, output_names(model) if names is None else names,
                             None if layer_value is None else layer_value(), target)
    value, objective, meta = target.compute(selected, target.args if args is None else args)
    pending = meta.get("probabilities")
    if pending is not None:  # which model output the target reads, for `check_outputs`
        leaves = keras.tree.flatten(outputs)
        pending["output"] = next((i for i, t in enumerate(leaves) if t is selected), None)
    return Evaluation(outputs, selected, value, objective, meta)
