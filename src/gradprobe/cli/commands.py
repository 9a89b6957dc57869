"""The `gradprobe` command.

Exit codes: 0 success; 1 a user error (one line on standard error, no
traceback; `--debug` or GRADPROBE_DEBUG=1 adds the traceback); 2 a usage
error (from argparse).

No command replaces an existing file unless given `--force` (`--overwrite`),
and every check of the inputs and outputs runs before the first write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Iterator
from typing import Any

from gradprobe.cli._io import (
    IMAGE_EXTENSIONS,
    UserError,
    check_demo_folder,
    check_image,
    check_model_file,
    check_new_file,
    check_new_files,
    check_readable,
    import_modules,
    load_images,
    load_model,
    match_inputs,
    model_image_shape,
    one_line,
    read_input,
    read_vocabulary,
    unique_names,
)

EXIT_USER = 1
EXIT_INTERRUPTED = 130

__all__ = ["main", "UserError", "load_model"]


def main(argv: list[str] | None = None) -> int:
    """Runs the `gradprobe` command with `argv` (default `sys.argv[1:]`); returns the
    exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    args.debug = bool(getattr(args, "debug", False)) or \
        os.environ.get("GRADPROBE_DEBUG", "").strip() not in ("", "0")
    try:
        # Each command starts the backend (`_backend`) once its own checks that need
        # no Keras have passed: --help and argument errors never import it.
        return args.run(args)
    except KeyboardInterrupt:
        print("gradprobe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away (`| head`): no traceback
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_USER
    except Exception as e:  # one line for everything; the traceback only with --debug
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        print(f"gradprobe: error: {_message(e, args.debug)}", file=sys.stderr)
        return EXIT_USER


def _message(e: Exception, debug: bool) -> str:
    """One line for an exception: the user's mistake as gradprobe words it, an OS error
    with its file, or (an unexpected exception) its type and where to look."""
    from gradprobe.errors import GradprobeError

    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, GradprobeError):
        return one_line(e)
    if isinstance(e, OSError):  # the file system's answer, not a bug
        if e.strerror and e.filename:
            return f"{e.strerror}: {e.filename!r}"
        return e.strerror or one_line(e)
    if isinstance(e, MemoryError):
        return "out of memory; pass fewer inputs (a smaller batch) or a smaller --wrt"
    if isinstance(e, ValueError):  # Keras' and NumPy's own checks of the request
        return one_line(e)
    hint = "" if debug else "; rerun with --debug for the traceback to report it"
    return f"unexpected {type(e).__name__}: {one_line(e)}{hint}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradprobe",
        description="How does this output depend on that layer? Gradients of a Keras model's "
                    "target with respect to its layers, weights and input.")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=_DEBUG_HELP)
    sub = parser.add_subparsers(title="commands", dest="command")
    d = sub.add_parser(
        "demo", parents=[common],
        help="train a small CNN on the bundled digits and show everything gradprobe does",
        description="Trains a small CNN on the 8x8 digits data set bundled with gradprobe (no "
                    "downloads) with a GradientMonitor attached, prints the per-layer gradient "
                    "table and diagnosis of a held-out batch, and writes report.html, Grad-CAM "
                    "overlays and gradient-flow plots into --out, a new or empty folder. Its "
                    "model.keras outputs logits: a --loss on it needs --from-logits.")
    d.add_argument("--out", default="gradprobe-demo",
                   help="the directory to write into, new or empty unless --force "
                        "(default ./gradprobe-demo)")
    d.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _force_argument(d, "the demo's files in a folder that is not empty; demo files of an "
                       "earlier run that this run does not write are removed (other files "
                       "stay)")
    d.set_defaults(run=_demo)

    p = sub.add_parser(
        "inspect", parents=[common],
        help="per-layer gradient statistics and a diagnosis for a saved model",
        description="Loads a saved Keras model and a batch of inputs, computes the gradients "
                    "of the target with respect to every leaf layer's activation and weights "
                    "(or --wrt), and prints the table and findings, or one JSON object. "
                    "It writes no file.")
    _request_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(run=_inspect)

    r = sub.add_parser(
        "report", parents=[common],
        help="a self-contained HTML report of a saved model's gradients",
        description="Writes one HTML file (images inlined, no executable scripts, no network requests): "
                    "the model's layers, per-layer gradient statistics and diagnosis, a "
                    "gradient-flow chart, saliency and Grad-CAM maps for image inputs, token "
                    "heat maps for token-id inputs with --vocabulary, and training curves from "
                    "--history files.")
    _request_arguments(r)
    r.add_argument("--out", default="report.html",
                   help="the HTML file, which must not exist unless --force (default report.html)")
    r.add_argument("--layer", help="Grad-CAM's layer (default: the last spatial layer)")
    r.add_argument("--history", action="append", default=[], metavar="CSV",
                   help="a GradientMonitor CSV (gradient norms over training) or a Keras "
                        "CSVLogger file (loss and metrics per epoch); may be repeated")
    r.add_argument("--title", help="the report's title")
    r.add_argument("--vocabulary", metavar="FILE",
                   help="for token-id inputs feeding an Embedding: the vocabulary, a text file "
                        "with one token per line (line i is token id i) or a .json list; adds "
                        "a token heat map of gradient x embedding per example")
    _force_argument(r, "an existing --out file")
    r.set_defaults(run=_report)

    c = sub.add_parser(
        "gradcam", parents=[common], help="Grad-CAM overlay images for a saved model",
        description="Writes one Grad-CAM overlay PNG per image into --out (<name>_gradcam.png; "
                    "inputs with the same file name get _2, _3, ...). Without --layer, uses "
                    "the last layer with a spatial (2-D) output and says which.")
    c.add_argument("model", help="a .keras or .h5 file")
    c.add_argument("images", nargs="+", help="image files (.png/.jpg), resized to the model input")
    c.add_argument("--layer", help="the convolutional layer (name, path or 'name@i')")
    c.add_argument("--target", default="predicted",
                   help="a class index, or 'predicted' (default)")
    c.add_argument("--out", required=True, help="the directory to write PNGs into")
    _force_argument(c, "existing overlay files in --out")
    _loading_arguments(c)
    c.set_defaults(run=_gradcam)
    return parser


