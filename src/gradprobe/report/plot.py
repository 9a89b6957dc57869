"""Pictures of attribution maps: `gp.plot.overlay`, `gp.plot.save_maps` (images and
1-D sequences, matplotlib) and `gp.plot.tokens` (a token heat map, HTML or PNG)."""

from __future__ import annotations

import html
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradprobe.errors import GradprobeError


def _to_rgb_uint8(image: Any) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise GradprobeError(f"An image must be (H, W), (H, W, 1) or (H, W, 3); got {img.shape}.")
    img = img[..., :3]
    lo, hi = float(np.min(img)), float(np.max(img))
    if lo >= 0 and hi <= 1:
        img = img * 255.0
    elif lo < 0 or hi > 255:
        img = (img - lo) / (hi - lo if hi > lo else 1.0) * 255.0
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _resize(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if heatmap.shape == shape:
        return heatmap
    rows = (np.arange(shape[0]) * heatmap.shape[0] / shape[0]).astype(int)
    cols = (np.arange(shape[1]) * heatmap.shape[1] / shape[1]).astype(int)
    return heatmap[rows][:, cols]


def overlay(image: Any, heatmap: Any, *, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blends a heat map over an image.

    Args:
        image: `(H, W)`, `(H, W, 1)` or `(H, W, 3)`; floats in [0, 1], values in
            [0, 255], or anything else (min-max scaled).
        heatmap: `(h, w)`; scaled into [0, 1] by min-max and resized (nearest) to
            the image when its size differs.
        alpha: Weight of the heat map.
        cmap: A matplotlib colormap name.

    Returns:
        An `(H, W, 3)` uint8 RGB array.
    """
    import matplotlib

    rgb = _to_rgb_uint8(image).astype(np.float64)
    h = np.asarray(heatmap, dtype=np.float64)
    if h.ndim == 3 and h.shape[-1] == 1:
        h = h[..., 0]
    if h.ndim != 2:
        raise GradprobeError(f"A heat map must be 2-D (H, W); got shape {h.shape}.")
    h = _resize(h, rgb.shape[:2])
    lo, hi = float(np.min(h)), float(np.max(h))
    h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    colored = matplotlib.colormaps[cmap](h)[..., :3] * 255.0
    out = (1.0 - alpha) * rgb + alpha * colored
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def save_maps(path: Any, images: Any, maps: Any, *, titles: Sequence[str] | None = None,
              alpha: float = 0.5, cmap: str = "jet") -> Any:
    """Writes a PNG grid, one row per example.

    Args:
        path: Where to write the PNG (a path or a binary file object).
        images: A batch of images `(N, H, W[, C])`, or of 1-D sequences
            `(N, steps[, channels])` (time series, audio).
        maps: A batch of maps `(N, h, w)` (an `Attribution` works): the row is
            image, map, overlay. Or a dict `{name: maps}`: the row is the image,
            then each method's overlay, headed by its name. For sequences the
            maps are `(N, steps')` (a saliency map with its channels reduced, or
            a Grad-CAM map of a `Conv1D` layer, stretched to the input's steps):
            each is drawn as a colour band behind the signal's curves.
        titles: Optional one title per example.

    Each map (and each overlay, which shows its map scaled to its own min..max)
    has a colour bar ticked at that map's smallest and largest value.

    Returns:
        The path written.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv2"),
    ...     keras.layers.GlobalAveragePooling2D(),
    ...     keras.layers.Dense(5),
    ... ])
    >>> x = np.random.default_rng(0).random((2, 8, 8, 1), dtype="float32")
    >>> gp.plot.save_maps("maps.png", x, {"saliency": gp.saliency(model, x, 3),
    ...                                   "Grad-CAM": gp.grad_cam(model, x, 3, "conv2")})
    'maps.png'
    """
    plt = _pyplot(path)
    images = np.asarray(images)
    named = isinstance(maps, dict)
    columns = {k: np.asarray(v) for k, v in maps.items()} if named else {"": np.asarray(maps)}
    for name, m in columns.items():
        if len(m) != len(images):
            raise GradprobeError(f"{len(images)} images but {len(m)} maps"
                                 f"{f' for {name!r}' if name else ''}.")
    if all(m.ndim == 2 for m in columns.values()) and images.ndim in (2, 3):
        return _save_sequence_maps(plt, path, images, columns, named, titles, alpha, cmap)
    n = len(images)
    width = 1 + (len(columns) if named else 2)
    fig, axes = plt.subplots(n, width, figsize=(2.5 * width, 2.5 * n), squeeze=False)
    for i in range(n):
        cells = [(_to_rgb_uint8(images[i]), None)]
        if named:
            cells += [(overlay(images[i], m[i], alpha=alpha, cmap=cmap), None)
                      for m in columns.values()]
        else:
            m = columns[""][i]
            cells += [(m, cmap), (overlay(images[i], m, alpha=alpha, cmap=cmap), None)]
        for ax, (cell, cell_cmap) in zip(axes[i], cells):
            ax.imshow(cell, cmap=cell_cmap)
            ax.set_axis_off()
        # A colour bar per map, in the map's own values (each overlay is scaled
        # to its map's min..max).
        raw = [m[i] for m in columns.values()] if named else [columns[""][i]]
        where = axes[i][1:] if named else axes[i][1:2]
        for ax, m in zip(where, raw):
            _colorbar(plt, fig, ax, m, cmap)
        axes[i][0].set_title(titles[i] if titles else f"example {i}", fontsize=9)
    heads = list(columns) if named else ["map", "overlay"]
    for j, head in enumerate(heads, start=1):
        axes[0][j].set_title(head, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


def _save_sequence_maps(plt: Any, path: Any, signals: np.ndarray, columns: dict,
                        named: bool, titles: Sequence[str] | None, alpha: float,
                        cmap: str) -> Any:
    """`save_maps` for 1-D sequences: the signal, then each map as a band behind it."""
    if signals.ndim == 2:
        signals = signals[..., None]
    signals = signals.astype(np.float64)
    n, steps = signals.shape[0], signals.shape[1]
    heads = list(columns) if named else ["map"]
    width = 1 + len(heads)
    fig, axes = plt.subplots(n, width, figsize=(3.5 * width, 1.8 * n), squeeze=False)
    for i in range(n):
        axes[i][0].plot(np.arange(steps), signals[i], linewidth=0.8)
        axes[i][0].set_xlim(0, steps - 1 if steps > 1 else 1)
        axes[i][0].set_title(titles[i] if titles else f"example {i}", fontsize=9)
        lo, hi = float(signals[i].min()), float(signals[i].max())
        hi = hi if hi > lo else lo + 1.0
        for ax, m in zip(axes[i][1:], columns.values()):
            band = np.asarray(m[i], dtype=np.float64)
            if band.shape[0] != steps:  # a coarser map (Grad-CAM after pooling): nearest
                band = band[(np.arange(steps) * band.shape[0] / steps).astype(int)]
            ax.imshow(band[None, :], aspect="auto", cmap=cmap, alpha=alpha,
                      extent=(-0.5, steps - 0.5, lo, hi), origin="lower")
            _colorbar(plt, fig, ax, band, cmap)
            ax.plot(np.arange(steps), signals[i], linewidth=0.8, color="black")
            ax.set_ylim(lo, hi)
    for j, head in enumerate(heads, start=1):
        axes[0][j].set_title(head or "map", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


def _colorbar(plt: Any, fig: Any, ax: Any, values: Any, cmap: str) -> Any:
    """A slim colour bar beside `ax` for a map drawn with `cmap`, ticked at the
    map's smallest and largest value (the colours span that range)."""
    import matplotlib

    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 3 and v.shape[-1] == 1:
        v = v[..., 0]
    finite = v[np.isfinite(v)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    if hi <= lo:
        hi = lo + 1.0
    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(lo, hi), cmap=cmap)
    bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.03)
    bar.set_ticks([lo, hi])
    bar.ax.tick_params(labelsize=6)
    bar.set_label("attribution", fontsize=6)
    return bar


