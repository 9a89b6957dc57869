"""`gp.write_report`: one self-contained HTML file (Jinja2 template, images
inlined as data URIs, no executable scripts, no network requests) with a model's layer
table, its per-layer gradient statistics and diagnosis, a gradient-flow chart,
attribution maps for image inputs, token heat maps for token-id inputs given a
vocabulary, and training curves."""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
from typing import Any

import keras
import numpy as np

from gradprobe import backends
from gradprobe.core import _validate
from gradprobe.core.engine import gradients as compute_gradients
from gradprobe.core.result import Gradients
from gradprobe.core.selectors import LayerTree
from gradprobe.errors import GradprobeError

DEFAULT_WRT = ("inputs", "*", "*.weights")


def _numpy(x: Any) -> np.ndarray:
    """A tensor of any backend (or a variable, or an array) as a NumPy array."""
    return np.asarray(keras.ops.convert_to_numpy(x))


def write_report(path: str, model: keras.Model, inputs: Any, target: Any = "predicted", *,
                 wrt: Any = DEFAULT_WRT, output: Any = None, gradients: Gradients | None = None,
                 attribution: bool = True, attribution_layer: Any = None,
                 labels: Any = None, class_names: list[str] | None = None,
                 monitor: Any = None, history: Any = None, title: str | None = None,
                 notes: dict[str, Any] | None = None, max_images: int = 8,
                 vocabulary: Any = None, overwrite: bool = False,
                 attribution_checks: bool = False) -> str:
    """Writes a self-contained HTML report of a model's gradients.

    Args:
        path: The HTML file to write.
        model: The Keras model.
        inputs: The batch the gradients are computed on.
        target: As in `gp.gradients` (`"predicted"`, a class, `gp.loss(...)`, a callable).
        wrt: Sources for the statistics table (default: the floating inputs,
            every leaf layer's activation and every weight).
        output: The output of a multi-output model, as in `gp.gradients`.
        gradients: A `Gradients` result to report instead of computing one.
        attribution: For image inputs `(N, H, W, C)`, draw saliency and Grad-CAM
            maps of the first `max_images` examples (for a loss or callable
            target, of each example's predicted class).
        attribution_layer: Grad-CAM's layer (default `gp.grad_cam_layer`).
        labels: True labels of `inputs`, shown beside the predictions.
        class_names: Names of the classes, for the captions.
        monitor: A `gp.GradientMonitor` after `fit`, or the path of the CSV one
            wrote: its gradient norms over training are drawn.
        history: Training curves: a Keras `History`, its `.history` dict, or a
            `keras.callbacks.CSVLogger` CSV path.
        title: The page title (default: "gradprobe report: <model name>").
        notes: Extra facts for the header, e.g. `{"test accuracy": "97.5%"}`.
        max_images: At most this many attribution rows (images, or token rows
            of the text section).
        vocabulary: For models whose integer inputs are token ids feeding an
            `Embedding`: a list (id -> token string), a dict `{id: token}`, or a
            tokenizer with an `id_to_token(id)` method (keras-hub tokenizers) or
            else a `detokenize(ids)` method. The report then gets a text
            section: per example, a token heat map (`gp.plot.tokens`) of
            gradient×input at the embedding, one score per token: the sum over
            the embedding axis of gradient × activation of the embedding layer
            the token ids feed.
        attribution_checks: With the image attribution maps, also give each
            map's mean deletion and insertion AUC (`gp.deletion_curve`,
            `gp.insertion_curve`: 20 steps, baseline 0, the same class) in the
            figure's caption. Off by default (`2 x 21` model calls per image).
        overwrite: Replace `path` if it exists. Without it an existing file is
            never touched: a `GradprobeError` is raised before any work.

    Returns:
        The path written.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.GlobalAveragePooling2D(),
    ...     keras.layers.Dense(3, activation="softmax", name="dense"),
    ... ])
    >>> x_test = np.random.default_rng(0).random((4, 8, 8, 1), dtype="float32")
    >>> y_test = np.array([0, 1, 2, 1])
    >>> gp.write_report("report.html", model, x_test,
    ...                 gp.loss("sparse_categorical_crossentropy", y_test), labels=y_test)
    'report.html'
    """
    _validate.backend_supported("gp.write_report", backends.FUNCTIONAL)
    import jinja2

    _validate.model(model)
    _validate.inputs(inputs)
    _validate.count("max_images", max_images, "the most attribution rows to draw")
    _validate.flag("attribution_checks", attribution_checks)
    lookup = _vocabulary_lookup(vocabulary)
    folder = os.path.dirname(os.path.abspath(path))
    blocker = folder
    while not os.path.exists(blocker):
        blocker = os.path.dirname(blocker)
    if not os.path.isdir(blocker):
        raise GradprobeError(f"Cannot write the report to {path!r}: {blocker!r} is a file, "
                             "not a directory.")
    if os.path.isdir(path):
        raise GradprobeError(f"Expected path to name a file. Received: path={path!r}, which is "
                             "a directory.")
    if os.path.lexists(path) and not overwrite:
        raise _exists(path)
    if gradients is None:
        if tuple(wrt) == DEFAULT_WRT:
            wrt = default_wrt(inputs)
        gradients = compute_gradients(model, inputs, target, list(wrt), output=output,
                                      unconnected="zero")
    stats = gradients.stats()
    findings = gradients.diagnose()
    flagged = {f.key for f in findings}
    rows = [{"name": k, "kind": gradients.kinds[k], "shape": _shape(s["shape"]),
             "norm": s["norm"], "mean_abs": s["mean_abs"], "max_abs": s["max_abs"],
             "std": s["std"], "zero_fraction": s["zero_fraction"], "nonfinite": s["nonfinite"],
             "flagged": k in flagged} for k, s in stats.items()]
    from gradprobe.report.plot import gradient_flow, gradient_history, training_curves

    figures = [{"id": "gradient-flow", "title": "Gradient flow",
                "caption": "Mean and largest |gradient| of each source, in forward order "
                           "(log scale). A bar orders of magnitude below its neighbours "
                           "is a vanishing gradient.",
                "src": _png(gradient_flow(stats, gradients.kinds))}]
    if attribution and _is_image_batch(inputs):
        figures.append(_attribution_figure(model, inputs, target, output, attribution_layer,
                                           labels, class_names, max_images,
                                           attribution_checks))
    text_section = None
    if lookup is not None:
        text_section = token_scores(model, inputs, target, output=output,
                                    max_rows=max_images, vocabulary=vocabulary)
        text_section["html"] = _token_html(text_section, lookup)
    curves = _training_history(history)
    if curves:
        figures.append({"id": "training-curves", "title": "Training curves",
                        "caption": "Loss and metrics per epoch, from the fit history.",
                        "src": _png(training_curves(curves))})
    steps_history = _monitor_history(monitor)
    if steps_history is not None:
        steps, hist = steps_history
        figures.append({"id": "gradient-history", "title": "Gradients during training",
                        "caption": f"L2 norm of each variable's applied gradient over "
                                   f"{len(steps)} recorded steps (GradientMonitor), and the "
                                   "gradient flow of the last recorded step.",
                        "src": _png(gradient_history(steps, hist))})
    context = {
        "title": title or f"gradprobe report: {model.name}",
        "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "facts": _facts(model, inputs, target, gradients, notes),
        "layers": _layer_rows(model, gradients),
        "rows": rows,
        "findings": [f.message for f in findings],
        "figures": figures,
        "text": text_section,
        "data_json": _script_json({**gradients_json(gradients, findings),
                                   "figures": [f["id"] for f in figures],
                                   **({"tokens": {k: text_section[k] for k in
                                                  ("input", "layer", "ids", "tokens", "scores")}}
                                      if text_section else {})}),
    }
    env = jinja2.Environment(loader=jinja2.PackageLoader("gradprobe", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]),
                             undefined=jinja2.StrictUndefined)
    env.filters["num"] = lambda v: f"{v:.4g}"
    env.filters["pct"] = lambda v: f"{v:.1%}"
    text = env.get_template("report.html").render(**context)
    os.makedirs(folder, exist_ok=True)
    try:  # mode "x" creates the file only if it still does not exist
        with open(path, "w" if overwrite else "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise _exists(path) from None
    return path


def _exists(path: str) -> GradprobeError:
    return GradprobeError(f"Expected path to be a file that does not exist yet. Received: "
                          f"path={path!r}, which exists; pass overwrite=True to replace it, "
                          "or choose another path.")


def gradients_json(g: Gradients, findings: list | None = None) -> dict:
    """A `Gradients` result as plain JSON data: `{"target": [...], "sources":
    [{"name", "kind", "shape", "norm", "mean_abs", "max_abs", "std", "zero_fraction",
    "nonfinite"}, ...], "findings": [{"kind", "source", "message"}, ...]}`, the
    numbers of `g.stats()`. `gradprobe inspect --json` prints it; the HTML report
    embeds it.

    Args:
        g: The result.
        findings: `g.diagnose()` if already computed.
    """
    target = _numpy(g.target)
    findings = g.diagnose() if findings is None else findings
    return {
        "target": target.tolist() if target.ndim else [float(target)],
        "sources": [{"name": k, "kind": g.kinds[k],
                     **{f: (list(v) if f == "shape" else v) for f, v in s.items()}}
                    for k, s in g.stats().items()],
        "findings": [{"kind": f.kind, "source": f.key, "message": f.message}
                     for f in findings],
    }


# ---------------------------------------------------------------- sections
def _facts(model: Any, inputs: Any, target: Any, g: Gradients, notes: dict | None) -> list[tuple[str, str]]:
    facts = [("model", f"{model.name} ({type(model).__name__})"),
             ("parameters", f"{model.count_params():,}" if model.built else "not built"),
             ("inputs", ", ".join(_shape(np.shape(t)) for t in _flat(inputs))),
             ("target", _target_text(target, g)),
             ("versions", f"gradprobe {_version()}, Keras {keras.__version__}, "
                          f"{backends.version()}")]
    return facts + [(str(k), str(v)) for k, v in (notes or {}).items()]


def _layer_rows(model: Any, g: Gradients) -> list[dict]:
    rows = []
    for node in LayerTree(model).leaves():
        act = g.activations.get(node.path)
        shape = _shape(np.shape(act)) if act is not None and g.kinds.get(node.path) == \
            "activation" else "—"
        layer = node.layer
        rows.append({"path": node.path, "kind": node.kind, "output": shape,
                     "params": layer.count_params() if layer.built else 0,
                     "trainable": bool(layer.trainable)})
    return rows


def _attribution_figure(model, inputs, target, output, layer, labels, class_names,
                        max_images, checks=False) -> dict:
    from gradprobe.attribution._common import fixed_target
    from gradprobe.attribution.grad_cam import grad_cam, grad_cam_layer
    from gradprobe.attribution.saliency import saliency
    from gradprobe.report.plot import save_maps

    x = np.asarray(inputs)[:max_images]
    predicted = fixed_target(model, x, "predicted", output, False)
    given = _is_class_target(target) and not isinstance(target, str)
    cls = (np.asarray(target)[:max_images] if np.ndim(target) else target) if given \
        else predicted
    layer = layer if layer is not None else grad_cam_layer(model, x[:1])
    maps = {"saliency |g|": saliency(model, x, cls, output=output),
            f"Grad-CAM ({layer})": grad_cam(model, x, cls, layer, output=output)}

    def name(c: int) -> str:
        return class_names[c] if class_names and 0 <= c < len(class_names) else str(c)

    titles = [f"#{i}: predicted {name(int(p))}" + (
        f", label {name(int(np.asarray(labels)[i]))}" if labels is not None else "")
        for i, p in enumerate(predicted)]
    buf = io.BytesIO()
    save_maps(buf, x, maps, titles=titles)
    what = "the given class" if given else "the predicted class"
    caption = (f"For each image: the input, |gradient| saliency, and Grad-CAM of layer "
               f"{layer!r} overlaid, all for {what}.")
    if checks:
        caption += " " + _curve_text(model, x, maps, cls, output)
    return {"id": "attribution-maps", "title": "Attribution maps", "caption": caption,
            "src": _data_uri(buf.getvalue())}


def _curve_text(model: Any, x: Any, maps: dict, cls: Any, output: Any) -> str:
    """The mean deletion and insertion AUC of each map, as a sentence."""
    from gradprobe.attribution.checks import deletion_curve, insertion_curve

    parts = []
    for label, attribution in maps.items():
        d = deletion_curve(model, x, attribution, cls, steps=20, output=output)
        i = insertion_curve(model, x, attribution, cls, steps=20, output=output)
        parts.append(f"{label}: deletion AUC {d.mean_auc:.4g}, insertion AUC {i.mean_auc:.4g}")
    return ("Checks (mean over the images, 20 steps, baseline 0; a faithful map has a low "
            "deletion and a high insertion AUC): " + "; ".join(parts) + ".")


def _vocabulary_lookup(vocabulary: Any) -> Any:
    """A function id -> token text for `vocabulary` (see `write_report`), or None."""
    if vocabulary is None:
        return None
    if isinstance(vocabulary, list | tuple | dict):
        if not vocabulary:
            raise GradprobeError("Expected vocabulary to hold at least one token. Received: "
                                 f"vocabulary={vocabulary!r}")

        def from_table(i: int) -> str:
            try:
                return str(vocabulary[i])
            except (KeyError, IndexError):
                raise GradprobeError(f"Expected vocabulary to hold every token id of the inputs. "
                                     f"Received: an input token id {i}, which is not in the "
                                     f"vocabulary of {len(vocabulary)} tokens; pass the "
                                     "vocabulary the model was trained with.") from None
        return from_table
    if callable(getattr(vocabulary, "id_to_token", None)):
        return lambda i: str(_text(vocabulary.id_to_token(i)))
    if callable(getattr(vocabulary, "detokenize", None)):
        return lambda i: str(_text(vocabulary.detokenize([i])))
    raise GradprobeError("Expected vocabulary to be a list (id -> token), a dict {id: token} "
                         "or a tokenizer with an id_to_token(id) or detokenize(ids) method. "
                         f"Received: vocabulary of type {type(vocabulary).__name__}")


def _text(value: Any) -> Any:
    """A tokenizer's answer as Python text: tensors and bytes decoded."""
    value = _numpy(value) if not isinstance(value, str | bytes) else value
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else value.tolist()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def token_scores(model: keras.Model, inputs: Any, target: Any = "predicted", *,
                 output: Any = None, max_rows: int | None = None,
                 vocabulary: Any = None) -> dict[str, Any]:
    """Per-token scores of the report's text section: gradient × activation of the
    embedding layer that the model's token-id input feeds, summed over the
    embedding axis (one score per token).

    Args:
        model: A model with an integer input feeding a `keras.layers.Embedding`.
        inputs: The batch (an array of token ids, or a list/dict with one).
        target: As in `gp.gradients`.
        output: The output of a multi-output model.
        max_rows: Return only the first this many examples (all are computed,
            so that a per-example target fits the batch).
        vocabulary: Only named in errors (the argument that asked for the section).

    Returns:
        `{"input": key, "layer": selector, "ids": [[int]], "scores": [[float]]}`:
        `key` is the result key of the token-id input (`"inputs"`,
        `"inputs:token_ids"`), `selector` the embedding call.
    """
    key, selector = _token_input(model, inputs, vocabulary)
    # The whole batch: a per-example target (classes, a loss's labels) fits it as given.
    g = compute_gradients(model, inputs, target, [selector], output=output)
    grad = _numpy(g[selector]).astype(np.float64)[:max_rows]
    act = _numpy(g.activations[selector]).astype(np.float64)[:max_rows]
    scores = (grad * act).sum(axis=-1)
    ids = np.asarray(_by_key(inputs, key))[:max_rows]
    if scores.shape != ids.shape:
        raise GradprobeError(f"Expected the embedding {selector!r} to give one vector per token "
                             f"id: its output has shape {grad.shape} for token ids of shape "
                             f"{ids.shape}.")
    return {"input": key, "layer": selector, "ids": ids.astype(np.int64).tolist(),
            "scores": scores.tolist()}


def default_wrt(inputs: Any) -> list[str]:
    """The report's (and `gradprobe inspect`'s) default sources for `inputs`: every
    leaf layer's activation and weight, and the floating inputs (token ids and masks
    have no gradient; their embeddings' activations are in the table instead)."""
    keys = _input_keys(inputs)
    floating = [k for k in keys if np.asarray(_by_key(inputs, k)).dtype.kind == "f"]
    return (["inputs"] if len(floating) == len(keys) else floating) + list(DEFAULT_WRT[1:])


def _input_keys(inputs: Any) -> list[str]:
    if isinstance(inputs, dict):
        return [f"inputs:{k}" for k in inputs]
    if isinstance(inputs, list | tuple):
        return [f"inputs:{i}" for i in range(len(inputs))]
    return ["inputs"]


def _by_key(inputs: Any, key: str) -> Any:
    if key == "inputs":
        return inputs
    part = key.split(":", 1)[1]
    return inputs[part] if isinstance(inputs, dict) else inputs[int(part)]


def _token_input(model: Any, inputs: Any, vocabulary: Any) -> tuple[str, str]:
    """The integer model input that feeds an embedding (one named like `token_ids`
    first, else the first in `inputs`' order), and that embedding's call."""
    from gradprobe.core import _sequence

    keys = _input_keys(inputs)
    feeds = _sequence.embedding_feeds(model)
    fed = {}
    for key in keys:
        if np.asarray(_by_key(inputs, key)).dtype.kind in "iu":
            selectors = _sequence._fed(feeds, _sequence.input_ids(model, key, keys))
            if selectors:
                fed[key] = selectors[0]
    if fed:  # token ids rather than segment ids (BERT's segment_ids feed an embedding too)
        key = min(fed, key=lambda k: "token" not in k.split(":")[-1].lower())
        return key, fed[key]
    ints = [k for k in keys if np.asarray(_by_key(inputs, k)).dtype.kind in "iu"]
    received = (f"integer inputs {ints}, none of which feeds a keras.layers.Embedding"
                if ints else "inputs with no integer array (token ids must be an integer "
                "array, e.g. int32)")
    raise GradprobeError("Expected a vocabulary only for a model whose integer input (token ids) "
                         f"feeds an Embedding layer. Received: vocabulary of type "
                         f"{type(vocabulary).__name__} with {received}; pass the token ids as "
                         "integers, or leave vocabulary=None.")


def _token_html(section: dict, lookup: Any) -> str:
    from gradprobe.report.plot import tokens as token_map

    texts = [[lookup(i) for i in row] for row in section["ids"]]
    section["tokens"] = texts
    return token_map(texts, np.asarray(section["scores"], dtype=np.float64))


def _training_history(history: Any) -> dict[str, list[float]] | None:
    if history is None:
        return None
    if isinstance(history, str):
        return _read_training_csv(history)
    data = getattr(history, "history", history)
    if not isinstance(data, dict):
        raise GradprobeError(f"history must be a Keras History, its .history dict or a "
                             f"CSVLogger file; got {type(history).__name__}.")
    return {str(k): [float(v) for v in vals] for k, vals in data.items()} or None


def _read_training_csv(path: str) -> dict[str, list[float]]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "epoch" not in rows[0]:
        raise GradprobeError(f"{path!r} is not a keras.callbacks.CSVLogger file (no 'epoch' "
                             "column).")
    def number(text: str) -> float:  # CSVLogger writes "NA" for a metric it lacks
        return float("nan") if text in ("", "NA") else float(text)

    try:
        curves = {k: [number(r[k]) for r in rows] for k in rows[0] if k != "epoch"}
    except ValueError:
        raise GradprobeError(f"{path!r} has values that are not numbers.") from None
    return {k: v for k, v in curves.items() if not np.all(np.isnan(v))}


def _monitor_history(monitor: Any) -> tuple[np.ndarray, dict] | None:
    if monitor is None:
        return None
    if isinstance(monitor, str):
        from gradprobe.monitor import read_csv

        steps, hist = read_csv(monitor)
    else:
        steps, hist = monitor.steps, monitor.history
    return (steps, hist) if len(steps) else None


# ---------------------------------------------------------------- helpers
def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return _data_uri(buf.getvalue())


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _is_image_batch(inputs: Any) -> bool:
    """One array of images: (N, H, W, 1) or (N, H, W, 3)."""
    if isinstance(inputs, dict | list | tuple):
        return False
    return np.ndim(inputs) == 4 and np.shape(inputs)[-1] in (1, 3)


def _is_class_target(target: Any) -> bool:
    if isinstance(target, str):
        return target == "predicted"
    if isinstance(target, int | np.integer):
        return True
    if isinstance(target, list | tuple | np.ndarray):
        return np.asarray(target).dtype.kind in "iu"
    return False


def describe_target(target: Any) -> str:
    """A few words naming a target, for captions and headers."""
    from gradprobe.core.targets import LossTarget

    if isinstance(target, str):
        return "the score of each example's predicted class" if target == "predicted" \
            else repr(target)
    if isinstance(target, int | np.integer):
        return f"the score of class {int(target)}"
    if isinstance(target, LossTarget):
        fn = target.fn
        name = getattr(fn, "name", None) or getattr(fn, "__name__", type(fn).__name__)
        return f"the loss {name}"
    if isinstance(target, list | tuple | np.ndarray):
        return "the score of each example's given class"
    return f"{getattr(target, '__name__', type(target).__name__)}(outputs)"


def _target_text(target: Any, g: Gradients) -> str:
    t = np.asarray(_numpy(g.target), dtype=np.float64)
    value = f"{float(t.ravel()[0]):.4g}" if t.size == 1 else \
        f"mean {t.mean():.4g} over {t.size} values"
    return f"{describe_target(target)} ({value})"


def _flat(inputs: Any) -> list[Any]:
    if isinstance(inputs, dict):
        return list(inputs.values())
    if isinstance(inputs, list | tuple):
        return list(inputs)
    return [inputs]


def _shape(shape: Any) -> str:
    return "(" + ", ".join("None" if d is None else str(int(d)) for d in shape) + ")"


def _script_json(data: Any) -> str:
    """JSON that is safe inside <script type="application/json">."""
    text = json.dumps(data)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _version() -> str:
    from gradprobe import __version__

    return __version__
