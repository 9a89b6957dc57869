"""Argument checks shared by every public function.

Each check takes the argument's name and value, returns the value in the form
the caller uses (a Python int, a float, a tensor), and otherwise raises a
`GradprobeError` in the Keras convention: what was expected, why, the fix, and
`Received: name=value`. The checks are pure: they never call the model and
never change anything they are given.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np

from gradprobe import backends
from gradprobe.core.keys import input_keys
from gradprobe.errors import GradprobeError

INT32_MAX = 2**31 - 1


def _is_tensor(value: Any) -> bool:
    """A tensor (or variable) of the Keras backend in use."""
    return keras.ops.is_tensor(value) or isinstance(value, keras.Variable)


def _dtype_name(value: Any) -> str:
    """The standard dtype name of a tensor or array (`"float32"`, `"string"`...)."""
    dtype = getattr(value, "dtype", value)
    try:
        return keras.backend.standardize_dtype(dtype)
    except (ValueError, TypeError, AttributeError):
        return str(getattr(dtype, "name", dtype))


def _is_float(value: Any) -> bool:
    return keras.backend.is_float_dtype(_dtype_name(value))


def _is_int_dtype(value: Any) -> bool:
    return keras.backend.is_int_dtype(_dtype_name(value))


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)`, shortened for arrays and long values (small arrays show their values)."""
    if isinstance(value, np.ndarray) or _is_tensor(value):
        size = getattr(value, "size", None)
        if size is None and hasattr(value, "shape") and hasattr(value.shape, "num_elements"):
            size = value.shape.num_elements()  # a TensorFlow shape
        if callable(size):  # torch.Tensor.size()
            size = math.prod(value.shape)
        ndim = len(getattr(value, "shape", ()) or ())
        if size is not None and 0 < size <= 16 and ndim <= 1 and (isinstance(value, np.ndarray)
                                                or hasattr(value, "numpy")):
            try:
                return shown(np.asarray(value).tolist(), limit)
            except Exception:  # pragma: no cover - symbolic tensors
                pass
        dtype = getattr(getattr(value, "dtype", None), "name", getattr(value, "dtype", "?"))
        shape = getattr(value, "shape", None)
        kind = type(value).__name__
        return f"<{kind} shape={tuple(shape) if shape is not None else '?'} dtype={dtype}>"
    try:
        text = repr(value)
    except Exception:  # pragma: no cover - a broken __repr__
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(name: str, value: Any, expected: str) -> GradprobeError:
    """The Keras-style error: `Expected `name` to be ... Received: name=value`."""
    return GradprobeError(f"Expected `{name}` to be {expected} Received: {name}={shown(value)}")


# ---------------------------------------------------------------------- model
def _is_tf_keras(obj: Any) -> bool:
    return _is_tf_keras_type(type(obj))


@functools.lru_cache(maxsize=256)
def _is_tf_keras_type(cls: type) -> bool:
    return any(getattr(c, "__module__", "").split(".")[0] == "tf_keras"
               or getattr(c, "__module__", "").startswith("keras.engine")
               or getattr(c, "__module__", "").startswith("tensorflow.python.keras")
               for c in cls.__mro__)


def model(value: Any, name: str = "model") -> Any:
    """A Keras 3 model (or layer), built or buildable by one call."""
    if _is_tf_keras(value):
        raise fail(name, value,
                   "a Keras 3 model (keras.Model): tf_keras (Keras 2) models are not "
                   "supported. Rebuild the model with `import keras` (Keras 3), or load its "
                   "weights into a Keras 3 copy.")
    if not isinstance(value, keras.layers.Layer):
        raise fail(name, value,
                   "a Keras 3 model (keras.Model, e.g. keras.Sequential or keras.Model(inputs, "
                   "outputs)): pass the model whose gradients you want.")
    return value


def backend_supported(function: str, functional: tuple[str, ...] = ()) -> None:
    """Refuses a Keras backend that `function` does not run on yet: everything
    runs on TensorFlow; `functional` names the other backends it runs on."""
    if backends.runs_on(functional):
        return
    raise GradprobeError(
        f"{function} is not supported on the {backends.name()!r} backend of Keras yet; it runs on "
        f"TensorFlow (set KERAS_BACKEND=tensorflow before importing keras); {backends.SUPPORTED_ELSEWHERE}.")


