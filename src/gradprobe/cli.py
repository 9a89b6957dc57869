"""The `gradprobe` command.

Exit codes: 0 success; 1 a user error (one line on standard error, no
traceback); 2 a usage error (from argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_USER = 1


class UserError(Exception):
    """A problem with what the user passed: reported as one line, exit code 1."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        return args.run(args)
    except UserError as e:
        print(f"gradprobe: error: {e}", file=sys.stderr)
        return EXIT_USER
    except Exception as e:  # GradprobeError and friends: still one line
        from gradprobe.errors import GradprobeError

        if isinstance(e, (GradprobeError, OSError, ValueError)):
            print(f"gradprobe: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USER
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradprobe",
        description="How does this output depend on that layer? Gradients of a Keras model's "
                    "target with respect to its layers, weights and input.")
    sub = parser.add_subparsers(title="commands", dest="command")
    d = sub.add_parser(
        "demo", help="train a small CNN on the bundled digits and show everything gradprobe does",
        description="Trains a small CNN on the 8x8 digits data set bundled with gradprobe (no "
                    "downloads) with a GradientMonitor attached, prints the per-layer gradient "
                    "table and diagnosis of a held-out batch, and writes report.html, Grad-CAM "
                    "overlays and gradient-flow plots into --out.")
    d.add_argument("--out", default="gradprobe-demo",
                   help="the directory to write into (default ./gradprobe-demo)")
    d.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.set_defaults(run=_demo)

    p = sub.add_parser(
        "inspect", help="per-layer gradient statistics and a diagnosis for a saved model",
        description="Loads a saved Keras model and a batch of inputs, computes the gradients "
                    "of the target with respect to every leaf layer's activation and weights "
                    "(or --wrt), and prints the table and findings, or one JSON object.")
    _request_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(run=_inspect)

    r = sub.add_parser(
        "report", help="a self-contained HTML report of a saved model's gradients",
        description="Writes one HTML file (images inlined, no executable scripts, no network requests): "
                    "the model's layers, per-layer gradient statistics and diagnosis, a "
                    "gradient-flow chart, saliency and Grad-CAM maps for image inputs, and "
                    "training curves from --history files.")
    _request_arguments(r)
    r.add_argument("--out", default="report.html", help="the HTML file (default report.html)")
    r.add_argument("--layer", help="Grad-CAM's layer (default: the last spatial layer)")
    r.add_argument("--history", action="append", default=[], metavar="CSV",
                   help="a GradientMonitor CSV (gradient norms over training) or a Keras "
                        "CSVLogger file (loss and metrics per epoch); may be repeated")
    r.add_argument("--title", help="the report's title")
    r.set_defaults(run=_report)

    c = sub.add_parser(
        "gradcam", help="Grad-CAM overlay images for a saved model",
        description="Writes one Grad-CAM overlay PNG per image into --out. Without --layer, "
                    "uses the last layer with a spatial (2-D) output and says which.")
    c.add_argument("model", help="a .keras or .h5 file")
    c.add_argument("images", nargs="+", help="image files (.png/.jpg), resized to the model input")
    c.add_argument("--layer", help="the convolutional layer (name, path or 'name@i')")
    c.add_argument("--target", default="predicted",
                   help="a class index, or 'predicted' (default)")
    c.add_argument("--out", required=True, help="the directory to write PNGs into")
    _loading_arguments(c)
    c.set_defaults(run=_gradcam)
    return parser


