"""The `Attribution` result and the gradient utility every attribution method
stands on (in the manner of Captum's `_utils/gradient.py`): batched, compiled
input or layer gradients for a target resolved once on the original inputs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from gradprobe import backends
from gradprobe.backends import tensorflow_attribution_backend as tensorflow_attribution
from gradprobe.core import _sequence, _validate
from gradprobe.core.engine import Request, resolve_request
from gradprobe.core.inputs import batch_size
from gradprobe.core.keys import input_keys  # (also imported from here by checks.py)
from gradprobe.core.targets import PositionSpec, evaluate, output_names, to_numpy
from gradprobe.errors import GradprobeError, quoted


class Attribution:
    """Per-example attribution maps from one method.

    `np.asarray(result)` gives the maps (one per example, never averaged over
    the batch), `result.values` the same as a tensor. For a model with several
    inputs (a list, tuple or dict), `result.values` has the inputs' structure,
    with one map per floating-point input and `None` where an input (token ids,
    a mask) was held fixed; `result[name]` gives one map.

    Attributes:
        values: The maps, a tensor with a leading batch axis.
        target: The target value of each example on the original inputs.
        delta: The per-example completeness error, where the method has one
            (Integrated Gradients: sum of attributions minus (f(x) - f(baseline))).
        method: The method's name.
        layer: The layer key, for layer methods.
        fixed: Keys of the inputs held fixed because they are not floating point
            (`"inputs:padding_mask"`).
    """

    def __init__(self, values: Any, target: Any, method: str, delta: Any = None,
                 layer: str | None = None, fixed: tuple[str, ...] = ()):
        self.values = values
        self.target = target
        self.method = method
        self.delta = delta
        self.layer = layer
        self.fixed = tuple(fixed)

    def _single(self) -> Any:
        if isinstance(self.values, (list, tuple, dict)):
            raise GradprobeError(
                f"This attribution has one map per model input ({self._describe()}); take "
                "one with result.values[...] (or result[...]) before converting to an array.")
        return self.values

    def _describe(self) -> str:
        if isinstance(self.values, dict):
            return ", ".join(repr(k) for k, v in self.values.items() if v is not None)
        return f"{len(self.values)} inputs"

    def __getitem__(self, key: Any) -> Any:
        """The map of one model input (multi-input models), by dict key or index."""
        if not isinstance(self.values, (list, tuple, dict)):
            raise GradprobeError("result[...] selects one input of a multi-input model; "
                                 "this attribution has a single map: use np.asarray(result).")
        try:
            value = self.values[key]
        except (KeyError, IndexError, TypeError):
            raise GradprobeError(
                f"No attribution for input {key!r}; the attributed inputs are "
                f"{self._describe()}.") from None
        if value is None:
            raise GradprobeError(
                f"Input {key!r} is not floating point: it was held fixed (fixed={self.fixed}).")
        return value

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = to_numpy(self._single())
        return arr.astype(dtype) if dtype is not None else arr

    def numpy(self) -> np.ndarray:
        return to_numpy(self._single())

    @property
    def shape(self) -> tuple:
        return tuple(self._single().shape)

    def __len__(self) -> int:
        first = next(v for v in keras.tree.flatten(self.values) if v is not None)
        return int(first.shape[0])

    def reduce(self, how: str = "sum") -> np.ndarray:
        """One score per position: the last axis (an embedding's features, an
        image's channels) reduced by `"sum"` (signed) or `"l2"` (its norm).

        Example:

        >>> text_model = keras.Sequential([
        ...     keras.Input((4,), dtype="int32"),
        ...     keras.layers.Embedding(6, 3, name="embedding"),
        ...     keras.layers.GlobalAveragePooling1D(name="pool"),
        ...     keras.layers.Dense(2, name="dense"),
        ... ])
        >>> ids = np.array([[1, 2, 3, 0], [4, 5, 0, 0]])          # token ids, padded
        >>> ig = gp.integrated_gradients(text_model, ids, 1, layer="embedding",
        ...                              progress=False)
        >>> ig.reduce("sum").shape     # (batch, steps): one signed score per token
        (2, 4)
        """
        _validate.choice("how", how, ("sum", "l2"), "how to reduce the last axis")
        arr = to_numpy(self._single()).astype(np.float64)
        if arr.ndim < 3:
            raise GradprobeError(
                f"result.reduce() sums the last axis of maps shaped (batch, positions, "
                f"features); these maps are shaped {arr.shape}. Received: how={how!r}")
        return arr.sum(axis=-1) if how == "sum" else np.sqrt((arr ** 2).sum(axis=-1))

    def __repr__(self) -> str:
        extra = f", layer={self.layer!r}" if self.layer else ""
        extra += f", fixed={self.fixed!r}" if self.fixed else ""
        if isinstance(self.values, (list, tuple, dict)):
            return f"Attribution(method={self.method!r}, inputs=[{self._describe()}]{extra})"
        return f"Attribution(method={self.method!r}, shape={self.shape}{extra})"


# ------------------------------------------------------------------ targets
def fixed_target(model: Any, x: Any, target: Any, output: Any, training: bool) -> Any:
    """The `target` argument with `"predicted"` resolved on `x` (the CLI demo and
    the report show the classes): an array of classes, or the `gp.at` spec."""
    tgt = resolve_request(model, x, target, output=output, training=training).fixed().target
    if isinstance(target, PositionSpec):
        return tgt.spec
    return tgt.classes if isinstance(target, str) and target == "predicted" else target


def compiled_target_values(req: Request, x: Any = None) -> Any:
    """`target_values`, from the engine's compiled function where it applies: a
    forward pass and the (trivial) gradient at the model's last layer, with no
    eager per-layer Python overhead on repeated calls."""
    model, output = req.model, req.output
    last = (getattr(model, "layers", None) or [None])[-1]
    names = output_names(model)
    eager = backends.is_functional() or tensorflow_attribution.executing_eagerly()
    if last is not None and eager and (
            output is None or isinstance(output, int) or output in names):
        try:
            return req.gradients(last, x=x, unconnected="zero").target
        except GradprobeError:
            pass  # the eager pass below raises the same error, or has none to raise
    return target_values(req, x)


def target_values(req: Request, x: Any = None) -> Any:
    """The per-example target values on `x` (default: the request's inputs; one
    forward pass)."""
    ev = evaluate(req.model, req.x if x is None else x, req.target, output=req.output,
                  training=req.training)
    req.target.check(ev.meta)
    # (outside a capture PyTorch still records the graph of the weights: cut it)
    return ev.value if on_tensorflow() else ops.stop_gradient(ev.value)


# ---------------------------------------------------------------- batching
def chunks(total: int, size: int | None) -> Iterator[tuple[int, int]]:
    size = total if not size or size >= total else int(size)
    if size <= 0:
        raise GradprobeError(f"batch_size must be a positive integer; got {size}.")
    for start in range(0, total, size):
        yield start, min(total, start + size)


def batched(fn: Callable[[int, int], Any], total: int, batch_size_: int | None,
            label: str, progress: bool | None) -> list[Any]:
    """Runs `fn(start, stop)` over chunks of `total`, with a rich progress bar
    when there are several chunks (and `progress` is not False)."""
    spans = list(chunks(total, batch_size_))
    with progress_bar(label, total, len(spans), progress) as advance:
        out = []
        for a, b in spans:
            out.append(fn(a, b))
            advance(b - a)
    return out


@contextlib.contextmanager
def progress_bar(label: str, total: int, parts: int,
                 progress: bool | None) -> Iterator[Callable[[int], None]]:
    """Yields `advance(k)`; a transient rich progress bar when there are several
    parts (and `progress` is not False), otherwise a no-op."""
    show = progress if progress is not None else parts > 1
    if not show or parts <= 1:
        yield lambda k: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda k: bar.update(task, advance=k)


# ------------------------------------------------------ streamed attribution
# Integrated Gradients and SmoothGrad evaluate the gradient at `reps` (steps or
# samples) modified copies of each of `n` examples: `reps * n` rows, row
# `r = rep * n + i` being copy `rep` of example `i`. The rows are processed in
# chunks of one fixed size (the last chunk padded with zero-weight rows), each
# chunk built on the device when it is needed, so memory is bounded by the chunk
# size and not by `reps`; every chunk goes through the same compiled gradient
# function (one trace per chunk shape), and the weighted gradients are summed
# into a per-example accumulator on the device.

_BYTES_FACTOR = 4  # a row's input, its recorded copy, its gradient, the weighted gradient


def row_bytes(tensors: list[Any]) -> int:
    """Bytes of one row (example) of each tensor, summed."""
    total = 0
    for t in tensors:
        shape = tuple(t.shape)[1:]
        total += int(np.prod(shape, dtype=np.int64)) * itemsize(t.dtype)
    return total


def itemsize(dtype: Any) -> int:
    """Bytes per element of a dtype of any backend (`"float32"` -> 4, `"bool"` -> 1)."""
    name = keras.backend.standardize_dtype(dtype)
    bits = "".join(c for c in name if c.isdigit())
    return max(1, int(bits) // 8) if bits else 1


def available_memory() -> int | None:
    """Bytes of host memory available now (Linux `MemAvailable`), or `None`."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def chunk_rows(*, what: str, reps_name: str, reps: int, n: int, batch_size_: int | None,
               per_row: int, max_bytes: int | None) -> int:
    """The number of rows per chunk (`batch_size`, or all `reps * n` rows when it
    is `None`), after checking that one chunk's inputs and gradients fit in
    `max_bytes` (default: the available memory), and that the whole request stays
    within `_validate.MAX_TOTAL_ROWS` modified inputs. Refuses before allocating."""
    total = int(reps) * n
    rows = total if not batch_size_ or batch_size_ >= total else int(batch_size_)
    need = rows * per_row * _BYTES_FACTOR
    if max_bytes is not None:
        limit, named = int(max_bytes), f"max_bytes={int(max_bytes):,}"
    else:
        limit = available_memory()
        named = f"the {limit or 0:,} bytes of memory available" if limit else ""
    if limit is None or need <= limit:
        _validate.total_work(what, reps_name, reps, n)  # (after the memory: it names GiB)
        return rows
    how = (f"batch_size={batch_size_}" if batch_size_ else
           f"all {reps_name}={reps:,} x {n} example(s) at once (batch_size=None)")
    fit = limit // (per_row * _BYTES_FACTOR)
    if fit >= 1:
        fix = (f"Pass {'a smaller ' if batch_size_ else ''}batch_size (at most {fit:,} rows fit "
               "by this estimate, which leaves out the model's own activations: try "
               f"batch_size={min(fit, 32):,})")
        if not batch_size_:
            fix += f" or fewer {reps_name}"
    else:
        fix = "Even one row does not fit: use fewer or smaller inputs"
    raise GradprobeError(
        f"{what} would evaluate {rows:,} modified inputs per chunk ({how}); their inputs and "
        f"gradients alone need {need:,} bytes ({need / 2**30:.2f} GiB), more than {named}. "
        + fix + (", or raise max_bytes." if max_bytes is not None else
                 ", or pass max_bytes= to set the limit yourself."))


