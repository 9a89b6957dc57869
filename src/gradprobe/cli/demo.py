"""`gradprobe demo`: the whole tool on the bundled 8×8 digits, offline.

Trains a small CNN on the digits data set that ships with gradprobe (1,797
images; see `data/DIGITS.md` for source and licence) with a `GradientMonitor`
attached, prints the per-layer gradient table and diagnosis for a held-out
batch, and writes an HTML report, Grad-CAM overlays and gradient-flow plots.
"""

from __future__ import annotations

import os
import time
from importlib import resources
from typing import Any

import keras
import numpy as np

TEST_SIZE = 360
# Every file the demo may write; with `overwrite`, those of an earlier run that this
# run does not write (none today; a later version's extra files) are removed,
# so the folder holds one run. No other file is touched.
DEMO_FILES = ("report.html", "gradcam.png", "gradient_flow.png", "gradient_history.png",
              "gradients.csv", "model.keras", "test_images.npy", "test_labels.npy")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled 8×8 handwritten digits (Alpaydin & Kaynak, UCI, CC BY 4.0).

    Returns:
        `(images, labels)`: float32 `(1797, 8, 8, 1)` scaled into [0, 1], and
        int64 `(1797,)` digits 0..9.

    Example:

    >>> import gradprobe.cli.demo
    >>> x, y = gradprobe.cli.demo.load_digits()
    >>> x.shape, y[:5]
    ((1797, 8, 8, 1), array([0, 1, 2, 3, 4]))
    """
    path = resources.files("gradprobe").joinpath("data/digits.npz")
    with resources.as_file(path) as file, np.load(file, allow_pickle=False) as data:
        images = data["images"].astype(np.float32)[..., None] / 16.0
        labels = data["labels"].astype(np.int64)
    return images, labels


def split(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple:
    """A fixed shuffled split: `(x_train, y_train, x_test, y_test)`, 360 test images."""
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    return images[train], labels[train], images[test], labels[test]


def build_model() -> keras.Model:
    """The demo's CNN: three 3×3 convolutions, global pooling, two dense layers.

    It outputs logits (its last layer has no softmax) and is trained with
    `SparseCategoricalCrossentropy(from_logits=True)`: a loss on its outputs needs
    `from_logits=True` (`gradprobe inspect --loss ... --from-logits`)."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1), name="digit"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(64, activation="relu", name="fc"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="digits_cnn",
    )


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    """A new or empty folder, or (`overwrite`) any folder; never a file."""
    from gradprobe.errors import GradprobeError

    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise GradprobeError(f"Expected out_dir to be a folder. Received: out_dir={out_dir!r}, "
                             "which is a file; pass a folder path.")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if entries and not overwrite:
        raise GradprobeError(
            f"Expected out_dir to be a new or empty folder. Received: out_dir={out_dir!r}, "
            f"which holds {', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}; "
            "pass overwrite=True to replace the demo's files in it, or choose a new folder.")


class _Progress(keras.callbacks.Callback):
    """One rich progress bar over all training steps, with loss and accuracy."""

    def __init__(self, progress: Any, epochs: int, steps: int):
        super().__init__()
        self.progress, self.epochs = progress, epochs
        self.task = progress.add_task("training", total=epochs * steps, info="")

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        logs = logs or {}
        self.progress.update(self.task, advance=1, info=(
            f"loss {float(logs.get('loss', np.nan)):.3f}  "
            f"acc {float(logs.get('accuracy', np.nan)):.3f}"))

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.progress.update(self.task, description=f"epoch {epoch + 1}/{self.epochs}")