_DEBUG_HELP = "on an error, also print the full traceback (for bug reports); or GRADPROBE_DEBUG=1"


def _force_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help=f"replace {what}; without it the command refuses and writes nothing")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number; got {text!r}")
    return value


def _request_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments `inspect` and `report` share: model, inputs, target, sources."""
    p.add_argument("model", help="a .keras or .h5 file, or a SavedModel directory")
    p.add_argument("--input", required=True,
                   help="inputs: .npy, .npz (one array per named model input for a "
                        "multi-input model; else the first array, or FILE.npz:KEY), or image "
                        "files (.png/.jpg, comma-separated; resized to the model's input)")
    p.add_argument("--target", default="predicted",
                   help="a class index, or 'predicted' (default); ignored with --loss")
    p.add_argument("--wrt", default=None,
                   help="comma-separated selectors (default 'inputs,*,*.weights', without "
                        "integer inputs such as token ids)")
    p.add_argument("--output", help="the output of a multi-output model (name or index)")
    p.add_argument("--loss", help="a Keras loss name, e.g. sparse_categorical_crossentropy; "
                                  "a crossentropy loss expects probabilities unless "
                                  "--from-logits (a model whose outputs cannot be "
                                  "probabilities is refused)")
    p.add_argument("--from-logits", action="store_true",
                   help="the model outputs logits (no final softmax/sigmoid), as the demo's "
                        "model does: --loss applies from_logits=True")
    p.add_argument("--labels", help=".npy labels for --loss (also shown in report captions)")
    _loading_arguments(p)


def _loading_arguments(p: argparse.ArgumentParser) -> None:
    """How a saved model and images may be loaded: --unsafe-load, --import,
    --max-image-pixels."""
    p.add_argument("--unsafe-load", action="store_true",
                   help="allow a model that contains code (Lambda layers): runs that code")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this Python module first, to register custom layers or "
                        "models (keras.saving.register_keras_serializable); runs its code")
    p.add_argument("--max-image-pixels", type=_positive_int, default=None, metavar="N",
                   help="refuse images with more pixels than this (default 178956970, the "
                        "size Pillow itself refuses: a guard against decompression bombs)")


# ------------------------------------------------------------------ start-up
# Starting the backend for a command: Keras (and TensorFlow, JAX or PyTorch) is
# imported only by a command that needs it, never for `--help` or an argument error.
#
# Unless `--debug`, TensorFlow's native log lines stay out of the output:
# `TF_CPP_MIN_LOG_LEVEL` defaults to 3 (a value the user set is kept), and the
# lines its libraries print while loading, before their logging is set up (which
# ignore that variable), are filtered by the same level; any other output of the
# import (a Python warning, an error) is passed on.

# absl's format: severity letter, date, time, thread, file:line]
_NATIVE_LINE = re.compile(r"^([IWEF])\d{4} \d+:\d+:\d+\.\d+\s+\d+ \S+:\d+\] ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_NOISE = ("WARNING: All log messages before absl::InitializeLog() is called",
          "To enable the following instructions:")

_started = False


def native_noise(line: str, level: int) -> bool:
    """Whether a line printed while loading the backend is a native log line that
    `TF_CPP_MIN_LOG_LEVEL=level` hides (fatal lines are never hidden)."""
    m = _NATIVE_LINE.match(line)
    if m:
        severity = _SEVERITY[m.group(1)]
        return severity < min(level, 3)
    return level >= 1 and line.startswith(_NOISE)


@contextlib.contextmanager
def filtered_native_logs(level: int) -> Iterator[None]:
    """Inside the block, what is written to file descriptor 2 (native code and
    Python alike) is collected; on exit, the lines that are not native noise
    (`native_noise`) are written to standard error."""
    if level <= 0:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True)
                    if not native_noise(line, level)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def start_backend(debug: bool = False) -> None:
    """Imports Keras and its backend (once), quietly unless `debug`, and refuses a
    backend the command does not run on (a `GradprobeError`)."""
    global _started
    if _started:
        return
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    with filtered_native_logs(0 if debug else level):
        import keras

        from gradprobe import backends
        from gradprobe.core import _validate

        # The first tensor starts the devices, whose native lines come now too.
        keras.ops.convert_to_tensor(0.0)
    _started = True
    # On JAX and PyTorch each command runs as far as the functions it calls do;
    # one that is not supported there yet says so (a one-line GradprobeError).
    _validate.backend_supported("The gradprobe command", backends.FUNCTIONAL)


# ------------------------------------------------------------------ commands
def _backend(args: argparse.Namespace) -> None:
    """Imports Keras and its backend, quietly unless --debug (see `_startup`)."""
    start_backend(args.debug)


def _demo(args: argparse.Namespace) -> int:
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1; got {args.epochs}")
    check_demo_folder(args.out, args.force)
    _backend(args)
    from gradprobe.cli import demo

    demo.run(args.out, epochs=args.epochs, seed=args.seed, overwrite=args.force)
    return 0


def _request(args: argparse.Namespace) -> dict[str, Any]:
    """Loads what `inspect` and `report` need: model, inputs, labels, target, output, wrt.

    Every file is checked (and arrays read) before the model is loaded."""
    import numpy as np

    target = _parse_target(args.target)
    check_model_file(args.model)
    x = read_input(args.input, "--input", max_pixels=args.max_image_pixels, by_name=True)
    labels = read_input(args.labels, "--labels", images=False) if args.labels else None
    if args.loss and labels is None:
        raise UserError("--loss needs --labels")
    if args.from_logits and not args.loss:
        raise UserError("--from-logits applies to --loss; pass --loss too, or drop it")
    _backend(args)
    import_modules(args.imports)
    model = load_model(args.model, args.unsafe_load, quiet=not args.debug)
    if isinstance(x, list):
        x = load_images(x, model_image_shape(model), args.max_image_pixels)
    elif isinstance(x, dict):
        x = match_inputs(x, model)
    expected = getattr(model, "inputs", None)
    if isinstance(x, dict):
        _check_shapes(x, model)
    elif expected and len(expected) == 1:
        want = tuple(expected[0].shape[1:])
        got = tuple(np.shape(x)[1:])
        if len(want) != len(got) or any(a is not None and a != b for a, b in zip(want, got)):
            raise UserError(f"inputs of shape {tuple(np.shape(x))} do not fit the model, "
                            f"which expects (batch, {', '.join(str(d) for d in want)})")
    examples = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    if labels is not None and len(labels) != examples:
        raise UserError(f"--labels has {len(labels)} entries but --input has {examples} "
                        "examples")
    output: Any = args.output
    if output is not None and output.isdigit():
        output = int(output)
    if args.loss:
        target = _loss_target(args, model, x, labels, output)
    if args.wrt is None:  # integer inputs (token ids) have no gradient: left out
        from gradprobe.report.html import default_wrt

        wrt = default_wrt(x)
    else:
        wrt = [w.strip() for w in args.wrt.split(",") if w.strip()]
    return {"model": model, "inputs": x, "labels": labels, "target": target, "output": output,
            "wrt": wrt}


def _loss_target(args: argparse.Namespace, model: Any, x: Any, labels: Any,
                 output: Any) -> Any:
    """`gp.loss` of --loss (with --from-logits) against --labels, refused when the
    model's outputs cannot be what the loss expects (logits given to a loss that
    expects probabilities, or softmax rows with --from-logits): the outputs are
    computed once here, eagerly, before anything else runs."""
    import functools
    import warnings

    import keras

    import gradprobe as gp
    from gradprobe.core import targets

    fn: Any = args.loss
    with contextlib.suppress(ValueError, TypeError):  # else gp.loss says what it accepts
        fn = keras.losses.get(args.loss)
    info = targets.probability_loss(fn) if not isinstance(fn, str) else None
    if args.from_logits:
        if info is None:
            raise UserError(f"--from-logits applies to the crossentropy losses "
                            f"({', '.join(targets.PROBABILITY_LOSSES)}); --loss "
                            f"{args.loss} takes no from_logits: drop --from-logits")
        if isinstance(fn, keras.losses.Loss):
            fn = type(fn).from_config({**fn.get_config(), "from_logits": True})
        else:
            fn = functools.partial(fn, from_logits=True)
    target = gp.loss(fn, labels)
    if info is None:
        return target
    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", targets.ProbabilityWarning)
        # (Keras' own note on a softmax given from_logits=True: refused below anyway)
        warnings.filterwarnings("ignore", message=".*received `from_logits=True`")
        try:
            targets.evaluate(model, x, targets.make_target(target, n), output=output)
        except targets.ProbabilityWarning as w:
            if w.from_logits:
                what = (f"--loss {args.loss} --from-logits: the model's outputs look like "
                        f"probabilities ({w.evidence.split(':')[0]}); drop --from-logits")
            else:
                what = (f"--loss {args.loss}: the model's outputs "
                        f"{w.evidence.removeprefix('they ')}; pass --from-logits if the "
                        "model outputs logits")
            raise UserError(what) from None
    return target


def _check_shapes(x: dict[str, Any], model: Any) -> None:
    """Each named input array against the model's declared input of that name."""
    import numpy as np

    from gradprobe.cli._io import model_input_specs

    for name, tensor in model_input_specs(model).items():
        want, got = tuple(tensor.shape[1:]), tuple(np.shape(x[name])[1:])
        if len(want) != len(got) or any(a is not None and a != b for a, b in zip(want, got)):
            raise UserError(f"input {name!r} of shape {tuple(np.shape(x[name]))} does not fit "
                            f"the model, which expects (batch, "
                            f"{', '.join(str(d) for d in want)})")