# --------------------------------------------------------------------- inputs
# Types of leaves found to be dense tensors (not sparse, not ragged): their later
# leaves only need the dtype check.
_DENSE_TENSOR_TYPES: set[type] = set()


def _leaf_problem(leaf: Any) -> str | None:
    """Why a leaf of `inputs` cannot be fed to the model, or `None`."""
    if type(leaf) in _DENSE_TENSOR_TYPES:
        return _complex_problem(_dtype_name(leaf))
    composite = backends.composite_kind(leaf)
    if composite == "sparse":
        return ("a SparseTensor: gradprobe needs dense inputs. Convert it with "
                "tf.sparse.to_dense(x) (or keras.ops.convert_to_tensor).")
    if composite == "ragged":
        return ("a RaggedTensor: gradprobe needs dense inputs with a leading batch axis. Pad it "
                "with x.to_tensor() (and mask the padding in the model if needed).")
    if leaf is None:
        return "None: every input of the model needs a value."
    if _is_tensor(leaf):
        _DENSE_TENSOR_TYPES.add(type(leaf))
        return _complex_problem(_dtype_name(leaf))
    try:
        arr = np.asarray(leaf)
    except Exception:  # ragged Python lists and other odd objects
        return ("not convertible to an array (nested lists of different lengths?): pass a "
                "NumPy array or a tensor with a leading batch axis.")
    if np.iscomplexobj(arr):
        return _complex_problem(str(arr.dtype))
    if arr.dtype == object:
        return ("an object array (nested lists of different lengths, or mixed types): pass a "
                "numeric NumPy array or a tensor with a leading batch axis.")
    return None


def _complex_problem(dtype: str) -> str | None:
    if not dtype.startswith("complex"):
        return None
    return (f"complex ({dtype}): Keras layers compute in real dtypes and gradients of "
            "complex inputs are not defined here. Pass the real and imaginary parts as two "
            "real inputs (or channels).")


def inputs(value: Any, name: str = "inputs") -> None:
    """A batch the model can take: no None, sparse, ragged, complex or object leaves."""
    if value is None:
        raise fail(name, value,
                   "the batch the model should run on (an array, a tensor, or a list/dict "
                   "of them for a multi-input model).")
    if isinstance(value, (list, tuple, dict)) and not value:
        raise fail(name, value, "a non-empty batch; got an empty container.")
    for leaf in _leaves(value):
        problem = _leaf_problem(leaf)
        if problem is not None:
            raise GradprobeError(f"Expected `{name}` to be a dense real-valued batch; one input "
                                 f"is {problem} Received: {name}={shown(leaf)}")


