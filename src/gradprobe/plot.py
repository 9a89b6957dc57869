"""Pictures of attribution maps: `gp.plot.overlay` and `gp.plot.save_maps` (matplotlib)."""

from __future__ import annotations

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
        images: A batch of images `(N, H, W[, C])`.
        maps: A batch of maps `(N, h, w)` (an `Attribution` works): the row is
            image, map, overlay. Or a dict `{name: maps}`: the row is the image,
            then each method's overlay, headed by its name.
        titles: Optional one title per example.

    Returns:
        The path written.

    Example:

    >>> gp.plot.save_maps("maps.png", x, {"saliency": gp.saliency(model, x, 3),
    ...                                   "Grad-CAM": gp.grad_cam(model, x, 3, "conv2")})
    """
    plt = _pyplot(path)
    images = np.asarray(images)
    named = isinstance(maps, dict)
    columns = {k: np.asarray(v) for k, v in maps.items()} if named else {"": np.asarray(maps)}
    for name, m in columns.items():
        if len(m) != len(images):
            raise GradprobeError(f"{len(images)} images but {len(m)} maps"
                                 f"{f' for {name!r}' if name else ''}.")
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
        axes[i][0].set_title(titles[i] if titles else f"example {i}", fontsize=9)
    heads = list(columns) if named else ["map", "overlay"]
    for j, head in enumerate(heads, start=1):
        axes[0][j].set_title(head, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


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
        each variable's norm at the last step, in forward order.
    """
    plt = _pyplot(path)
    steps = np.asarray(steps)
    if not len(steps) or not history:
        raise GradprobeError("No recorded steps to plot.")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, h in history.items():
        ax1.plot(steps, np.maximum(np.asarray(h["norm"], dtype=np.float64), 1e-30), label=name,
                 linewidth=1)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("gradient L2 norm")
    ax1.set_title("gradient norms over training")
    if len(history) <= 12:
        ax1.legend(fontsize=7)
    names = list(history)
    last = [max(float(history[n]["norm"][-1]), 1e-30) for n in names]
    ax2.bar(range(len(names)), last)
    ax2.set_yscale("log")
    ax2.set_xticks(range(len(names)), names, rotation=75, fontsize=7, ha="right")
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
        ax.set_title(name)
        ax.legend(fontsize=7)
    return _finish(fig, path)
