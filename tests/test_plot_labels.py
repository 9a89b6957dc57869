"""The figures gradprobe draws are readable: the monitor's history plot names
its variables (a legend, or with many variables a depth colour bar plus a
legend of the extremes), gradient-flow charts have a y-axis label, attribution
maps have colour bars. Inspected on the matplotlib figure objects (Agg)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gradprobe as gp  # noqa: E402
from gradprobe.report import plot as plot_module  # noqa: E402


def _history(n, steps=6):
    rng = np.random.default_rng(0)
    # variable i has norms around 10**-(i % 7): distinct last values
    return {f"block{i // 2}/dense.{'kernel' if i % 2 == 0 else 'bias'}":
            {"norm": (1 + rng.random(steps)) * 10.0 ** -(i % 7)} for i in range(n)}


def _colorbars(fig):
    return [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


@pytest.mark.parametrize("n", [3, 12, 20])
def test_history_plot_names_every_variable_up_to_20(n):
    history = _history(n)
    fig = plot_module.gradient_history(np.arange(1, 7), history)
    legend = fig.axes[0].get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == list(history)
    colours = {tuple(matplotlib.colors.to_rgba(line.get_color()))
               for line in fig.axes[0].get_lines()}
    assert len(colours) == n  # a colour per variable: the legend tells them apart
    assert fig.axes[1].get_ylabel()  # the flow chart's y axis says what it shows
    plt.close(fig)


def test_history_plot_with_many_variables_has_a_depth_colour_bar_and_the_extremes():
    history = _history(60)
    names = list(history)
    fig = plot_module.gradient_history(np.arange(1, 7), history)
    line_axes = fig.axes[0]
    bars = _colorbars(fig)
    assert len(bars) == 1
    ticks = [t.get_text() for t in bars[0].get_yticklabels()]
    assert ticks[0] == names[0] and ticks[-1] == names[-1]  # first and last in forward order
    assert "60 variables" in bars[0].get_ylabel()
    legend = line_axes.get_legend()
    assert legend is not None
    shown = [t.get_text() for t in legend.get_texts()]
    last = {k: h["norm"][-1] for k, h in history.items()}
    ranked = sorted(last, key=last.get)
    assert set(shown) == set(ranked[:5] + ranked[-5:])
    # every line is drawn, each in its own depth colour
    colours = {tuple(line.get_color()) for line in line_axes.get_lines()}
    assert len(line_axes.get_lines()) == 60 and len(colours) == 60
    plt.close(fig)


def test_gradient_flow_has_a_y_axis_label():
    stats = {"dense": {"mean_abs": 1e-3, "max_abs": 1e-2},
             "dense.kernel": {"mean_abs": 1e-4, "max_abs": 1e-3}}
    fig = plot_module.gradient_flow(stats, {"dense": "activation", "dense.kernel": "weight"})
    assert len(fig.axes) == 2
    assert all("gradient" in ax.get_ylabel() for ax in fig.axes)
    plt.close(fig)


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures `save_maps` draws, kept open (it closes them after saving)."""
    kept = []
    save = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        kept.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    yield kept
    monkeypatch.undo()
    for fig in kept:
        plt.close(fig)


def _bar_range(ax):
    return ax._colorbar.vmin, ax._colorbar.vmax


def test_attribution_maps_have_colour_bars_in_the_maps_values(tmp_path, saved_figures):
    rng = np.random.default_rng(0)
    images = rng.random((2, 8, 8, 3))
    maps = rng.random((2, 8, 8)) * np.array([1.0, 5.0])[:, None, None] - 0.5
    gp.plot.save_maps(str(tmp_path / "one.png"), images, maps)
    gp.plot.save_maps(str(tmp_path / "two.png"), images,
                      {"saliency": maps, "Grad-CAM": maps[:, ::2, ::2] * 3})
    one, two = saved_figures
    bars = _colorbars(one)
    assert len(bars) == 2  # one per example's map
    for bar, m in zip(bars, maps):
        assert np.allclose(_bar_range(bar), (m.min(), m.max()))
    bars = _colorbars(two)
    assert len(bars) == 4  # one per overlay
    assert np.allclose(_bar_range(bars[1]), (3 * maps[0, ::2, ::2].min(), 3 * maps[0, ::2, ::2].max()))


def test_sequence_maps_have_colour_bars(tmp_path, saved_figures):
    rng = np.random.default_rng(1)
    gp.plot.save_maps(str(tmp_path / "seq.png"), rng.random((3, 20)), rng.random((3, 20)))
    (fig,) = saved_figures
    assert len(_colorbars(fig)) == 3