def _inspect(args: argparse.Namespace) -> int:
    import gradprobe as gp

    r = _request(args)
    g = gp.gradients(r["model"], r["inputs"], r["target"], r["wrt"], output=r["output"],
                     unconnected="zero")
    if args.json:
        from gradprobe.report.html import gradients_json

        print(json.dumps(gradients_json(g)))
    else:
        g.summary()
    return 0


def _report(args: argparse.Namespace) -> int:
    if not args.out.lower().endswith((".html", ".htm")):
        raise UserError(f"--out must name an .html file; got {args.out!r}")
    check_new_file(args.out, args.force)
    monitor, history = None, None
    for path in args.history:
        kind = _history_kind(path)
        if kind == "monitor":
            monitor = path
        else:
            history = path
    vocabulary = read_vocabulary(args.vocabulary) if args.vocabulary else None
    r = _request(args)
    import gradprobe as gp

    path = gp.write_report(args.out, r["model"], r["inputs"], r["target"], wrt=r["wrt"],
                           output=r["output"], labels=r["labels"], attribution_layer=args.layer,
                           monitor=monitor, history=history, title=args.title,
                           vocabulary=vocabulary, overwrite=args.force)
    print(os.path.abspath(path))
    return 0


def _history_kind(path: str) -> str:
    """'monitor' for a GradientMonitor CSV, 'fit' for a CSVLogger file."""
    check_readable(path, "history file")
    try:
        with open(path, newline="", errors="replace") as f:
            first = f.readline(4096).strip().split(",")[0]
    except OSError as e:
        raise UserError(f"cannot read history file {path!r}: {e.strerror or one_line(e)}") \
            from e
    if first == "step":
        return "monitor"
    if first == "epoch":
        return "fit"
    raise UserError(f"{path!r} is neither a GradientMonitor CSV (first column 'step') nor a "
                    "Keras CSVLogger file (first column 'epoch')")