def _leaves(value: Any) -> list[Any]:
    # Sparse and ragged tensors are leaves here (not expanded into their components).
    if isinstance(value, dict):
        return [leaf for k in value for leaf in _leaves(value[k])]
    if isinstance(value, (list, tuple)) and any(
            isinstance(v, (list, tuple, dict, np.ndarray)) or _is_tensor(v)
            or backends.composite_kind(v) is not None for v in value):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def batch(leaves: list[Any], spec_dtypes: list[Any] | None = None,
          name: str = "inputs", exact_count: bool = True) -> int:
    """The batch size shared by all (converted) input leaves; > 0. With the model's
    input dtypes (`spec_dtypes`), text passed to a numeric input is refused, and
    (`exact_count`, not for dicts, which Keras matches by name) so is a different
    number of inputs."""
    sizes = []
    specs = spec_dtypes if spec_dtypes and len(spec_dtypes) == len(leaves) else [None] * len(leaves)
    for leaf, spec in zip(leaves, specs):
        if spec is not None and _dtype_name(leaf) == "string" and spec != "string":
            raise GradprobeError(
                f"Expected `{name}` to be numeric: the model takes {spec} inputs, and got "
                f"strings. Preprocess the text first (e.g. a keras.layers.TextVectorization "
                f"outside the model). Received: {name}={shown(leaf)}")
        shape = tuple(leaf.shape.as_list()) if hasattr(leaf.shape, "as_list") else \
            tuple(leaf.shape)
        if not shape:
            raise GradprobeError(
                f"Expected `{name}` to have a leading batch axis; got a scalar. Add one, "
                f"e.g. x[None]. Received: {name}={shown(leaf)}")
        sizes.append(shape[0])
    if exact_count and spec_dtypes and len(spec_dtypes) != len(leaves):
        raise GradprobeError(
            f"Expected `{name}` to hold {len(spec_dtypes)} inputs, one per model input (a list "
            f"or dict); got {len(leaves)}. Received: {name}="
            + ", ".join(shown(v) for v in leaves))
    known = {s for s in sizes if s is not None}
    if len(known) > 1:
        raise GradprobeError(
            f"Expected every input in `{name}` to have the same batch size; got batch sizes "
            f"{sizes}. Received: {name}=" + ", ".join(shown(v) for v in leaves))
    if 0 in known:
        raise GradprobeError(
            f"Expected `{name}` to be a non-empty batch; it has 0 examples. Pass at least "
            f"one example. Received: {name}={shown(leaves[0])}")
    return sizes[0] if sizes else None


# ------------------------------------------------- the model's own inputs
def model_input_names(model: Any) -> list[str]:
    """The names of a functional model's inputs (the dict keys of a dict-input
    model, else the input tensors' names); empty when the model does not declare
    them (a subclassed model). The CLI's `.npz` matching reads the same names."""
    try:
        struct = model.input  # public for functional models; raises for subclassed ones
    except (AttributeError, ValueError, RuntimeError, TypeError):
        struct = None
    if isinstance(struct, dict):
        return [str(k) for k in struct]
    try:
        flat = list(getattr(model, "inputs", None) or [])
    except (AttributeError, ValueError, RuntimeError):  # pragma: no cover
        flat = []
    return [str(getattr(t, "name", "")) for t in flat]


def input_names(model: Any, inputs: Any, name: str = "inputs") -> None:
    """A dict of inputs has exactly the model's input names as keys: an extra key
    would be dropped silently by Keras, a missing one fails deep in the model."""
    if not isinstance(inputs, dict):
        return
    names = model_input_names(model)
    if not names or not all(names):
        return
    keys = [str(k) for k in inputs]
    unknown = [k for k in keys if k not in names]
    missing = [n for n in names if n not in keys]
    if not unknown and not missing:
        return
    what = "; ".join(part for part in (
        f"no model input is named {unknown} (drop {'it' if len(unknown) == 1 else 'them'})"
        if unknown else "",
        f"it lacks {missing} (add one array per input)" if missing else "") if part)
    raise GradprobeError(
        f"Expected `{name}` to have exactly the model's input names as keys, {names}: {what}. "
        f"Received: {name}={{{', '.join(repr(k) for k in keys)}}}")


def _concrete(leaf: Any) -> np.ndarray | None:
    """The values of a NumPy array or an eager (concrete) tensor, or `None` for a
    symbolic one (inside the caller's tf.function or jax.jit): no host round-trip
    is added to a compiled path."""
    if isinstance(leaf, np.ndarray):
        return leaf
    if backends.is_functional():
        if not backends.get().is_concrete(leaf):
            return None
    elif not backends.get().is_eager_tensor(leaf):
        return None
    try:
        return np.asarray(keras.ops.convert_to_numpy(leaf))
    except Exception:  # pragma: no cover - a value that cannot be read here
        return None


def _int_dtype(dtype: Any) -> bool:
    try:
        return keras.backend.is_int_dtype(_dtype_name(dtype))
    except (ValueError, TypeError):  # text, or a dtype Keras does not know
        return False


def _float_dtype(dtype: Any) -> bool:
    try:
        return keras.backend.is_float_dtype(_dtype_name(dtype))
    except (ValueError, TypeError):
        return False