def accumulator_dtype(dtype: Any) -> str:
    """Sums of gradients are kept in float32 at least (float64 stays float64)."""
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


# The rows of a chunk are built and summed by TensorFlow's compiled helpers
# (`gradprobe.backends.tensorflow_attribution`) on TensorFlow, and by the
# `keras.ops` code below on JAX and PyTorch. Indices, interpolation points and
# weights come in as NumPy arrays.
def on_tensorflow() -> bool:
    return not backends.is_functional()


def mean(x: Any, axis: int | tuple[int, ...], keepdims: bool = False) -> Any:
    """`keras.ops.mean`, except that on JAX and PyTorch it is a sum divided by
    the count, since Keras' JAX `mean` computes float64 values in float32."""
    if on_tensorflow():
        return ops.mean(x, axis=axis, keepdims=keepdims)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    return ops.sum(x, axis=axes, keepdims=keepdims) / count


def _index(idx: np.ndarray) -> Any:
    return ops.convert_to_tensor(np.asarray(idx, np.int32))


def _column(x: Any) -> tuple[int, ...]:
    """The shape `(-1, 1, ..., 1)` that broadcasts one value per row over `x`."""
    return (-1,) + (1,) * (len(x.shape) - 1)


def take_rows(x: Any, idx: np.ndarray) -> Any:
    """Rows `x[idx]`."""
    if on_tensorflow():
        return tensorflow_attribution.gather(x, tensorflow_attribution.constant(idx))
    return ops.take(x, _index(idx), axis=0)


