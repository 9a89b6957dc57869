"""What the `gradprobe` command reads and writes, checked before anything is written.

Reading: models (`.keras`, `.h5`, SavedModel directories, with Keras' safe mode),
arrays (`.npy`/`.npz`, never unpickled) and images (with a pixel limit against
decompression bombs). Every failure of such a file becomes a `UserError`: one
line naming the file and, where there is one, the fix.

Writing: `check_new_file`, `check_folder` and `check_demo_folder` refuse to
replace an existing file unless the user passed `--force`, and run before any
model is loaded, so a refused or failing command leaves the output as it was.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

ARRAY_EXTENSIONS = (".npy", ".npz")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")

# Warnings Keras emits while loading a file that say nothing about the user's
# request; matched by the start of their message, silenced around loading only.
KERAS_LOAD_NOISE = (
    # keras.src.utils.file_utils.filter_safe_zipinfos: a member name of a .keras
    # archive that would land outside Keras' temporary folder is skipped.
    "Skipping invalid path during archive extraction",
)


class UserError(Exception):
    """A problem with what the user passed: reported as one line, exit code 1."""


def one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if none)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _about(e: BaseException) -> str:
    """`Type: first line`, for an exception of a library that the message must name."""
    return f"{type(e).__name__}: {one_line(e)}"


# ------------------------------------------------------------------ reading: files
def check_readable(path: str, what: str) -> None:
    """Raises UserError unless `path` exists and its first byte can be read."""
    if not os.path.lexists(path):
        raise UserError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        return
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UserError(f"cannot read {what} {path!r}: {e.strerror or one_line(e)}") from e


# ------------------------------------------------------------------ reading: models
def check_model_file(path: str) -> None:
    """The checks on a model path that need no Keras: exists, readable, a known kind,
    and for `.keras` an intact zip archive (every member's CRC is verified)."""
    check_readable(path, "model file")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise UserError(f"{path!r} is a directory but not a SavedModel (no saved_model.pb); "
                            "pass a .keras or .h5 file")
        return
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".keras", ".h5"):
        raise UserError(f"{path!r} is not a .keras or .h5 model file")
    if ext == ".h5":
        import h5py

        if not h5py.is_hdf5(path):
            raise UserError(f"{path!r} is not an HDF5 file (truncated or corrupt?); "
                            "re-save the model")
        return
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path!r} is not a valid .keras file: it is not a zip archive "
                        "(truncated or corrupt?); re-save the model")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise UserError(f"{path!r} is a corrupt .keras archive ({_about(e)}); "
                        "re-save the model") from e
    if damaged is not None:
        raise UserError(f"{path!r} is a corrupt .keras archive: its member {damaged!r} is "
                        "damaged (bad checksum); re-save the model")
    if "config.json" not in names:
        raise UserError(f"{path!r} is a zip archive but not a Keras model (it has no "
                        "config.json)")


@contextlib.contextmanager
def quiet_keras_loading(enabled: bool = True) -> Iterator[None]:
    """Silences the warnings of KERAS_LOAD_NOISE (by message) inside the block."""
    with warnings.catch_warnings():
        if enabled:
            for message in KERAS_LOAD_NOISE:
                warnings.filterwarnings("ignore", message=message)
        yield


def load_model(path: str, unsafe: bool = False, *, quiet: bool = True) -> Any:
    """Loads a `.keras` or `.h5` model with Keras' safe mode (unless `unsafe`), or a
    SavedModel directory; any failure is a UserError naming the file."""
    check_model_file(path)
    if os.path.isdir(path):
        return load_saved_model(path)
    import keras

    try:
        with quiet_keras_loading(quiet):
            return keras.saving.load_model(path, safe_mode=not unsafe, compile=False)
    except (ValueError, TypeError) as e:
        text = str(e)
        if "safe_mode" in text or "Lambda" in text or "lambda" in text:
            raise UserError(
                f"{path!r} contains code (e.g. a Lambda layer) and was not loaded; pass "
                "--unsafe-load only if you trust this file") from e
        if "Could not locate class" in text or "registered_name" in text:
            raise UserError(
                f"{path!r} uses a custom class that is not registered in this process; pass "
                "--import MODULE (the module that defines it with "
                "keras.saving.register_keras_serializable)") from e
        raise UserError(f"cannot load {path!r}: {one_line(e)}") from e
    except Exception as e:  # a damaged file can fail anywhere inside Keras or h5py
        raise UserError(f"cannot load {path!r} (a damaged model file?): {_about(e)}") from e