def leaf_name(name: str, key: str) -> str:
    """`inputs`, `inputs['token_ids']` or `inputs[1]` for the result key of a leaf."""
    if ":" not in key:
        return name
    part = key.split(":", 1)[1]
    return f"{name}[{part}]" if part.isdigit() else f"{name}[{part!r}]"


def token_ids(name: str, value: Any, lookups: list[tuple[str, int]],
              spec: Any = None) -> None:
    """Integer values for an integer input: no fraction (a float array for an
    integer input would be truncated silently), and, for ids that feed an
    embedding (`lookups`: `(selector, input_dim)`), ids in `[0, input_dim)` (out of
    range, TensorFlow and PyTorch fail deep in the model and JAX returns NaN).
    Checked on concrete values only."""
    dtype = _dtype_name(value)
    spec_int = spec is not None and _int_dtype(spec)
    is_float = _float_dtype(dtype)
    if not lookups and not (spec_int and is_float):
        return
    if not (is_float or _int_dtype(dtype)):
        return
    arr = _concrete(value)
    if arr is None or not arr.size:
        return
    feeds = ""
    if lookups:
        selector = lookups[0][0]
        layer = selector.split("@")[0]
        tied = " (a tied embedding: @0 is its lookup)" if "@" in selector else ""
        feeds = (f" it feeds the embedding layer {layer!r} (wrt={selector!r}{tied})")
    if is_float:
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            first = arr[bad].ravel()[:4].tolist()
            kind = f"the model's input is {_dtype_name(spec)}" if spec_int else "they are ids"
            raise GradprobeError(
                f"Expected `{name}` to hold integer values ({kind}); got {dtype} values with "
                f"a fractional part or not finite ({', '.join(map(repr, first))}), which would "
                f"be truncated silently{';' + feeds if feeds else ''}. Pass integer ids, e.g. "
                f"x.astype('int32'). Received: {name}={shown(value)}")
    if not lookups:
        return
    dims = [d for _, d in lookups if d > 0]
    if not dims:
        return
    size = min(dims)
    lo, hi = arr.min(), arr.max()
    if lo >= 0 and hi < size:
        return
    flat = arr.ravel()
    bad_ids = sorted({int(v) for v in flat[(flat < 0) | (flat >= size)][:4096].tolist()})
    raise GradprobeError(
        f"Expected `{name}` to hold token ids in [0, {size - 1}]:{feeds}, whose vocabulary "
        f"has {size} entries (input_dim={size}). Id(s) {', '.join(map(str, bad_ids[:8]))} "
        f"are out of range (JAX would return NaN for them, TensorFlow and PyTorch fail "
        f"inside the model). Map unknown tokens to an id in range (the tokenizer's "
        f"unknown-token id) or build the embedding with a larger input_dim. "
        f"Received: {name}={shown(value)}")


def model_inputs(model: Any, inputs: Any, leaves: list[Any], spec_dtypes: list[Any],
                 name: str = "inputs", *,
                 lookups: Callable[[Any, list[str]], list[list[tuple[str, int]]]]) -> None:
    """The one input check of every backend, before anything is traced: a dict's
    keys are exactly the model's input names, integer inputs get integer values,
    and token ids are in the range of the embedding they feed (`token_ids`).
    `leaves` are the flat inputs as NumPy arrays or backend tensors, in
    `keras.tree.flatten` order; `spec_dtypes` the model's input dtypes (or empty);
    `lookups(model, keys)` the embedding calls each input feeds
    (`_sequence.input_lookups`)."""
    input_names(model, inputs, name)
    aligned = len(spec_dtypes) == len(leaves)
    wanted = []
    for i, leaf in enumerate(leaves):
        dtype = _dtype_name(leaf)
        spec = spec_dtypes[i] if aligned else None
        if _int_dtype(dtype) or (spec is not None and _int_dtype(spec) and _float_dtype(dtype)):
            wanted.append(i)
    if not wanted:
        return
    keys = input_keys(inputs)
    if len(keys) != len(leaves):  # pragma: no cover - a nested structure: no names to match
        return
    found = lookups(model, keys)
    for i in wanted:
        token_ids(leaf_name(name, keys[i]), leaves[i], found[i],
                  spec_dtypes[i] if aligned else None)