def _gradcam(args: argparse.Namespace) -> int:
    import numpy as np

    target = _parse_target(args.target)
    check_model_file(args.model)
    for f in args.images:
        check_readable(f, "image file")
        if os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
            raise UserError(f"{f!r} is not an image file (.png, .jpg)")
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} is a file; pass a directory")
    names, renamed = unique_names(args.images, "_gradcam.png")
    paths = [os.path.join(args.out, name) for name in names]
    check_new_files(paths, args.force)
    for f in args.images:
        check_image(f, args.max_image_pixels)
    _backend(args)
    import_modules(args.imports)
    model = load_model(args.model, args.unsafe_load, quiet=not args.debug)
    x = load_images(args.images, model_image_shape(model), args.max_image_pixels)

    import gradprobe as gp

    layer = args.layer
    if layer is None:
        try:
            layer = gp.grad_cam_layer(model, x[:1])
        except gp.GradprobeError as e:
            raise UserError("the model has no layer with a spatial (2-D) output; "
                            "pass --layer") from e
        print(f"using layer {layer!r} (the last layer with a spatial output)")
    cams = np.asarray(gp.grad_cam(model, x, target, layer))
    overlays = [gp.plot.overlay(image, cam) for image, cam in zip(x, cams)]
    if renamed:
        print(f"inputs with the same file name get distinct overlays: {', '.join(renamed)}")
    from PIL import Image

    os.makedirs(args.out, exist_ok=True)
    for path, rgb in zip(paths, overlays):
        with open(path, "wb" if args.force else "xb") as f:  # "x": never replace a file
            Image.fromarray(rgb).save(f, format="PNG")
        print(path)
    return 0


def _parse_target(text: str) -> Any:
    if text == "predicted":
        return "predicted"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--target must be a class index or 'predicted'; got {text!r}") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