# ----------------------------------------------------------------- token maps
def _diverging(value: float) -> tuple[int, int, int]:
    """White at 0, red towards +1, blue towards -1 (`value` in [-1, 1])."""
    a = min(abs(float(value)), 1.0)
    fade = int(round(255 * (1.0 - a)))
    return (255, fade, fade) if value > 0 else (fade, fade, 255) if value < 0 else \
        (255, 255, 255)


def _token_rows(tokens: Any, scores: Any, vocabulary: Any) -> tuple[list[list[str]],
                                                                    list[np.ndarray]]:
    arr = np.asarray(scores)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise GradprobeError(
            "Expected `scores` to be numbers, one per token (an array of shape (tokens,) or "
            f"(examples, tokens)). Received: scores of dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise GradprobeError(
            "Expected `scores` to have shape (tokens,) or (examples, tokens); reduce the "
            f"embedding axis first (e.g. .sum(-1)). Received: scores of shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise GradprobeError("Expected `scores` to be finite; they hold NaN or inf.")
    batched = arr.ndim == 2
    rows = list(tokens) if batched else [tokens]
    score_rows = list(arr.astype(np.float64)) if batched else [arr.astype(np.float64)]
    if len(rows) != len(score_rows):
        raise GradprobeError(
            f"Expected one row of tokens per row of scores: got {len(rows)} rows of tokens "
            f"and {len(score_rows)} of scores.")
    out = []
    for i, (row, sc) in enumerate(zip(rows, score_rows)):
        row = list(np.asarray(row).tolist()) if not isinstance(row, str) else None
        if row is None:
            raise GradprobeError(
                "Expected `tokens` to be a sequence of token strings (or ids with "
                "vocabulary=), not one string. Received: tokens=" + repr(tokens)[:80])
        if len(row) != len(sc):
            raise GradprobeError(
                f"Expected one score per token: example {i} has {len(row)} tokens and "
                f"{len(sc)} scores.")
        out.append([_token_text(t, vocabulary) for t in row])
    return out, score_rows


def _token_text(token: Any, vocabulary: Any) -> str:
    if isinstance(token, bytes):
        return token.decode("utf-8", "replace")
    if isinstance(token, str):
        return token
    if vocabulary is None:
        return str(token)
    try:
        return str(vocabulary[int(token)])
    except (KeyError, IndexError, TypeError, ValueError):
        raise GradprobeError(f"Token id {token!r} is not in `vocabulary`.") from None


def tokens(tokens: Any, scores: Any, *, path: Any = None, format: str | None = None,
           vocabulary: Any = None, limit: float | None = None,
           title: str | None = None) -> str:
    """A token heat map: each token on a colour given by its signed score.

    Colours diverge around 0: white for 0, red for positive scores, blue for
    negative ones, full colour at `limit` (default: the largest |score| of all
    rows, so that rows are comparable). Token text is HTML-escaped.

    Args:
        tokens: The tokens of one example (a sequence of strings, or of ids with
            `vocabulary=`), or one such sequence per example.
        scores: One score per token: shape `(tokens,)` or `(examples, tokens)`
            (for an embedding-layer attribution, reduce the embedding axis
            first, e.g. `a.sum(-1)`).
        path: Optional file to write: `".html"` (a standalone page) or `".png"`
            (a matplotlib image); a binary file object needs `format=`.
        format: `"html"` or `"png"`, to override the file extension.
        vocabulary: For token ids: a list (id -> string) or a dict.
        limit: The |score| drawn at full colour (scores beyond it saturate).
        title: An optional heading.

    Returns:
        The HTML fragment: one `<span class="gp-token">` per token, carrying its
        score in `data-score` and `title`.

    Example:

    >>> model = keras.Sequential([keras.Input((4,), dtype="int32"),
    ...                           keras.layers.Embedding(10, 3, name="token_embedding"),
    ...                           keras.layers.GlobalAveragePooling1D(),
    ...                           keras.layers.Dense(2)])
    >>> x = np.array([[1, 5, 7, 2]])
    >>> a = gp.gradients(model, x, 1, wrt="token_embedding")
    >>> scores = (a.numpy()["token_embedding"]
    ...           * np.asarray(a.activations["token_embedding"])).sum(-1)
    >>> html = gp.plot.tokens(["The", "film", "was", "great"], scores[0], path="tokens.html")
    >>> html.count('class="gp-token"')
    4
    """
    rows, score_rows = _token_rows(tokens, scores, vocabulary)
    top = max((float(np.max(np.abs(r))) for r in score_rows if r.size), default=0.0)
    if limit is None:
        limit = top
    elif isinstance(limit, bool) or not isinstance(limit, (int, float, np.number)) or \
            not np.isfinite(limit) or limit <= 0:
        raise GradprobeError(f"Expected `limit` to be a positive number (the |score| drawn at "
                             f"full colour). Received: limit={limit!r}")
    limit = float(limit) if limit else 1.0
    if format is None and isinstance(path, (str, os.PathLike)):
        ext = os.path.splitext(os.fspath(path))[1].lower()
        format = {".html": "html", ".htm": "html", ".png": "png"}.get(ext)
        if format is None:
            raise GradprobeError(f"Expected `path` to end in .html or .png (or pass format=). "
                                 f"Received: path={path!r}")
    if format not in (None, "html", "png") or (path is not None and format is None):
        raise GradprobeError(f"Expected `format` to be 'html' or 'png'. Received: "
                             f"format={format!r}")
    parts = ['<div class="gp-tokens">']
    if title:
        parts.append(f'<div class="gp-tokens-title">{html.escape(title)}</div>')
    for row, sc in zip(rows, score_rows):
        spans = []
        for text, value in zip(row, sc):
            r, g, b = _diverging(value / limit)
            ink = "white" if abs(value / limit) > 0.6 else "black"
            spans.append(
                f'<span class="gp-token" data-score="{value:.6g}" title="{value:.6g}" '
                f'style="background-color: rgb({r}, {g}, {b}); color: {ink}; white-space: pre; '
                f'padding: 1px 2px; margin: 1px; border-radius: 3px">{html.escape(text)}</span>')
        parts.append('<div class="gp-token-row">' + "".join(spans) + "</div>")
    parts.append("</div>")
    fragment = "\n".join(parts)
    if format == "html":
        page = ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>'
                f'{html.escape(title or "token heat map")}</title></head>'
                f'<body style="font-family: monospace">\n{fragment}\n</body></html>\n')
        if hasattr(path, "write"):
            path.write(page.encode("utf-8") if isinstance(path, io.RawIOBase | io.BufferedIOBase)
                       else page)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
    elif format == "png":
        _tokens_png(path, rows, score_rows, limit, title)
    return fragment