def text_input(name: str, value: Any) -> None:
    """Text (a NumPy string array) refused with the fix, on backends whose models
    take only numbers (JAX, PyTorch), before a backend fails to convert it."""
    kind = getattr(getattr(value, "dtype", None), "kind", "")
    if kind in ("U", "S"):
        raise GradprobeError(
            f"Expected `{name}` to be numeric: {keras.backend.backend()} models take numbers, "
            f"and got strings. Preprocess the text first (a tokenizer, or a "
            f"keras.layers.TextVectorization outside the model) and pass the token ids. "
            f"Received: {name}={shown(value)}")


def differentiable_input(key: str, leaf: Any, hint: str) -> None:
    """A gradient with respect to the input `key` needs a floating dtype."""
    dtype = getattr(leaf, "dtype", None)
    dtype = _dtype_name(dtype) if dtype is not None else None
    if dtype is not None and keras.backend.is_float_dtype(dtype):
        return
    if dtype == "string":
        raise GradprobeError(
            f"{key!r} has dtype string: text has no gradient. Differentiate with respect to "
            "the first layer that turns it into floats (an embedding's output).")
    if dtype == "bool":
        raise GradprobeError(
            f"{key!r} has dtype bool: boolean inputs have no gradient. Pass them as floats "
            f"(x.astype('float32')) to differentiate with respect to them.{hint}")
    raise GradprobeError(
        f"{key!r} has dtype {getattr(dtype, 'name', dtype)}: gradients with respect to integer "
        f"inputs (such as token ids) do not exist.{hint}")


# ------------------------------------------------------------------- numbers
def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def count(name: str, value: Any, meaning: str, *, minimum: int = 1,
          maximum: int = INT32_MAX) -> int:
    """A positive Python or NumPy integer (not a bool, float or string)."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if not _is_int(value) or int(value) < minimum:
        raise fail(name, value, f"{what}, {meaning}.")
    if int(value) > maximum:
        raise fail(name, value, f"{what} of at most {maximum:,}, {meaning}.")
    return int(value)


def optional_count(name: str, value: Any, meaning: str) -> int | None:
    """`None` or a positive integer."""
    return None if value is None else count(name, value, meaning)


def nonnegative(name: str, value: Any, meaning: str) -> float:
    """A finite real number >= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise fail(name, value, f"a finite number >= 0, {meaning}.")
    if not math.isfinite(float(value)) or float(value) < 0:
        raise fail(name, value, f"a finite number >= 0, {meaning}.")
    return float(value)


def seed(value: Any, name: str = "seed") -> int | None:
    if value is None:
        return None
    if not _is_int(value) or int(value) < 0:
        raise fail(name, value, "None or a non-negative integer, the random seed.")
    return int(value)