def interpolate_rows(x: Any, base: Any, idx: np.ndarray, alpha: np.ndarray) -> Any:
    """Rows `(1 - alpha) * base[idx] + alpha * x[idx]` (exactly `x` at alpha 1
    and `base` at 0), computed in float32 or wider and returned in `x`'s dtype."""
    if on_tensorflow():
        tf_ = tensorflow_attribution
        return tf_.interpolate(x, base, tf_.constant(idx), tf_.constant(alpha))
    wide = accumulator_dtype(x.dtype)
    xs = ops.cast(take_rows(x, idx), wide)
    bs = ops.cast(take_rows(base, idx), wide)
    a = ops.reshape(ops.convert_to_tensor(np.asarray(alpha, wide)), _column(x))
    return ops.cast((1 - a) * bs + a * xs, x.dtype)


def numpy_noise(shape: tuple, seed: int, j: int, rows: np.ndarray, dtype: str) -> np.ndarray:
    """The SmoothGrad noise of rows `rows` of floating input number `j` on JAX and
    PyTorch: row `r` is `np.random.default_rng((seed, j, r)).standard_normal(shape)`
    (the same for a row whatever the chunking, and on both backends)."""
    out = np.empty((len(rows), *shape), dtype)
    for k, r in enumerate(rows):
        out[k] = np.random.default_rng((int(seed), int(j), int(r))).standard_normal(shape)
    return out


