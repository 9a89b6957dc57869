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


def save_maps(path: str, images: Any, maps: Any, *, titles: Sequence[str] | None = None,
              alpha: float = 0.5, cmap: str = "jet") -> str:
    """Writes a PNG grid: for each example, the image, the map and the overlay.

    Args:
        path: Where to write the PNG.
        images: A batch of images `(N, H, W[, C])`.
        maps: A batch of maps `(N, h, w)` (an `Attribution` works).
        titles: Optional one title per example.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    images, maps = np.asarray(images), np.asarray(maps)
    if len(images) != len(maps):
        raise GradprobeError(f"{len(images)} images but {len(maps)} maps.")
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        cells = [_to_rgb_uint8(images[i]), maps[i], overlay(images[i], maps[i], alpha=alpha,
                                                             cmap=cmap)]
        for j, (ax, cell) in enumerate(zip(axes[i], cells)):
            ax.imshow(cell, cmap=cmap if j == 1 else None)
            ax.set_axis_off()
        axes[i][0].set_title(titles[i] if titles else f"example {i}", fontsize=9)
    axes[0][1].set_title("map", fontsize=9)
    axes[0][2].set_title("overlay", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