def flag(name: str, value: Any, meaning: str = "") -> bool:
    """A bool (Python or NumPy): a string like 'no' would otherwise count as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise fail(name, value, f"True or False{', ' + meaning if meaning else ''}.")
    return bool(value)


def choice(name: str, value: Any, allowed: Iterable[Any], meaning: str = "") -> Any:
    """One of `allowed` (compared by type and value, so that True is not 1)."""
    allowed = list(allowed)
    for a in allowed:
        if type(a) is type(value) and a == value:
            return value
        if isinstance(a, float) and isinstance(value, float) and a == value:
            return value
    options = ", ".join(repr(a) for a in allowed)
    raise fail(name, value, f"one of {options}{' (' + meaning + ')' if meaning else ''}.")


# ---------------------------------------------------------------- total work
# The most modified inputs (one forward and one backward pass each) a looping
# method (Integrated Gradients' steps, SmoothGrad's samples, times the batch) is
# asked to evaluate in one call: 10 million, hours of work for a small model on a
# GPU. Chunking (batch_size) bounds the memory, never the time: a larger request
# is refused up front rather than left to run for days.
MAX_TOTAL_ROWS = 10**7


def total_work(what: str, reps_name: str, reps: int, n: int,
               limit: int = MAX_TOTAL_ROWS) -> int:
    """`reps * n`, the modified inputs a looping method evaluates (`reps` copies of
    each of `n` examples), refused up front above `limit` with the fix."""
    total = int(reps) * int(n)
    if total <= limit:
        return total
    fewer = max(1, limit // max(1, int(n)))
    raise GradprobeError(
        f"Expected `{reps_name}` x batch size to be at most {limit:,} modified inputs (one "
        f"forward and one backward pass each; gradprobe's cap on the work of one call): "
        f"{what} would evaluate {reps_name}={int(reps):,} x {int(n):,} example(s) = "
        f"{total:,}. batch_size only bounds the memory, not the time. Pass fewer {reps_name} "
        f"(at most {fewer:,} for this batch; a few dozen to a few hundred are enough) or split "
        f"the batch over several calls. Received: {reps_name}={int(reps)!r}")


# ------------------------------------------------------------------ targets
def class_indices(classes: np.ndarray, raw: Any, name: str = "target") -> np.ndarray:
    """Class indices that are >= 0 and fit in int32 (no silent overflow)."""
    if classes.size and classes.min() < 0:
        raise fail(name, raw, "a class index >= 0 (an int, or one int per example); "
                              "negative indices are not class indices.")
    if classes.size and classes.max() > INT32_MAX:
        raise fail(name, raw, "a class index in the range of the selected output's last "
                              "axis; this one does not even fit in int32.")
    return classes


def classes_in_range(classes: np.ndarray, n: int | None, raw: Any,
                     name: str = "target") -> None:
    """Checks class indices against the output's `n` classes (once `n` is known)."""
    if n is None or not classes.size or int(classes.max()) < n:
        return
    bad = sorted({int(c) for c in classes if c >= n})
    raise GradprobeError(
        f"Expected `{name}` to be a class index in [0, {n - 1}]: the selected output has {n} "
        f"classes (its last axis). Target class {', '.join(map(str, bad[:8]))} is out of range. "
        f"Received: {name}={shown(raw)}")


def labels(y_true: Any, n: int | None, name: str = "y_true", ignore: Any = None) -> None:
    """Sparse (integer) labels in [0, n) (`n=None`: not yet known, only >= 0);
    `ignore` is a label the loss skips (Keras' `ignore_class`)."""
    arr = np.asarray(y_true)
    if not arr.size:
        return
    if arr.dtype.kind not in "biuf" or not np.all(np.isfinite(arr)) or \
            not np.all(arr == np.round(arr)):
        raise fail(name, y_true, "integer class labels for a sparse loss (one class index per "
                                 "example or position).")
    valid = (arr >= 0) if n is None else ((arr >= 0) & (arr < n))
    if ignore is not None:
        valid |= arr == ignore
    if np.all(valid):
        return
    bad = sorted({int(v) for v in arr[~valid].ravel()})
    span = "non-negative class labels" if n is None else \
        f"class labels in [0, {n - 1}] (the selected output has {n} classes)"
    raise GradprobeError(
        f"Expected `{name}` to hold {span}; label(s) {', '.join(map(str, bad[:8]))} are out of "
        f"range. Received: {name}={shown(y_true)}")


def numeric_array(name: str, value: Any, meaning: str) -> np.ndarray:
    """A real-valued (int, float or bool) array-like."""
    if value is None:
        raise fail(name, value, f"{meaning}, not None.")
    if backends.composite_kind(value) is not None:
        raise fail(name, value, f"{meaning}, as a dense array.")
    try:
        arr = np.asarray(value)
    except Exception:
        raise fail(name, value, f"{meaning}, as an array.") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise fail(name, value, f"{meaning}: a real-valued numeric array (got dtype {arr.dtype}).")
    return arr


def tensor(name: str, value: Any, meaning: str) -> Any:
    """A tensor (or variable) of a real floating dtype."""
    if isinstance(value, keras.Variable):
        value = value.value
    if not _is_tensor(value) or not _is_float(value):
        raise fail(name, value, f"a floating-point tensor, {meaning}.")
    return value