def _tokens_png(path: Any, rows: list[list[str]], score_rows: list[np.ndarray], limit: float,
                title: str | None, width: int = 80) -> None:
    """The token map as a PNG: tokens laid out in monospace, wrapped at `width` chars."""
    plt = _pyplot(path)
    lines: list[list[tuple[int, str, float]]] = []
    for row, sc in zip(rows, score_rows):
        line: list[tuple[int, str, float]] = []
        col = 0
        for text, value in zip(row, sc):
            shown = text.replace("\n", "\\n") or " "
            if col and col + len(shown) > width:
                lines.append(line)
                line, col = [], 0
            line.append((col, shown, value))
            col += len(shown) + 1
        lines.append(line)
        lines.append([])  # a blank line between examples
    lines = lines[:-1]
    fig = plt.figure(figsize=(0.11 * width + 0.4, 0.32 * (len(lines) + (1 if title else 0)) + 0.3))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-1, width + 1)
    total = len(lines) + (1 if title else 0)
    ax.set_ylim(total, -0.5)
    ax.set_axis_off()
    offset = 0
    if title:
        ax.text(0, 0.5, title, fontsize=10, family="monospace", va="center")
        offset = 1
    for y, line in enumerate(lines, start=offset):
        for col, text, value in line:
            r, g, b = _diverging(value / limit)
            ax.text(col, y + 0.5, text, fontsize=9, family="monospace", va="center",
                    color="white" if abs(value / limit) > 0.6 else "black",
                    bbox={"facecolor": (r / 255, g / 255, b / 255), "edgecolor": "none",
                          "pad": 1.5})
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _finish(fig: Any, path: Any) -> Any:
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def _pyplot(path: Any) -> Any:
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# The history plot's legend: one entry per variable up to LEGEND_MAX variables;
# beyond, lines are coloured by depth and the LEGEND_TOP largest and smallest
# last-step norms are named.
LEGEND_MAX = 20
LEGEND_TOP = 5


