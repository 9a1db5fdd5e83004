"""PNG plots of long-tailed results: per-class accuracy vs training count, group bars, loss curves,
methods side by side.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch),
so they work headless and inside other programs' sessions; files are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from candle_dist.errors import UserInputError
from candle_dist.eval.metrics import FEW_SHOT_MAX, MANY_SHOT_MIN

ArrayLike = torch.Tensor | np.ndarray | Sequence
GROUPS = ("many", "medium", "few", "base", "new", "hm")
GROUP_LABELS = {
    "many": f"many\n(>{MANY_SHOT_MIN - 1})\nall cols",
    "medium": f"medium\n({FEW_SHOT_MAX + 1}-{MANY_SHOT_MIN - 1})\nall cols",
    "few": f"few\n(<{FEW_SHOT_MAX + 1})\nall cols",
    "base": "base\n\nbase cols",
    "new": "new\n\nnew cols",
    "hm": "harmonic\nmean",
}
NEW_CLASS_X = 0.5  # where classes without training images sit on the log-count axis


def _floats(values: ArrayLike) -> np.ndarray:
    """A float64 numpy copy; None (JSON null) becomes NaN."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> None:
    """Write the PNG through a temporary name so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _binned_mean(x: np.ndarray, y: np.ndarray, num_bins: int = 12) -> tuple[np.ndarray, ...]:
    """Mean of y over log-spaced bins of x (x >= 1); bin position = geometric mean of its x."""
    edges = np.unique(np.round(np.geomspace(1, x.max() + 1, num_bins + 1)))
    bins = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    size = np.bincount(bins, minlength=len(edges) - 1)
    mean_y = np.bincount(bins, weights=y, minlength=len(edges) - 1)
    mean_logx = np.bincount(bins, weights=np.log(x), minlength=len(edges) - 1)
    keep = size > 0
    return np.exp(mean_logx[keep] / size[keep]), mean_y[keep] / size[keep]


def plot_per_class_accuracy(
    per_class_acc: ArrayLike | Mapping[str, ArrayLike],
    train_counts: ArrayLike,
    path: str | os.PathLike,
    title: str = "Per-class accuracy vs training images",
) -> None:
    """Accuracy of every class against its training count (log x), one colour per method.

    Dots are classes, the line is the mean over log-spaced count bins; classes without
    training images (new) sit at the left, marked "new". NaN/None accuracies are skipped.
    """
    methods = per_class_acc if isinstance(per_class_acc, Mapping) else {"": per_class_acc}
    counts = _floats(train_counts)
    x = np.where(counts > 0, counts, NEW_CLASS_X)
    figure = _new_figure(8, 4.8)
    axes = figure.add_subplot()
    alpha = float(np.clip(30 / np.sqrt(len(counts) * len(methods)), 0.05, 0.6))
    for color, (name, values) in zip(_colors(len(methods)), methods.items(), strict=False):
        accuracy = _floats(values)
        if accuracy.shape != counts.shape:
            where = f"per_class_acc[{name!r}]" if name else "per_class_acc"
            raise UserInputError(
                f"{where}: {accuracy.size} classes but train_counts has {counts.size}; "
                "give one accuracy per class"
            )
        valid = ~np.isnan(accuracy)
        axes.scatter(x[valid], accuracy[valid], s=8, color=color, alpha=alpha, linewidths=0)
        seen = valid & (counts > 0)
        if seen.any():
            bin_x, bin_y = _binned_mean(counts[seen], accuracy[seen])
            axes.plot(bin_x, bin_y, "-o", color=color, lw=2, ms=4, label=name or None)
        new = valid & (counts == 0)
        if new.any():
            axes.plot([NEW_CLASS_X], [accuracy[new].mean()], "D", color=color, ms=8, mec="k")
    axes.set_xscale("log")
    has_new = bool((counts == 0).any())
    decades = 10.0 ** np.arange(0, np.ceil(np.log10(max(x.max(), 100))) + 1)
    ticks = [NEW_CLASS_X, *decades] if has_new else list(decades)
    axes.set_xticks(ticks, ["new" if t == NEW_CLASS_X else f"{t:g}" for t in ticks])
    axes.set_xlim(x.min() / 1.6, max(x.max(), 100) * 1.6)
    axes.set_ylim(-0.03, 1.12)
    axes.set_yticks(np.linspace(0, 1, 6))
    for boundary in (FEW_SHOT_MAX + 0.5, MANY_SHOT_MIN - 0.5):
        axes.axvline(boundary, color="0.5", ls="--", lw=1)
    few_center = np.sqrt(max(x[counts > 0].min(), 1) * FEW_SHOT_MAX) if (counts > 0).any() else 5
    many_center = np.sqrt(MANY_SHOT_MIN * max(x.max(), 1.5 * MANY_SHOT_MIN) * 1.6)
    for label, position in (("few", few_center), ("medium", 45), ("many", many_center)):
        axes.text(position, 1.075, label, ha="center", va="center", color="0.35", fontsize=9)
    if has_new:
        axes.axvline(0.75, color="0.8", lw=1)
        axes.text(NEW_CLASS_X, 1.075, "◆ = mean", ha="center", va="center", fontsize=8)
        axes.text(
            0.01, 0.01, "accuracy over all classes' columns (the table's 'new' uses new columns)",
            transform=axes.transAxes, fontsize=7, color="0.35",
        )  # fmt: skip
    axes.set_xlabel("training images of the class (log scale)")
    axes.set_ylabel("top-1 accuracy, all columns")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if len(methods) > 1:
        axes.legend(loc="lower right", title="bin means")
    _save(figure, path)


def _colors(count: int) -> list[tuple[float, ...]]:
    return [colormaps["tab10"](i % 10) for i in range(count)]


def plot_shot_groups(
    results: Mapping[str, Mapping[str, float | None]],
    path: str | os.PathLike,
    title: str = "Accuracy by class group",
) -> None:
    """Grouped bars: many/medium/few, then base/new/harmonic mean, one bar per method."""
    groups = [g for g in GROUPS if any(r.get(g) is not None for r in results.values())]
    methods = list(results)
    width = min(0.8 / max(len(methods), 1), 0.3)
    figure = _new_figure(float(np.clip(2 + 0.4 * len(groups) * len(methods), 7, 11)), 4.6)
    axes = figure.add_subplot()
    for i, (color, method) in enumerate(zip(_colors(len(methods)), methods, strict=True)):
        positions = np.arange(len(groups)) + (i - (len(methods) - 1) / 2) * width
        values = [results[method].get(g) for g in groups]
        heights = [100 * v if v is not None else 0.0 for v in values]
        bars = axes.bar(positions, heights, width * 0.95, color=color, label=method)
        labels = [
            f"{h:.0f}" if v is not None else "n/a" for h, v in zip(heights, values, strict=True)
        ]
        axes.bar_label(bars, labels, fontsize=7, padding=1)
    if "base" in groups and groups.index("base") > 0:
        axes.axvline(groups.index("base") - 0.5, color="0.5", ls=":", lw=1)
    axes.set_xticks(np.arange(len(groups)), [GROUP_LABELS[g] for g in groups])
    axes.set_ylim(0, 108)
    axes.set_ylabel("accuracy (%)")
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.24), ncols=min(len(methods), 4))
    _save(figure, path)


def plot_method_comparison(
    methods: Mapping[str, Mapping[str, float | None]],
    path: str | os.PathLike,
    keys: Sequence[str] = ("top1", "many", "medium", "few"),
    title: str = "Accuracy by method",
) -> None:
    """Bars of `keys` per method, with `KEY_std` entries (std over seeds) as error bars.

    Methods run along the x axis (a comparison has many of them, a group plot would crowd), one
    colour per metric; a missing value (None: no class in that group) is drawn as "n/a".
    """
    names = list(methods)
    width = 0.8 / len(keys)
    figure = _new_figure(float(np.clip(2 + 0.55 * len(keys) * len(names) / 2, 7, 16)), 4.8)
    axes = figure.add_subplot()
    for i, (color, key) in enumerate(zip(_colors(len(keys)), keys, strict=True)):
        positions = np.arange(len(names)) + (i - (len(keys) - 1) / 2) * width
        values = [methods[name].get(key) for name in names]
        stds = [methods[name].get(f"{key}_std") for name in names]
        heights = [100 * v if v is not None else 0.0 for v in values]
        errors = [
            100 * s if s is not None and v is not None else 0.0
            for v, s in zip(values, stds, strict=True)
        ]
        axes.bar(positions, heights, width * 0.95, yerr=errors, capsize=2, color=color, label=key)
        for x, value in zip(positions, values, strict=True):
            if value is None:
                axes.text(x, 1, "n/a", ha="center", va="bottom", rotation=90, fontsize=7)
    axes.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    axes.set_ylim(0, 105)
    axes.set_ylabel("accuracy (%)")
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncols=len(keys))
    _save(figure, path)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points (shorter at the start), same length as `values`."""
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def plot_loss_curve(
    steps: ArrayLike,
    losses: ArrayLike | Mapping[str, ArrayLike],
    path: str | os.PathLike,
    title: str = "Training loss",
    ylabel: str = "loss",
) -> None:
    """Loss against step; several curves (name -> values over the same steps) overlaid.

    Long noisy curves (> 100 points) are drawn faint with a moving average on top.
    """
    curves = losses if isinstance(losses, Mapping) else {"": losses}
    x = _floats(steps)
    figure = _new_figure(7, 4.2)
    axes = figure.add_subplot()
    for color, (name, values) in zip(_colors(len(curves)), curves.items(), strict=False):
        y = _floats(values)
        if y.shape != x.shape:
            where = f"losses[{name!r}]" if name else "losses"
            raise UserInputError(f"{where}: {y.size} values for {x.size} steps")
        if len(y) > 100:
            axes.plot(x, y, color=color, alpha=0.25, lw=0.8)
            axes.plot(x, _moving_average(y, max(len(y) // 50, 2)), color=color, lw=2, label=name)
        else:
            axes.plot(x, y, "-", color=color, lw=2, marker="." if len(y) < 40 else None, label=name)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if len(curves) > 1:
        axes.legend()
    _save(figure, path)
