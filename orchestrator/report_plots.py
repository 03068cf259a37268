"""The report's plots (matplotlib, no display): each is drawn only where the sweep has the data."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # before pyplot: reports are drawn on machines without a display
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from orchestrator.report import Configuration, Summary

METHOD_ORDER = ("series", "parallel", "lora", "prefix", "mosa")


def _score(config: Configuration, metric: str) -> tuple[float, float, float] | None:
    """(mean, lower error, upper error) of `metric`, in percent for accuracies."""
    interval = config.stats.get(metric)
    if interval is None or interval.n == 0 or math.isnan(interval.mean):
        return None
    scale = 100 if metric.startswith("accuracy/") else 1
    if interval.n == 1:
        return interval.mean * scale, 0.0, 0.0
    return interval.mean * scale, (interval.mean - interval.low) * scale, (interval.high - interval.mean) * scale


def _methods(configs: list[Configuration]) -> list[str]:
    present = {c.method for c in configs}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_vs_params(summary: Summary, out: Path) -> Path | None:
    """Each configuration at (trainable parameters, score ± interval); the Pareto front as a step line."""
    from orchestrator.report import pareto_front

    metric = summary.metric
    points = [(c, _score(c, metric)) for c in summary.configurations]
    points = [(c, s) for c, s in points if s is not None and c.trainable_params]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(_methods([c for c, _ in points]), plt.rcParams["axes.prop_cycle"].by_key()["color"],
                       strict=False))
    for method, colour in colours.items():
        mine = [(c, s) for c, s in points if c.method == method]
        ax.errorbar([c.trainable_params for c, _ in mine], [s[0] for _, s in mine],
                    yerr=[[s[1] for _, s in mine], [s[2] for _, s in mine]], fmt="o", color=colour, label=method,
                    capsize=3)
    sign = 1 if summary.mode == "max" else -1
    front = pareto_front([(c.trainable_params, sign * s[0]) for c, s in points])
    ax.step([points[i][0].trainable_params for i in front], [points[i][1][0] for i in front], where="post",
            color="black", linewidth=1, alpha=0.6, label="Pareto front")
    for i in front:
        config, score = points[i]
        ax.annotate(config.label, (config.trainable_params, score[0]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{metric} (%)" if metric.startswith("accuracy/") else metric)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "accuracy_vs_params.png")


def placement_heatmap(summary: Summary, out: Path) -> Path | None:
    """The best score of each (method, placement) cell."""
    cells: dict[tuple[str, str], float] = {}
    for config in summary.configurations:
        score = _score(config, summary.metric)
        if score is None:
            continue
        key = (config.method, config.placement)
        better = max if summary.mode == "max" else min
        cells[key] = better(cells.get(key, score[0]), score[0])
    methods = _methods([c for c in summary.configurations if (c.method, c.placement) in cells])
    placements = sorted({p for _, p in cells}, key=lambda p: (p.count("+"), p))
    if len(cells) < 2 or (len(methods) < 2 and len(placements) < 2):
        return None
    grid = [[cells.get((m, p), math.nan) for p in placements] for m in methods]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(placements), 1.2 + 0.6 * len(methods)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not math.isnan(value):
                shade = "black" if image.norm(value) > 0.6 else "white"  # legible on viridis' bright end
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color=shade, fontsize=8)
    ax.set_xticks(range(len(placements)), placements, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(methods)), methods)
    fig.colorbar(image, ax=ax, label=summary.metric)
    ax.set_title("placement x method")
    return _save(fig, out / "placement_heatmap.png")


def score_vs(summary: Summary, out: Path, key: str, label: str, filename: str) -> Path | None:
    """Score against a numeric adapter field (bottleneck, rank): one line per method and placement."""
    lines: dict[str, list[tuple[float, tuple[float, float, float]]]] = defaultdict(list)
    for config in summary.configurations:
        value, score = config.number(key), _score(config, summary.metric)
        if value is not None and score is not None:
            lines[f"{config.method} {config.placement}"].append((value, score))
    if not any(len({x for x, _ in pts}) > 1 for pts in lines.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, pts in sorted(lines.items()):
        pts.sort()
        ax.errorbar([x for x, _ in pts], [s[0] for _, s in pts], yerr=[[s[1] for _, s in pts], [s[2] for _, s in pts]],
                    marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(label)
    ax.set_ylabel(summary.metric)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / filename)


def training_curves(summary: Summary, out: Path) -> Path | None:
    """Training loss (left) and validation loss (right) against the optimizer step, one line per trial."""
    if not any(curve["train_loss"] for curve in summary.curves.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, curve in sorted(summary.curves.items()):
        for ax, key in zip(axes, ("train_loss", "val_loss"), strict=True):
            if curve[key]:
                steps, values = zip(*sorted(curve[key]), strict=True)
                ax.plot(steps, values, label=name, linewidth=1, marker=".", markersize=4)
    for ax, title in zip(axes, ("training loss", "validation loss"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if len(summary.curves) <= 16:
        axes[1].legend(fontsize=6)
    return _save(fig, out / "training_curves.png")


def draw_all(summary: Summary, out: Path) -> list[Path]:
    """Every plot the sweep has data for."""
    drawn = [
        accuracy_vs_params(summary, out),
        placement_heatmap(summary, out),
        score_vs(summary, out, "adapter.bottleneck", "bottleneck size", "accuracy_vs_bottleneck.png"),
        score_vs(summary, out, "adapter.rank", "LoRA rank", "accuracy_vs_rank.png"),
        training_curves(summary, out),
    ]
    return [p for p in drawn if p is not None]