def gradient_history(steps: Any, history: dict[str, dict[str, Any]],
                     path: str | None = None) -> Any:
    """Gradient norms per variable over training, and the gradient flow of the last step.

    Args:
        steps: The recorded steps (`monitor.steps`).
        history: variable -> statistic -> values over `steps` (`monitor.history`,
            or what `gp.monitor.read_csv` returns); uses `norm`.
        path: Save the figure as a PNG here (optional).

    Returns:
        The matplotlib figure: norms over steps (log scale) and a bar chart of
        each variable's norm at the last step, in forward order. Up to 20
        variables, a legend beside the axes names each; with more, the lines
        are coloured by depth (a colour bar names variables along the forward
        order) and a legend names the 5 largest and 5 smallest at the last step.
    """
    plt = _pyplot(path)
    steps = np.asarray(steps)
    if not len(steps) or not history:
        raise GradprobeError("No recorded steps to plot.")
    import matplotlib

    names = list(history)
    many = len(names) > LEGEND_MAX
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14 if many else 15, 4.8))
    # Up to LEGEND_MAX variables: one legend entry each, outside the axes. More:
    # coloured by depth (forward order, a colour bar ticked with variable names),
    # the LEGEND_TOP largest and smallest at the last step named in a legend.
    depth = matplotlib.colormaps["viridis"]
    last = [max(float(history[n]["norm"][-1]), 1e-30) for n in names]
    named = set(names) if not many else set(
        np.array(names)[np.argsort(last)[np.r_[:LEGEND_TOP, -LEGEND_TOP:0]]].tolist())
    for i, name in enumerate(names):
        # Past the default cycle's 10 colours, tab20's 20 keep each line distinct.
        color = depth(i / max(len(names) - 1, 1)) if many else \
            matplotlib.colormaps["tab20"](i) if len(names) > 10 else None
        ax1.plot(steps, np.maximum(np.asarray(history[name]["norm"], dtype=np.float64), 1e-30),
                 label=name if name in named else "_nolegend_", linewidth=1, color=color)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("gradient L2 norm")
    ax1.set_title("gradient norms over training")
    if many:
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(
            norm=matplotlib.colors.Normalize(0, len(names) - 1), cmap=depth), ax=ax1, pad=0.02)
        ticks = sorted({int(round(t)) for t in np.linspace(0, len(names) - 1, 6)})
        bar.set_ticks(ticks)
        bar.set_ticklabels([names[t] for t in ticks], fontsize=6)
        bar.set_label(f"depth: {len(names)} variables in forward order", fontsize=7)
        ax1.legend(fontsize=6, title=f"largest / smallest {LEGEND_TOP} at the last step",
                   title_fontsize=6, loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=2,
                   frameon=False)
    else:
        ax1.legend(fontsize=7 if len(names) <= 10 else 6, loc="upper left",
                   bbox_to_anchor=(1.01, 1.0), frameon=False, ncol=1 if len(names) <= 10 else 2)
    ax2.bar(range(len(names)), last)
    ax2.set_yscale("log")
    ax2.set_xticks(range(len(names)), names, rotation=75, fontsize=7 if not many else 5,
                   ha="right")
    ax2.set_xlabel("variable (forward order)")
    ax2.set_ylabel("gradient L2 norm (log scale)")
    ax2.set_title(f"gradient flow at step {int(steps[-1])} (forward order)")
    return _finish(fig, path)