# --------------------------------------------------------- shaped arguments
def _shape(x: Any) -> tuple:
    return tuple(x.shape.as_list()) if hasattr(x.shape, "as_list") else tuple(x.shape)


def baseline(value: Any, x: Any, name: str = "baseline") -> None:
    """A baseline the same shape as the inputs `x`, or broadcastable to it, and real."""
    if value is None:
        return
    arr = value if _is_tensor(value) else numeric_array(name, value, "the reference input")
    if _is_tensor(arr) and not (_is_float(arr) or _is_int_dtype(arr)):
        raise fail(name, value, f"a real-valued array like the inputs ({_dtype_name(x)}).")
    try:
        out = np.broadcast_shapes(_shape(arr), _shape(x))
    except ValueError:
        out = None
    if out != _shape(x):
        raise fail(name, value,
                   f"an array shaped like the inputs {_shape(x)} (or broadcastable to it, e.g. "
                   f"{_shape(x)[1:]} for one baseline shared by every example).")


def like(name: str, value: Any, ref: Any, what: str) -> Any:
    """`value` as a tensor with `ref`'s shape and dtype (real values only)."""
    if isinstance(value, keras.Variable):
        value = value.value
    if _is_tensor(value):
        if not (_is_float(value) or _is_int_dtype(value)):
            raise fail(name, value, f"a real-valued tensor shaped like {what} {_shape(ref)}.")
        tensor = value
    else:
        tensor = keras.ops.convert_to_tensor(
            numeric_array(name, value, f"a tensor shaped like {what}"))
    if _shape(tensor) != _shape(ref):
        raise fail(name, value, f"a tensor of the same shape as {what}, {_shape(ref)}.")
    return keras.ops.cast(tensor, _dtype_name(ref))


def channel_axis(value: Any, rank: int | None = None, layer: str = "the layer") -> int:
    """A channel axis valid for a `rank`-D activation (not the batch axis)."""
    if not _is_int(value):
        raise fail("channel_axis", value, "an int axis of the layer's output (-1 for "
                                          "channels_last, 1 for channels_first).")
    if rank is None:
        return int(value)
    if not -rank <= int(value) < rank or int(value) % rank == 0:
        raise fail("channel_axis", value,
                   f"an axis of the {rank}-D output of {layer}, other than the batch axis: "
                   "one of "
                   f"{list(range(1, rank))} or {list(range(-rank + 1, 0))} (-1 for "
                   "channels_last, 1 for channels_first).")
    return int(value)


def thresholds(values: dict[str, Any], allowed: Iterable[str]) -> None:
    """Keyword thresholds (`diagnose(vanishing=..., exploding=...)`): known names,
    finite positive numbers."""
    allowed = list(allowed)
    for name, value in values.items():
        if name not in allowed:
            raise GradprobeError(
                f"Unknown threshold `{name}`: expected one of {', '.join(allowed)}. "
                f"Received: {name}={shown(value)}")
        if isinstance(value, (bool, np.bool_)) or not isinstance(
                value, (int, float, np.integer, np.floating)) or not math.isfinite(value) \
                or value <= 0:
            raise fail(name, value, "a finite number > 0.")


def layer(value: Any, name: str = "layer") -> Any:
    """A layer selector: a name or path (`"name@i"` too) or a layer object."""
    if isinstance(value, keras.layers.Layer) or (isinstance(value, str) and value.strip()):
        return value
    raise fail(name, value, "a layer name or path (e.g. 'conv5_block3_out' or 'conv@1') or a "
                            "layer object; gp.grad_cam_layer(model, inputs) picks a default.")