def load_saved_model(path: str) -> Any:
    """A TensorFlow SavedModel directory, wrapped the way Keras 3 can use one: its
    `serving_default` signature as a `keras.layers.TFSMLayer` in a Functional model.

    A SavedModel holds graphs, not Keras layers, so only the input and the
    output can be probed; its graph runs, but no Python code is unpickled."""
    import keras

    try:
        layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default", name="saved_model")
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"cannot load the SavedModel {path!r} (it needs a 'serving_default' "
                        f"signature, e.g. from model.export()): {one_line(e)}") from e
    except Exception as e:
        raise UserError(f"cannot load the SavedModel {path!r} (a damaged directory?): "
                        f"{_about(e)}") from e
    args, kwargs = layer.call_endpoint_fn.structured_input_signature
    specs = list(args) + list(kwargs.items())
    if len(specs) != 1:
        raise UserError(f"the SavedModel {path!r} has {len(specs)} inputs; gradprobe reads "
                        "single-input SavedModels only (save a .keras file instead)")
    name, spec = specs[0] if isinstance(specs[0], tuple) else ("input", specs[0])
    inp = keras.Input(shape=spec.shape[1:], dtype=spec.dtype.name, name=name)
    out = layer(inp)
    if isinstance(out, dict) and len(out) == 1:
        out = next(iter(out.values()))
    model = keras.Model(inp, out, name=os.path.basename(os.path.normpath(path)) or "saved_model")
    print(f"gradprobe: {path!r} is a SavedModel: only its input and output can be probed "
          "(it holds graphs, not Keras layers)", file=sys.stderr)
    return model


def import_modules(names: Sequence[str]) -> None:
    """Imports each `--import` module; whatever it raises becomes one line.

    The current directory is searched last, as `python -m` would search it first,
    so `--import my_layers` finds ./my_layers.py."""
    if names and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                raise UserError(f"--import {name}: no module named {e.name!r} (it must be "
                                "installed, on PYTHONPATH or in the current directory)") from e
            raise UserError(f"--import {name} failed: {_about(e)}") from e
        except (Exception, SystemExit) as e:  # the user's module runs arbitrary code
            raise UserError(f"--import {name} failed: {_about(e)}") from e


# ------------------------------------------------------------------ reading: arrays and images
def split_spec(spec: str) -> tuple[list[str], str]:
    """`--input` text: comma-separated files, and a `:KEY` after a single .npz."""
    path, key = spec, ""
    if spec.count(":") == 1 and not os.path.exists(spec):
        path, _, key = spec.partition(":")
    return [f for f in path.split(",") if f], key


def read_input(spec: str, flag: str = "--input", *, images: bool = True,
               max_pixels: int | None = None,
               by_name: bool = False) -> np.ndarray | list[str] | NamedArrays:
    """Reads an array file now, or checks image files (their headers only) and returns
    their paths, to be decoded by `load_images` once the model's input size is known.

    With `by_name`, a `.npz` file named without `:KEY` gives all its arrays by name
    (`NamedArrays`): `match_inputs` then picks one array per model input.

    Everything that can be checked without the model is checked here."""
    files, key = split_spec(spec)
    if not files:
        raise UserError(f"{flag} is empty")
    for f in files:
        check_readable(f, f"{flag} file")
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if exts <= set(ARRAY_EXTENSIONS):
        if len(files) > 1:
            raise UserError(f"{flag} takes one .npy or .npz file; got {len(files)}")
        if by_name and not key and files[0].lower().endswith(".npz"):
            return read_named_arrays(files[0], flag)
        return read_array(files[0], key, flag)
    if images and exts <= set(IMAGE_EXTENSIONS):
        if key:
            raise UserError(f"{flag}: ':{key}' selects an array of a .npz file; "
                            "image files take none")
        for f in files:
            check_image(f, max_pixels)
        return files
    kinds = ".npy, .npz, .png or .jpg" if images else ".npy or .npz"
    bad = sorted(exts - set(ARRAY_EXTENSIONS) - (set(IMAGE_EXTENSIONS) if images else set()))
    if bad:
        raise UserError(f"unsupported input file type {bad[0]!r} for {flag}: use {kinds}")
    raise UserError(f"{flag} mixes arrays and images; pass one .npy/.npz file or image files")