def _request_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments `inspect` and `report` share: model, inputs, target, sources."""
    p.add_argument("model", help="a .keras or .h5 file, or a SavedModel directory")
    p.add_argument("--input", required=True,
                   help="inputs: .npy, .npz (first array, or FILE.npz:KEY), or image files "
                        "(.png/.jpg, comma-separated; resized to the model's input)")
    p.add_argument("--target", default="predicted",
                   help="a class index, or 'predicted' (default); ignored with --loss")
    p.add_argument("--wrt", default="inputs,*,*.weights",
                   help="comma-separated selectors (default 'inputs,*,*.weights')")
    p.add_argument("--output", help="the output of a multi-output model (name or index)")
    p.add_argument("--loss", help="a Keras loss name, e.g. sparse_categorical_crossentropy")
    p.add_argument("--labels", help=".npy labels for --loss (also shown in report captions)")
    _loading_arguments(p)


def _loading_arguments(p: argparse.ArgumentParser) -> None:
    """How a saved model may be loaded: --unsafe-load and --import."""
    p.add_argument("--unsafe-load", action="store_true",
                   help="allow a model that contains code (Lambda layers): runs that code")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this Python module first, to register custom layers or "
                        "models (keras.saving.register_keras_serializable); runs its code")


# ------------------------------------------------------------------ loading
def load_model(path: str, unsafe: bool = False) -> Any:
    """Loads a `.keras` or `.h5` model with Keras' safe mode (unless `unsafe`)."""
    if not os.path.exists(path):
        raise UserError(f"model file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        return load_saved_model(path)
    if ext not in (".keras", ".h5"):
        raise UserError(f"{path!r} is not a .keras or .h5 model file")
    import keras

    try:
        return keras.saving.load_model(path, safe_mode=not unsafe, compile=False)
    except (ValueError, TypeError) as e:
        text = str(e)
        if "safe_mode" in text or "Lambda" in text or "lambda" in text:
            raise UserError(
                f"{path!r} contains code (e.g. a Lambda layer) and was not loaded; pass "
                "--unsafe-load only if you trust this file") from None
        if "Could not locate class" in text or "registered_name" in text:
            raise UserError(
                f"{path!r} uses a custom class that is not registered in this process; pass "
                "--import MODULE (the module that defines it with "
                "keras.saving.register_keras_serializable)") from None
        raise UserError(f"cannot load {path!r}: {_one_line(e)}") from None


def load_saved_model(path: str) -> Any:
    """A TensorFlow SavedModel directory, wrapped the way Keras 3 can use one: its
    `serving_default` signature as a `keras.layers.TFSMLayer` in a Functional model.

    A SavedModel holds graphs, not Keras layers, so only the input and the
    output can be probed; its graph runs, but no Python code is unpickled."""
    if not os.path.exists(os.path.join(path, "saved_model.pb")):
        raise UserError(f"{path!r} is a directory but not a SavedModel (no saved_model.pb); "
                        "pass a .keras or .h5 file")
    import keras

    try:
        layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default", name="saved_model")
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"cannot load the SavedModel {path!r} (it needs a 'serving_default' "
                        f"signature, e.g. from model.export()): {_one_line(e)}") from None
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


def load_inputs(spec: str, model: Any) -> Any:
    """Arrays from .npy/.npz (never unpickling) or images resized to the model input."""
    import numpy as np

    path, _, key = spec.partition(":") if spec.count(":") == 1 and not os.path.exists(spec) \
        else (spec, "", "")
    files = [f for f in path.split(",") if f]
    if not files:
        raise UserError("--input is empty")
    ext = os.path.splitext(files[0])[1].lower()
    for f in files:
        if not os.path.exists(f):
            raise UserError(f"input file {f!r} does not exist")
    if ext in (".npy", ".npz"):
        try:
            data = np.load(files[0], allow_pickle=False)
        except ValueError as e:
            raise UserError(f"{files[0]!r} holds Python objects (pickled data), which are "
                            f"never loaded: save plain numeric arrays ({_one_line(e)})") from None
        if ext == ".npz":
            names = list(data.keys())
            if key and key not in names:
                raise UserError(f"{files[0]!r} has no array {key!r}; it has {names}")
            data = data[key or names[0]]
        return data
    if ext in (".png", ".jpg", ".jpeg", ".bmp"):
        return _load_images(files, model)
    raise UserError(f"unsupported input file type {ext!r}: use .npy, .npz, .png or .jpg")


def _load_images(files: list[str], model: Any) -> Any:
    import numpy as np
    from PIL import Image

    shape = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else None
    if not shape or len(shape) != 3 or None in shape[:2]:
        raise UserError("image inputs need a model with a fixed (height, width, channels) input")
    h, w, c = shape
    out = []
    for f in files:
        img = Image.open(f).convert("L" if c == 1 else "RGB").resize((w, h))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        out.append(arr[..., None] if c == 1 else arr)
    return np.stack(out)


# ------------------------------------------------------------------ commands
def _demo(args: argparse.Namespace) -> int:
    from gradprobe import demo

    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1; got {args.epochs}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} is a file; pass a directory")
    demo.run(args.out, epochs=args.epochs, seed=args.seed)
    return 0


