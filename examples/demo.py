"""A first look at gradprobe: per-layer gradients of a small CNN, with a diagnosis.

Run with `make demo`. Builds a small convolutional network (no downloads), takes
a batch of synthetic 16x16 images and prints, for the predicted class of each
image, the gradient statistics of every layer's activation and weights, then
writes Grad-CAM overlays to ./gradprobe-demo/gradcam.png.
"""

from __future__ import annotations

import os

import keras
import numpy as np

import gradprobe as gp


def build_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(name="pool1"),
            keras.layers.Conv2D(16, 3, activation="relu", name="conv2"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(32, activation="relu", name="fc"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="demo_cnn",
    )


def main(out_dir: str = "gradprobe-demo") -> None:
    model = build_model()
    rng = np.random.default_rng(0)
    x = rng.random((8, 16, 16, 1), dtype=np.float32)
    g = gp.gradients(model, x, target="predicted", wrt=["inputs", "*", "*.kernel"])
    print(f"target (score of each image's predicted class): {np.round(g.target.numpy(), 4)}")
    g.summary()
    if not g.diagnose():
        print("No findings: no vanishing, exploding, non-finite or dead gradients.")
    os.makedirs(out_dir, exist_ok=True)
    cams = gp.grad_cam(model, x[:4], "predicted", layer="conv2")
    path = gp.plot.save_maps(os.path.join(out_dir, "gradcam.png"), x[:4], cams)
    print(f"Grad-CAM overlays of layer 'conv2': {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