def read_array(path: str, key: str = "", flag: str = "--input") -> np.ndarray:
    """A numeric array from a `.npy` or `.npz` file (`key`: the .npz member), never
    unpickling; empty, damaged or non-numeric files are a UserError."""
    ext = os.path.splitext(path)[1].lower()
    name = f"{flag} {path!r}"
    try:
        if ext == ".npy":
            if key:
                raise UserError(f"{flag}: ':{key}' selects an array of a .npz file; "
                                f"{path!r} is a .npy file")
            with open(path, "rb") as f:
                magic = f.read(6)
            if magic != b"\x93NUMPY":
                raise UserError(f"{name} is {'empty' if not magic else 'not a NumPy .npy file'}")
            data = np.load(path, allow_pickle=False)
            where = name
        else:
            if not zipfile.is_zipfile(path):
                raise UserError(f"{name} is not a .npz archive (empty, truncated or corrupt?)")
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if not names:
                    raise UserError(f"{name} holds no arrays")
                if key and key not in names:
                    raise UserError(f"{path!r} has no array {key!r}; it has {names}")
                key = key or names[0]
                where = f"{name} (array {key!r})"
                data = archive[key]
    except UserError:
        raise
    except ValueError as e:
        if "pickle" in str(e) or "Object arrays" in str(e):
            raise UserError(f"{name} holds Python objects (pickled data), which are never "
                            f"loaded: save plain numeric arrays ({one_line(e)})") from e
        raise UserError(f"{name} is truncated or corrupt: {one_line(e)}") from e
    except OSError as e:
        raise UserError(f"cannot read {name}: {e.strerror or one_line(e)}") from e
    except Exception as e:  # zipfile.BadZipFile, EOFError, ...: a damaged file
        raise UserError(f"{name} is truncated or corrupt: {_about(e)}") from e
    if data.dtype.kind not in "biuf":
        raise UserError(f"{where} holds {data.dtype} values; gradprobe needs numbers")
    if data.ndim == 0:
        raise UserError(f"{where} holds a single number; it needs a batch (N, ...)")
    if len(data) == 0:
        raise UserError(f"{where} is an empty batch (shape {data.shape})")
    return data


def read_vocabulary(path: str, flag: str = "--vocabulary") -> list[str]:
    """A vocabulary file: a `.json` list of tokens (or a `{token: id}` object, as a
    `vocab.json` holds), else UTF-8 text with one token per line (line i: token id i;
    only the line break is removed, so tokens may hold spaces)."""
    import json

    check_readable(path, f"{flag} file")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {path!r} is not UTF-8 text: {one_line(e)}") from e
    except OSError as e:
        raise UserError(f"cannot read {flag} {path!r}: {e.strerror or one_line(e)}") from e
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise UserError(f"{flag} {path!r} is not valid JSON: {one_line(e)}") from e
        if isinstance(data, dict) and data and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for v in data.values()):
            table: list[str | None] = [None] * (max(data.values()) + 1)
            for token, i in data.items():
                table[i] = str(token)
            data = [t if t is not None else "" for t in table]
        if not isinstance(data, list) or not data or \
                not all(isinstance(t, str) for t in data):
            raise UserError(f"{flag} {path!r} must hold a JSON list of token strings (index = "
                            "token id) or a {token: id} object")
        return data
    tokens = text.split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()  # the final line break
    tokens = [t[:-1] if t.endswith("\r") else t for t in tokens]
    if not tokens:
        raise UserError(f"{flag} {path!r} is empty; it needs one token per line")
    return tokens


class NamedArrays(dict):
    """The arrays of a `.npz` file by name, read before the model is loaded: each
    value an array, or the `UserError` that reading it gave (raised only if the model
    needs that array). `path` and `flag` name the file in errors."""

    def __init__(self, arrays: dict[str, Any], path: str, flag: str) -> None:
        super().__init__(arrays)
        self.path, self.flag = path, flag