def _request(args: argparse.Namespace) -> dict[str, Any]:
    """Loads what `inspect` and `report` need: model, inputs, labels, target, output, wrt."""
    import numpy as np

    import gradprobe as gp

    _import_modules(args.imports)
    model = load_model(args.model, args.unsafe_load)
    x = load_inputs(args.input, model)
    expected = getattr(model, "inputs", None)
    if expected and len(expected) == 1:
        want = tuple(expected[0].shape[1:])
        got = tuple(np.shape(x)[1:])
        if len(want) != len(got) or any(a is not None and a != b for a, b in zip(want, got)):
            raise UserError(f"inputs of shape {tuple(np.shape(x))} do not fit the model, "
                            f"which expects (batch, {', '.join(str(d) for d in want)})")
    labels = load_inputs(args.labels, model) if args.labels else None
    if labels is not None and len(labels) != len(x):
        raise UserError(f"--labels has {len(labels)} entries but --input has {len(x)} examples")
    if args.loss:
        if labels is None:
            raise UserError("--loss needs --labels")
        target = gp.loss(args.loss, labels)
    else:
        target = _parse_target(args.target)
    output: Any = args.output
    if output is not None and output.isdigit():
        output = int(output)
    wrt = [w.strip() for w in args.wrt.split(",") if w.strip()]
    return {"model": model, "inputs": x, "labels": labels, "target": target, "output": output,
            "wrt": wrt}


def _inspect(args: argparse.Namespace) -> int:
    import gradprobe as gp

    r = _request(args)
    g = gp.gradients(r["model"], r["inputs"], r["target"], r["wrt"], output=r["output"],
                     unconnected="zero")
    if args.json:
        from gradprobe.report import gradients_json

        print(json.dumps(gradients_json(g)))
    else:
        g.summary()
    return 0


def _report(args: argparse.Namespace) -> int:
    import gradprobe as gp

    if not args.out.lower().endswith((".html", ".htm")):
        raise UserError(f"--out must name an .html file; got {args.out!r}")
    monitor, history = None, None
    for path in args.history:
        kind = _history_kind(path)
        if kind == "monitor":
            monitor = path
        else:
            history = path
    r = _request(args)
    path = gp.write_report(args.out, r["model"], r["inputs"], r["target"], wrt=r["wrt"],
                           output=r["output"], labels=r["labels"], attribution_layer=args.layer,
                           monitor=monitor, history=history, title=args.title)
    print(os.path.abspath(path))
    return 0


def _history_kind(path: str) -> str:
    """'monitor' for a GradientMonitor CSV, 'fit' for a CSVLogger file."""
    if not os.path.exists(path):
        raise UserError(f"history file {path!r} does not exist")
    with open(path, newline="", errors="replace") as f:
        first = f.readline(4096).strip().split(",")[0]
    if first == "step":
        return "monitor"
    if first == "epoch":
        return "fit"
    raise UserError(f"{path!r} is neither a GradientMonitor CSV (first column 'step') nor a "
                    "Keras CSVLogger file (first column 'epoch')")


def _gradcam(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    import gradprobe as gp

    _import_modules(args.imports)
    model = load_model(args.model, args.unsafe_load)
    for f in args.images:
        if not os.path.exists(f):
            raise UserError(f"image file {f!r} does not exist")
        if os.path.splitext(f)[1].lower() not in (".png", ".jpg", ".jpeg", ".bmp"):
            raise UserError(f"{f!r} is not an image file (.png, .jpg)")
    x = _load_images(args.images, model)
    target = _parse_target(args.target)
    layer = args.layer
    if layer is None:
        try:
            layer = gp.grad_cam_layer(model, x[:1])
        except gp.GradprobeError:
            raise UserError("the model has no layer with a spatial (2-D) output; "
                            "pass --layer") from None
        print(f"using layer {layer!r} (the last layer with a spatial output)")
    cams = np.asarray(gp.grad_cam(model, x, target, layer))
    os.makedirs(args.out, exist_ok=True)
    for f, image, cam in zip(args.images, x, cams):
        stem = os.path.splitext(os.path.basename(f))[0]
        path = os.path.join(args.out, f"{stem}_gradcam.png")
        Image.fromarray(gp.plot.overlay(image, cam)).save(path)
        print(path)
    return 0


def _parse_target(text: str) -> Any:
    if text == "predicted":
        return "predicted"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--target must be a class index or 'predicted'; got {text!r}") from None


def _import_modules(names: list[str]) -> None:
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"--import {name}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