def gradient_flow(stats: dict[str, dict], kinds: dict[str, str] | None = None,
                  path: str | None = None) -> Any:
    """A "gradient flow" bar chart of one gradient computation, in forward order.

    Args:
        stats: source -> statistics (`Gradients.stats()`); uses `mean_abs` and `max_abs`.
        kinds: source -> kind (`Gradients.kinds`): activations and weights get
            separate panels. Default: one panel.
        path: Save the figure as a PNG here (optional).

    Returns:
        The matplotlib figure (log scale: mean |g| as bars, max |g| as marks).
    """
    plt = _pyplot(path)
    if not stats:
        raise GradprobeError("No gradient statistics to plot.")
    kinds = kinds or dict.fromkeys(stats, "gradient")
    groups: dict[str, list[str]] = {}
    for key in stats:
        groups.setdefault("weights" if kinds.get(key) == "weight" else "activations and inputs",
                          []).append(key)
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, (title, keys) in zip(axes[0], groups.items()):
        x = np.arange(len(keys))
        mean = [max(float(stats[k]["mean_abs"]), 1e-30) for k in keys]
        peak = [max(float(stats[k]["max_abs"]), 1e-30) for k in keys]
        ax.bar(x, mean, color="#4c72b0", label="mean |g|")
        ax.scatter(x, peak, color="#dd8452", marker="_", s=200, label="max |g|", zorder=3)
        ax.set_yscale("log")
        ax.set_xticks(x, keys, rotation=75, fontsize=7, ha="right")
        ax.set_ylabel("|gradient| (log scale)")
        ax.set_xlabel("source (forward order)")
        ax.set_title(f"gradient flow: {title} (forward order)")
        ax.legend(fontsize=7)
    return _finish(fig, path)


def training_curves(history: dict[str, Any], path: str | None = None) -> Any:
    """Loss and metric curves per epoch from a Keras `History.history` dict.

    Args:
        history: metric name -> values per epoch (`model.fit(...).history`);
            `val_<name>` is drawn beside `<name>`.
        path: Save the figure as a PNG here (optional).

    Returns:
        The matplotlib figure, one panel per metric.
    """
    plt = _pyplot(path)
    names = [k for k in history if not k.startswith("val_")]
    if not names:
        raise GradprobeError("No training curves to plot: the history is empty.")
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        for key, style in [(name, "-"), (f"val_{name}", "--")]:
            if key in history:
                values = np.asarray(history[key], dtype=np.float64)
                ax.plot(np.arange(1, len(values) + 1), values, style, label=key, marker=".")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.legend(fontsize=7)
    return _finish(fig, path)