# ------------------------------------------------------------------ sources
def part_of_model(obj: Any, model_: Any, name: str = "wrt", known: bool | None = None) -> None:
    """A variable (or, with `known`, a layer) selected by object must belong to the model."""
    if isinstance(obj, keras.layers.Layer):
        if known:
            return
        raise GradprobeError(
            f"Expected `{name}` to name layers of model {model_.name!r}; layer {obj.name!r} "
            f"({type(obj).__name__}) is not part of this model (a layer of another model?). "
            f"Pass one of its layers or a layer name. Received: {name}={shown(obj)}")
    var = obj
    if any(v is var for v in model_.weights):
        return
    path = getattr(var, "path", None) or getattr(var, "name", "?")
    raise GradprobeError(
        f"Expected `{name}` to name variables of model {model_.name!r}; variable {path!r} is "
        f"not part of this model (a variable of another model or layer?). Select it by name "
        f"('layer.kernel') or pass one of model.weights. Received: {name}={shown(var)}")


# ------------------------------------------------------------ sequence targets
def position(value: Any, mask: Any, name: str = "position") -> tuple[str, Any]:
    """The position argument of `gp.at`: `("fixed", int)` for one position for every
    example, `("each", int64 array)` for one per example, or `("each", ...)` computed
    from `mask` for `"last"` (each example's last non-padding position)."""
    if isinstance(value, str):
        if value != "last":
            raise fail(name, value, "an int position, one int per example, or 'last' (with "
                                    "mask=, each example's last non-padding position).")
        if mask is None:
            raise fail(name, value, "'last' together with mask= (the padding mask, e.g. "
                                    "x['padding_mask']); without a mask, position=-1 is the "
                                    "last position of every example.")
        return "each", last_positions(mask)
    if mask is not None:
        raise fail("mask", mask, "given only with position='last' (it marks each example's "
                                 "non-padding positions); pass position='last' or drop mask=.")
    if isinstance(value, (bool, np.bool_)):
        raise fail(name, value, "an int position; a bool is not one.")
    if _is_int(value):
        if not -INT32_MAX <= int(value) <= INT32_MAX:
            raise fail(name, value, "a position on the sequence axis (axis 1) of the output.")
        return "fixed", int(value)
    if value is None or isinstance(value, (dict, set, float)):
        raise fail(name, value, "an int position, one int per example, or 'last' with mask=.")
    try:
        arr = np.asarray(value)
    except Exception:
        arr = np.asarray(None)
    if arr.ndim != 1 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise fail(name, value, f"an int position, a 1-D sequence of ints (one position per "
                                f"example; got shape {arr.shape} and dtype {arr.dtype}), or "
                                "'last' with mask=.")
    if arr.size == 0:
        raise fail(name, value, "one position per example; got an empty sequence.")
    if np.abs(arr.astype(np.int64)).max() > INT32_MAX:
        raise fail(name, value, "positions on the sequence axis (axis 1) of the output.")
    return "each", arr.astype(np.int64)


def last_positions(mask: Any, name: str = "mask") -> np.ndarray:
    """Each row's last nonzero position of a `(batch, steps)` padding mask."""
    arr = numeric_array(name, mask, "a padding mask of shape (batch, steps): nonzero (or "
                                    "True) at real tokens, 0 at padding")
    if arr.ndim != 2:
        raise fail(name, mask, f"a padding mask of shape (batch, steps); got shape "
                               f"{arr.shape}.")
    real = arr != 0
    empty = np.flatnonzero(~real.any(axis=1))
    if empty.size:
        raise fail(name, mask, f"a padding mask with at least one real token per example; "
                               f"example(s) {', '.join(map(str, empty[:8].tolist()))} are all "
                               "padding, so they have no last position.")
    return (arr.shape[1] - 1 - np.argmax(real[:, ::-1], axis=1)).astype(np.int64)


def positions_in_range(positions: np.ndarray, steps: int | None, raw: Any,
                       name: str = "position") -> None:
    """Checks positions (negative ones count from the end) against `steps`."""
    if steps is None or not positions.size:
        return
    bad = sorted({int(p) for p in positions.ravel() if not -steps <= p < steps})
    if bad:
        raise GradprobeError(
            f"Expected `{name}` to be a position in [{-steps}, {steps - 1}]: the selected "
            f"output has {steps} positions (axis 1). Position {', '.join(map(str, bad[:8]))} "
            f"is out of range. Received: {name}={shown(raw)}")