def read_named_arrays(path: str, flag: str = "--input") -> NamedArrays:
    """Every array of a `.npz` file (checked as `read_array` checks one)."""
    first = read_array(path, "", flag)  # the archive's own checks, and its first array
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
    arrays: dict[str, Any] = {names[0]: first}
    for name in names[1:]:
        try:
            arrays[name] = read_array(path, name, flag)
        except UserError as e:
            arrays[name] = e
    return NamedArrays(arrays, path, flag)


def model_input_specs(model: Any) -> dict[str, Any]:
    """A model's symbolic inputs by name, in order (the dict keys for a model built
    on a dict, else the Input layers' names); empty when the model declares none."""
    try:
        struct = model.input  # public for functional models; raises for subclassed ones
    except (AttributeError, ValueError, RuntimeError):
        struct = None
    if isinstance(struct, dict):  # (model.inputs lists them sorted by key, not by name)
        return {str(k): t for k, t in struct.items()}
    return {str(getattr(t, "name", "")): t for t in (getattr(model, "inputs", None) or [])}


def model_input_names(model: Any) -> list[str]:
    """The names of a model's inputs, in order (see `model_input_specs`)."""
    return list(model_input_specs(model))


def match_inputs(arrays: NamedArrays, model: Any) -> np.ndarray | dict[str, np.ndarray]:
    """The model's inputs from a `.npz` file's arrays: for a model with several named
    inputs, a dict with one array per input (the keys must be exactly the input
    names); for a single-input model, the array named like its input, else the first."""
    names = model_input_names(model)
    where = f"{arrays.flag} {arrays.path!r}"
    keys = list(arrays)

    def value(key: str) -> np.ndarray:
        v = arrays[key]
        if isinstance(v, UserError):
            raise v
        return v

    if len(names) <= 1:
        return value(names[0] if names and names[0] in arrays else keys[0])
    unknown = [k for k in keys if k not in names]
    missing = [n for n in names if n not in arrays]
    if unknown or missing:
        what = "; ".join(part for part in (
            f"no model input is named {unknown}" if unknown else "",
            f"it lacks {missing}" if missing else "") if part)
        raise UserError(f"{where} has arrays {keys} but the model's inputs are {names}: "
                        f"{what}; save one array per input, named like it "
                        "(np.savez(path, **{name: array}))")
    out = {n: value(n) for n in names}
    sizes = {n: len(v) for n, v in out.items()}
    if len(set(sizes.values())) > 1:
        raise UserError(f"{where}: the arrays have different batch sizes {sizes}; each holds "
                        "the same examples")
    return out


def default_max_image_pixels() -> int:
    """The size PIL itself refuses: twice `PIL.Image.MAX_IMAGE_PIXELS` (PIL only warns
    between the two; the CLI has one limit)."""
    from PIL import Image

    return 2 * int(Image.MAX_IMAGE_PIXELS or 89_478_485)