def noisy_rows(x: Any, scale: Any, idx: np.ndarray, rows: np.ndarray, seed: int, j: int) -> Any:
    """Rows `x[idx] + scale[idx] * eps` for floating input number `j`: on
    TensorFlow, the noise of row `r` is `tf.random.stateless_normal(x.shape[1:],
    seed=(seed + j, r))`; on JAX and PyTorch it is `numpy_noise`."""
    if on_tensorflow():
        tf_ = tensorflow_attribution
        return tf_.noisy(x, scale, tf_.constant(idx), tf_.constant(rows),
                         tf_.constant(np.int64(int(seed) + j)))
    wide = accumulator_dtype(x.dtype)
    eps = ops.convert_to_tensor(numpy_noise(tuple(x.shape)[1:], seed, j, rows, wide))
    xs = ops.cast(take_rows(x, idx), wide)
    return ops.cast(xs + ops.cast(take_rows(scale, idx), wide) * eps, x.dtype)


def accumulate_rows(acc: list[Any], grads: list[Any], idx: np.ndarray, w: np.ndarray,
               n: int) -> list[Any]:
    """`acc[k][idx[j]] += w[j] * grads[k][j]` for every row `j` (in `acc`'s dtype)."""
    if on_tensorflow():
        tf_ = tensorflow_attribution
        ti, tw = tf_.constant(idx), tf_.constant(w)
        return [tf_.accumulate(a, g, ti, tw) for a, g in zip(acc, grads)]
    out = []
    segments = _index(idx)
    for a, g in zip(acc, grads):
        wg = ops.cast(g, a.dtype) * ops.reshape(
            ops.convert_to_tensor(np.asarray(w, keras.backend.standardize_dtype(a.dtype))),
            _column(g))
        out.append(a + ops.segment_sum(wg, segments, num_segments=n))
    return out