def run(out_dir: str = "gradprobe-demo", *, epochs: int = 12, seed: int = 0,
        console: Any = None, overwrite: bool = False) -> dict[str, Any]:
    """Runs the demo and writes its files into `out_dir`.

    Args:
        out_dir: Where to write `report.html`, `gradcam.png`, `gradient_flow.png`,
            `gradient_history.png`, `gradients.csv` (the monitor's record),
            `model.keras`, `test_images.npy` and `test_labels.npy`: a new or
            empty folder unless `overwrite`.
        epochs: Training epochs (about 1 s each on 2 CPU cores).
        seed: Seeds the split, the initial weights and the shuffling.
        console: A `rich.console.Console` (default: a new one).
        overwrite: Write into a folder that is not empty, replacing the demo's
            files in it and removing those of an earlier run that this run does
            not write (`DEMO_FILES`): the folder then holds one run. Other files stay. Without it such a folder is refused
            with a `GradprobeError` before anything is written.

    Returns:
        A dict with `test_accuracy`, `findings` (the held-out batch's) and the
        `files` written.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    import gradprobe as gp
    from gradprobe.attribution._common import fixed_target

    _check_out_dir(out_dir, overwrite)
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged: do not fold lines at 80 columns
            console = Console(width=max(console.width, 130))
    os.makedirs(out_dir, exist_ok=True)
    files = {name: os.path.join(out_dir, name) for name in DEMO_FILES}

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = split(*load_digits(), seed=seed)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    monitor = gp.GradientMonitor(every=5, csv=files["gradients.csv"], overwrite=overwrite)
    console.print(f"[bold]gradprobe demo[/bold]: training {model.name} on {len(x_train)} bundled "
                  f"8x8 digits ({len(x_test)} held out) on {keras.backend.backend()}, "
                  "GradientMonitor attached")
    batch = 32
    steps = -(-len(x_train) // batch)
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), console=console, transient=False) as bar:
        history = model.fit(x_train, y_train, batch_size=batch, epochs=epochs, verbose=0,
                            validation_data=(x_test, y_test),
                            callbacks=[c for c in (monitor, _Progress(bar, epochs, steps))
                                       if c is not None])
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0, batch_size=256)
    console.print(f"trained in {seconds:.1f} s; test accuracy {accuracy:.1%} on {len(x_test)} "
                  "held-out digits")

    xb, yb = x_test[:64], y_test[:64]
    target = gp.loss(model.loss, yb)
    g = gp.gradients(model, xb, target, ["inputs", "*", "*.weights"])
    console.print(f"\nGradients of the mean cross-entropy loss on {len(xb)} held-out digits:")
    g.summary()
    findings = g.diagnose()
    if not findings:
        console.print("[green]No findings[/green]: no vanishing, exploding, non-finite or "
                      "dead gradients.")
    for f in monitor.diagnose():
        console.print(f"[yellow]during training[/yellow] {f.message}", highlight=False)

    images, labels = x_test[:8], y_test[:8]
    predicted = fixed_target(model, images, "predicted", None, False)
    maps = {"saliency |g|": gp.saliency(model, images, predicted),
            "Grad-CAM (conv2)": gp.grad_cam(model, images, predicted, "conv2")}
    titles = [f"predicted {p}, label {t}" for p, t in zip(predicted, labels)]
    gp.plot.save_maps(files["gradcam.png"], images, maps, titles=titles)
    gp.plot.gradient_flow(g.stats(), g.kinds, files["gradient_flow.png"])
    monitor.plot(files["gradient_history.png"])
    model.save(files["model.keras"])
    np.save(files["test_images.npy"], xb)
    np.save(files["test_labels.npy"], yb)
    gp.write_report(files["report.html"], model, xb, target, gradients=g, labels=yb,
                    attribution_layer="conv2", monitor=monitor, history=history,
                    title="gradprobe demo: a small CNN on 8x8 digits", max_images=8,
                    overwrite=overwrite,
                    notes={"test accuracy": f"{accuracy:.1%} on {len(x_test)} held-out digits",
                           "training": f"{epochs} epochs, {len(x_train)} images, "
                                       f"{seconds:.1f} s",
                           "model output": "logits (no softmax; trained with "
                                           "SparseCategoricalCrossentropy(from_logits=True))",
                           "data": "8x8 optical handwritten digits (Alpaydin & Kaynak, "
                                   "UCI, CC BY 4.0), bundled"})
    for name in DEMO_FILES:  # an earlier run's files that this one did not write
        stale = os.path.join(out_dir, name)
        if name not in files and os.path.isfile(stale):
            os.remove(stale)
    console.print(f"\nReport: {os.path.abspath(files['report.html'])}")
    during = "gradients during training (gradient_history.png, gradients.csv), "
    console.print(f"Also written to {os.path.abspath(out_dir)}: Grad-CAM overlays "
                  f"(gradcam.png), gradient flow (gradient_flow.png), {during}the trained "
                  "model (model.keras; it outputs logits) and a held-out batch "
                  "(test_images.npy, test_labels.npy). Try: gradprobe inspect "
                  f"{os.path.join(out_dir, 'model.keras')} --input "
                  f"{os.path.join(out_dir, 'test_images.npy')} --labels "
                  f"{os.path.join(out_dir, 'test_labels.npy')} "
                  "--loss sparse_categorical_crossentropy --from-logits")
    return {"test_accuracy": float(accuracy), "findings": findings, "files": files,
            "seconds": seconds}