@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[Any]:
    """PIL with its decompression-bomb check off: PIL warns (to stderr) above
    MAX_IMAGE_PIXELS and raises above twice that, from inside `Image.open`; the CLI
    checks the size from the header itself, before decoding (`check_image`). The
    setting is a module global, restored on exit; the command is single-threaded."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield Image
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def check_image(path: str, max_pixels: int | None = None) -> tuple[int, int]:
    """Reads an image's header: its `(width, height)`, or a UserError when it is not
    an image or has more than `max_pixels` pixels."""
    limit = max_pixels or default_max_image_pixels()
    with _own_pixel_limit() as Image:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except OSError as e:  # PIL.UnidentifiedImageError is an OSError
            raise UserError(f"cannot read the image {path!r}: {one_line(e)}") from e
        except Exception as e:  # a malformed header (SyntaxError, ValueError, ...)
            raise UserError(f"cannot read the image {path!r}: {_about(e)}") from e
    if width * height > limit:
        raise UserError(
            f"the image {path!r} has {width}x{height} = {width * height:,} pixels, more than "
            f"the limit of {limit:,} (a guard against decompression bombs); if you trust it, "
            f"pass --max-image-pixels {width * height}")
    return width, height


def load_images(files: Sequence[str], shape: Any, max_pixels: int | None = None) -> np.ndarray:
    """Decodes image files into a float32 batch in [0, 1], resized to `shape`
    `(height, width, channels)` with 1 (grey) or 3 (RGB) channels."""
    if not shape or len(shape) != 3 or None in shape[:2] or shape[2] not in (1, 3):
        raise UserError("image inputs need a model with a fixed (height, width, 1 or 3) "
                        f"input; this model's is {tuple(shape) if shape else None}")
    h, w, c = (int(d) for d in shape)
    out = []
    for f in files:
        check_image(f, max_pixels)
        with _own_pixel_limit() as Image:
            try:
                with Image.open(f) as img:
                    arr = np.asarray(img.convert("L" if c == 1 else "RGB").resize((w, h)),
                                     dtype=np.float32) / 255.0
            except Exception as e:  # truncated or damaged image data
                raise UserError(f"cannot decode the image {f!r}: {one_line(e)}") from e
        out.append(arr[..., None] if c == 1 else arr)
    return np.stack(out)


def model_image_shape(model: Any) -> Any:
    """The model's single input shape without the batch axis, or None."""
    inputs = getattr(model, "inputs", None)
    return tuple(inputs[0].shape[1:]) if inputs and len(inputs) == 1 else None


# ------------------------------------------------------------------ writing
def check_folder(folder: str, flag: str = "--out") -> None:
    """Raises UserError unless `folder` exists or can be created, and is writable."""
    blocker = os.path.abspath(folder)
    while not os.path.exists(blocker):
        blocker = os.path.dirname(blocker)
    if not os.path.isdir(blocker):
        raise UserError(f"cannot write {flag} {folder!r}: {blocker!r} is a file, not a directory")
    if not os.access(blocker, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {flag} {folder!r}: no permission to write into "
                        f"{blocker!r}")


def check_new_file(path: str, force: bool, flag: str = "--out") -> None:
    """Raises UserError when `path` exists (unless `force`) or cannot be written."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a directory; name a file")
    if os.path.lexists(path) and not force:
        raise UserError(f"{path!r} already exists; pass --force to replace it, or choose "
                        f"another {flag}")
    check_folder(os.path.dirname(os.path.abspath(path)), flag)


def check_new_files(paths: Sequence[str], force: bool, flag: str = "--out") -> None:
    """`check_new_file` for several files, naming the first that exists and the count."""
    for path in paths:
        if os.path.isdir(path):
            raise UserError(f"cannot write {path!r}: it is a directory")
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not force:
        more = f" (and {len(existing) - 1} more of the {len(paths)} files to write)" \
            if len(existing) > 1 else ""
        raise UserError(f"{existing[0]!r} already exists{more}; pass --force to replace, or "
                        f"choose another {flag}")
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in paths):
        check_folder(folder, flag)


def check_demo_folder(folder: str, force: bool) -> None:
    """The demo writes into a new or empty folder, or with `force` into any folder."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise UserError(f"--out {folder!r} is a file; pass a directory")
    if os.path.isdir(folder) and not force:
        entries = sorted(os.listdir(folder))
        if entries:
            shown = ", ".join(entries[:4]) + (f", ... ({len(entries)} entries)"
                                              if len(entries) > 4 else "")
            raise UserError(f"--out {folder!r} is not empty ({shown}); the demo writes into a "
                            "new or empty folder: choose another --out, or pass --force to "
                            "replace the demo's files in it")
    check_folder(folder)


def unique_names(files: Sequence[str], suffix: str) -> tuple[list[str], list[str]]:
    """One output file name per input, `<stem><suffix>`, made distinct (also on
    case-insensitive file systems) by `_2`, `_3`, ... after the stem.

    Returns:
        The names, and one `'name' (from 'input')` note per renamed input."""
    used: set[str] = set()
    names, renamed = [], []
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        name, k = f"{stem}{suffix}", 2
        while name.casefold() in used:
            name, k = f"{stem}_{k}{suffix}", k + 1
        used.add(name.casefold())
        if k > 2:
            renamed.append(f"{name} (from {f})")
        names.append(name)
    return names, renamed