def _out_of_memory(e: BaseException) -> bool:
    """A backend's out-of-memory error (TensorFlow's ResourceExhaustedError, an
    XLA RESOURCE_EXHAUSTED, PyTorch's OutOfMemoryError) or a MemoryError."""
    return isinstance(e, MemoryError) or type(e).__name__ in (
        "ResourceExhaustedError", "OutOfMemoryError") or "RESOURCE_EXHAUSTED" in str(e)[:2000]


def stream(*, n: int, reps: int, rows: int, weights: Callable[[np.ndarray], Any],
           step: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[Any, Any]], acc: Any,
           label: str, progress: bool | None,
           keep: tuple[int, ...] = (), target: Any = None) -> tuple[Any, dict[int, Any]]:
    """Sums `weights(rep) * gradient` over the `reps * n` rows, `rows` at a time.

    `weights(rep)` gives the weight of each copy number in `rep`; `step(idx, rep,
    r)` returns `(gradient rows, target values)` for example indices `idx`, copy
    numbers `rep` and row numbers `r` (`rows` of each, NumPy arrays), the
    gradient rows as a list (one per attributed tensor). Returns the per-example
    accumulators `acc` (a list) with every row's weighted gradient added, and for
    each copy number in `keep` the per-example target values of that copy
    (`None` when the target is not per example), gathered on the way at no extra
    cost."""
    total = int(reps) * n
    parts = -(-total // rows)
    kept: dict[int, Any] = {}
    try:
        with progress_bar(label, total, parts, progress) as advance:
            for lo in range(0, total, rows):
                r = np.arange(lo, lo + rows, dtype=np.int64)
                valid = r < total
                r = np.where(valid, r, r % n)  # padding: copy 0 of some example, weight 0
                idx, rep = r % n, r // n
                w = np.where(valid, np.asarray(weights(rep), np.float64), 0.0)
                g, values = step(idx, rep, r)
                acc = accumulate_rows(acc, g, idx, w, n)
                for k in keep:
                    at = np.nonzero(valid & (rep == k))[0]
                    if at.size:
                        kept[k] = _keep_values(kept.get(k, 0), values, idx, at, n, rows)
                advance(int(valid.sum()))
    except Exception as e:
        if not _out_of_memory(e):
            if isinstance(e, GradprobeError) or getattr(target, "kind", None) != "callable":
                raise
            raise GradprobeError(
                f"{label} evaluates the target on chunks of {rows:,} modified copies of the "
                f"{n} example(s), and the callable target failed there ({type(e).__name__}: "
                f"{_last_line(e)}). A callable that closes over per-example constants (one "
                f"class, label or position per example of the batch) only works on a batch "
                f"of {n}: pass them to gradprobe instead (target=[one class per example], "
                f"gp.at(position, classes) for sequences, gp.loss(fn, y_true)), or write a "
                f"target that works for any batch size. Received: target={target.fn!r}") from e
        raise GradprobeError(
            f"{label} ran out of memory on chunks of {rows:,} modified inputs. Pass a smaller "
            f"batch_size (e.g. batch_size={max(1, rows // 4)}).") from e
    return acc, kept


def _last_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _keep_values(so_far: Any, values: Any, idx: np.ndarray, at: np.ndarray, n: int,
                 rows: int) -> Any:
    """`so_far` (per-example values, or 0 at first) updated with `values[at]` at
    examples `idx[at]`; `None` once the target turns out not to be per example."""
    if so_far is None or getattr(values, "shape", None) is None or \
            tuple(values.shape) != (rows,):
        return None
    if on_tensorflow():
        return tensorflow_attribution.keep(None if isinstance(so_far, int) else so_far, values, idx, at, n)
    if isinstance(so_far, int):
        so_far = ops.zeros((n,), values.dtype)
    return ops.scatter_update(so_far, _index(idx[at])[:, None], ops.take(values, _index(at)))


class ModelInputs:
    """The prepared inputs of an attribution call, as flat leaves: which ones are
    floating point (attributed) and which are held fixed (token ids, masks).

    Attributes:
        x: The inputs as the model takes them (a tensor or a list/tuple/dict).
        leaves: The flat list of input tensors.
        keys: Their result keys: `"inputs"`, or `"inputs:0"`, `"inputs:name"`.
        floating: Indices of the floating-point leaves.
    """

    def __init__(self, x: Any, model: Any = None):
        self.x = x
        self.model = model
        self.leaves = keras.tree.flatten(self.x)
        self.keys = input_keys(self.x)
        self.floating = [i for i, t in enumerate(self.leaves) if is_floating(t)]
        self.structured = isinstance(self.x, (list, tuple, dict))
        self.n = batch_size(self.x)

    @property
    def fixed(self) -> tuple[str, ...]:
        """Keys of the inputs held fixed (not floating point)."""
        return tuple(k for i, k in enumerate(self.keys) if i not in self.floating)

    @property
    def float_keys(self) -> list[str]:
        return [self.keys[i] for i in self.floating]

    def require_floating(self, what: str) -> None:
        if self.floating:
            return
        ints = ", ".join(f"{k!r} ({dtype_name(self.leaves[i])})" for i, k in enumerate(self.keys))
        hint = (" For token ids, attribute to the embedding layer's output instead "
                "(layer=<embedding layer>).")
        if self.model is not None:
            _, hint = _sequence.integer_input_hint(self.model, self.keys, list(self.keys),
                                                   arg="layer")
        raise GradprobeError(
            f"{what} needs floating-point inputs to attribute to; this model's inputs are "
            f"{ints}: integer inputs (token ids, masks) have no gradient.{hint} "
            f"Received: inputs={_validate.shown(self.x)}")

    def pack(self, per_leaf: dict[int, Any]) -> Any:
        """`per_leaf` (leaf index -> tensor) in the inputs' structure, with `None`
        at fixed inputs; a plain tensor for a single-input model."""
        if not self.structured:
            return per_leaf[0]
        return keras.tree.pack_sequence_as(self.x, [per_leaf.get(i) for i in
                                                    range(len(self.leaves))])

    def pack_all(self, leaves: list[Any]) -> Any:
        """A full list of leaves in the inputs' structure."""
        return leaves[0] if not self.structured else keras.tree.pack_sequence_as(self.x, leaves)

    def rows(self, idx: Any, replaced: dict[int, Any] | None = None) -> Any:
        """The inputs for rows `idx` (example indices, a NumPy array), with the leaves in
        `replaced` (index -> rows) taken from there instead."""
        replaced = replaced or {}
        flat = [replaced[i] if i in replaced else take_rows(t, idx)
                for i, t in enumerate(self.leaves)]
        return flat[0] if not self.structured else keras.tree.pack_sequence_as(self.x, flat)

    def baseline(self, baseline: Any, hold_fixed: bool) -> list[Any]:
        """The baseline of every leaf, broadcast to the inputs' shapes: zeros by
        default, except that with `hold_fixed` a fixed (integer) leaf is its own
        baseline (it is held at its value along the path)."""
        if baseline is None:
            given = [None] * len(self.leaves)
        elif not self.structured:
            given = [baseline]
        else:
            given = None
            if isinstance(baseline, dict) and isinstance(self.x, dict):
                given = [baseline.get(k) for k in sorted(self.x)]
                unknown = set(baseline) - set(self.x)
                given = None if unknown else given
            elif isinstance(baseline, (list, tuple)) and isinstance(self.x, (list, tuple)):
                given = list(baseline)
            if given is None or len(given) != len(self.leaves):
                raise GradprobeError(
                    f"baseline must have the inputs' structure ({len(self.leaves)} inputs: "
                    f"{', '.join(self.keys)}), with None where the default applies; got "
                    f"{type(baseline).__name__}.")
        out = []
        for i, (t, b) in enumerate(zip(self.leaves, given)):
            if hold_fixed and i not in self.floating:
                out.append(t)
            elif b is None:
                out.append(ops.zeros_like(t))
            else:
                name = "baseline" if not self.structured else f"baseline[{self.keys[i]!r}]"
                if on_tensorflow():
                    _validate.baseline(b, t, name)
                else:  # (`_validate` reads NumPy arrays and TensorFlow tensors)
                    b = b if isinstance(b, np.ndarray) or not ops.is_tensor(b) else to_numpy(b)
                    _validate.baseline(b, np.empty(tuple(t.shape), dtype_name(t)), name)
                b = np.asarray(b) if not ops.is_tensor(b) else b
                if i not in self.floating:  # token ids: integers in the embedding's range
                    lookups = (_sequence.input_lookups(self.model, self.keys)[i]
                               if self.model is not None else [])
                    _validate.token_ids(name, b, lookups, spec=dtype_name(t))
                out.append(ops.broadcast_to(ops.cast(b, t.dtype), tuple(t.shape)))
        return out


def is_floating(t: Any) -> bool:
    """True for a floating-point tensor of any backend."""
    return keras.backend.is_float_dtype(keras.backend.standardize_dtype(t.dtype))


def dtype_name(t: Any) -> str:
    return keras.backend.standardize_dtype(t.dtype)


def input_gradients(req: Request, mi: ModelInputs, *, batch_size_: int | None = None,
                    label: str = "gradients",
                    progress: bool | None = None) -> tuple[dict[int, Any], Any]:
    """`({leaf index: d target / d input}, target values)` for every floating input
    of a (possibly large) batch, in chunks. The target values are per example, or
    `None` for a scalar target."""
    keys = mi.float_keys

    def run(a: int, b: int) -> Any:
        whole = b - a == mi.n  # one chunk: the inputs as they are (no slicing op)
        xs = mi.x if whole else keras.tree.map_structure(lambda t: t[a:b], mi.x)
        g = req.gradients(keys, x=xs, rows=None if whole else np.arange(a, b))
        return [g[k] for k in keys], g.target

    parts = batched(run, mi.n, batch_size_, label, progress)
    values = [t for _, t in parts]
    per_example = all(getattr(t, "shape", ()) and len(t.shape) == 1 for t in values)
    if len(parts) == 1:
        grads, value = parts[0][0], (values[0] if per_example else None)
    else:
        grads = [ops.concatenate([p[0][j] for p in parts], axis=0) for j in range(len(keys))]
        value = ops.concatenate(values, axis=0) if per_example else None
    return dict(zip(mi.floating, grads)), value


def single_input(x: Any, what: str) -> Any:
    """The one input leaf of prepared inputs `x`, which must be floating point."""
    leaves = keras.tree.flatten(x)
    if len(leaves) != 1:
        raise GradprobeError(
            f"{what} works on single-input models; this model takes {len(leaves)} inputs.")
    if not is_floating(leaves[0]):
        raise GradprobeError(
            f"{what} needs floating-point inputs; got {dtype_name(leaves[0])}. For token ids, "
            "attribute to the embedding layer instead (layer=...).")
    return leaves[0]


def layer_key(g: Any, layer: Any) -> str:
    """The one activation key a layer selector produced, or a clear error."""
    keys = [k for k in g if g.kinds[k] == "activation"]
    if len(keys) != 1:
        calls = sorted({k.split(":")[0] for k in keys})
        raise GradprobeError(
            f"Layer {layer!r} has {len(keys)} captured outputs ({quoted(keys)}): it is called "
            f"more than once or returns several tensors. Choose one, e.g. {quoted(calls)}.")
    return keys[0]
