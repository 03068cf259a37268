"""The report's plots (matplotlib, no display): each is drawn only where the sweep has the data.

Drawn for a reader of a paper: every axis names its quantity and unit, parameter counts on a log
axis, accuracies in percent with their 95% intervals over seeds, labels inside the figure
(constrained layout: no `tight_layout` warnings), and points that share an x spread apart.
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: reports are drawn on machines without a display
import matplotlib.pyplot as plt

from orchestrator.report_data import Configuration, Summary, pareto_front
from workers.names import ACCURACY_PREFIX, TRAIN_LOSS, VAL_LOSS

METHOD_ORDER = ("series", "parallel", "lora", "prefix", "mosa")
MARKERS = "osD^vP*X"
# Points at one parameter count are spread over this many decades, so none hides another.
DODGE_DECADES = 0.04


def metric_label(metric: str) -> str:
    """The axis label of a metric: `accuracy/macro` -> `macro accuracy (%)`, `val_loss` -> `val_loss`."""
    if metric.startswith(ACCURACY_PREFIX):
        return f"{metric.split('/', 1)[1]} accuracy (%)"
    return metric


def _score(config: Configuration, metric: str) -> tuple[float, float, float] | None:
    """(mean, lower error, upper error) of `metric`, in percent for accuracies."""
    interval = config.stats.get(metric)
    if interval is None or interval.n == 0 or math.isnan(interval.mean):
        return None
    scale = 100 if metric.startswith(ACCURACY_PREFIX) else 1
    if interval.n == 1:
        return interval.mean * scale, 0.0, 0.0
    return interval.mean * scale, (interval.mean - interval.low) * scale, (interval.high - interval.mean) * scale


def _methods(configs: list[Configuration]) -> list[str]:
    present = {c.method for c in configs}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def dodged(xs: list[float]) -> list[float]:
    """`xs` with equal values spread symmetrically on a log axis (by `DODGE_DECADES` per neighbour)."""
    out, seen, counts = [], defaultdict(int), Counter(xs)
    for x in xs:
        k, n = seen[x], counts[x]
        seen[x] += 1
        out.append(x * 10 ** (DODGE_DECADES * (k - (n - 1) / 2)))
    return out


def accuracy_vs_params(summary: Summary, out: Path) -> Path | None:
    """Each configuration at (trainable parameters, score ± interval), one marker per method; the
    Pareto front as a step line carried to the right edge, its configurations labelled."""
    metric = summary.metric
    points = [(c, _score(c, metric)) for c in summary.configurations]
    points = [(c, s) for c, s in points if s is not None and c.trainable_params]
    if not points:
        return None
    xs = dodged([c.trainable_params for c, _ in points])
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    methods = _methods([c for c, _ in points])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for m_index, method in enumerate(methods):
        mine = [i for i, (c, _) in enumerate(points) if c.method == method]
        ax.errorbar([xs[i] for i in mine], [points[i][1][0] for i in mine],
                    yerr=[[points[i][1][1] for i in mine], [points[i][1][2] for i in mine]],
                    fmt=MARKERS[m_index % len(MARKERS)], color=colours[m_index % len(colours)], label=method,
                    capsize=3, markersize=6, alpha=0.9, zorder=3)
    sign = 1 if summary.mode == "max" else -1
    front = pareto_front([(c.trainable_params, sign * s[0]) for c, s in points])
    right = max(xs) * 10 ** (2 * DODGE_DECADES)
    steps_x = [xs[i] for i in front] + [right]
    steps_y = [points[i][1][0] for i in front] + [points[front[-1]][1][0]]
    ax.step(steps_x, steps_y, where="post", color="black", linewidth=1.4, linestyle="--", label="Pareto front",
            zorder=2)
    middle = math.sqrt(min(xs) * right)
    for i in front:
        config, score = points[i]
        left_side = xs[i] > middle  # labels on the right half point left, so they stay in the axes
        ax.annotate(config.label, (xs[i], score[0]), fontsize=7, xytext=(-6 if left_side else 6, 6),
                    textcoords="offset points", ha="right" if left_side else "left")
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 10 ** (3 * DODGE_DECADES), right * 10 ** DODGE_DECADES)
    ax.set_xlabel("trainable parameters (count, log scale)")
    ax.set_ylabel(metric_label(metric))
    if metric.startswith(ACCURACY_PREFIX):
        low = min(s[0] - s[1] for _, s in points)
        high = max(s[0] + s[2] for _, s in points)
        ax.set_ylim(max(0.0, low - 5), min(100.0, high + 8))
    ax.set_title(textwrap.fill(f"{metric_label(metric)} against trainable parameters, mean and 95% interval over "
                               "seeds", 70), fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "accuracy_vs_params.png")


def placement_heatmap(summary: Summary, out: Path) -> Path | None:
    """The best configuration of each (method, placement) cell: its mean and, over seeds, its 95% interval."""
    cells: dict[tuple[str, str], tuple[float, float, float]] = {}
    for config in summary.configurations:
        score = _score(config, summary.metric)
        if score is None:
            continue
        key = (config.method, config.placement)
        kept = cells.get(key)
        if kept is None or (score[0] > kept[0] if summary.mode == "max" else score[0] < kept[0]):
            cells[key] = score
    methods = _methods([c for c in summary.configurations if (c.method, c.placement) in cells])
    placements = sorted({p for _, p in cells}, key=lambda p: (p.count("+"), p))
    if len(cells) < 2 or (len(methods) < 2 and len(placements) < 2):
        return None
    grid = [[cells[(m, p)][0] if (m, p) in cells else math.nan for p in placements] for m in methods]
    fig, ax = plt.subplots(figsize=(2.4 + 1.5 * len(placements), 1.6 + 0.75 * len(methods)), layout="constrained")
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i, method in enumerate(methods):
        for j, placement in enumerate(placements):
            if (method, placement) not in cells:
                ax.text(j, i, "not run", ha="center", va="center", color="grey", fontsize=7)
                continue
            mean, minus, plus = cells[(method, placement)]
            text = f"{mean:.1f}"
            if minus or plus:
                text += f"\n[{mean - minus:.1f}, {mean + plus:.1f}]"
            shade = "black" if image.norm(mean) > 0.6 else "white"  # legible on viridis' bright end
            ax.text(j, i, text, ha="center", va="center", color=shade, fontsize=8)
    ax.set_xticks(range(len(placements)), [textwrap.fill(p, 14) for p in placements], fontsize=8)
    ax.set_yticks(range(len(methods)), methods)
    ax.set_xlabel("placement")
    ax.set_ylabel("method")
    fig.colorbar(image, ax=ax, label=metric_label(summary.metric))
    ax.set_title(textwrap.fill(f"{metric_label(summary.metric)}, best configuration per cell "
                               "[95% interval over seeds]", 60), fontsize=9)
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
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    for name, pts in sorted(lines.items()):
        pts.sort()
        ax.errorbar([x for x, _ in pts], [s[0] for _, s in pts], yerr=[[s[1] for _, s in pts], [s[2] for _, s in pts]],
                    marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"{label} (log scale)")
    ax.set_ylabel(metric_label(summary.metric))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / filename)


def training_curves(summary: Summary, out: Path) -> Path | None:
    """Training loss (left) and validation loss (right) against the optimizer step, one line per trial."""
    if not any(curve[TRAIN_LOSS] for curve in summary.curves.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, layout="constrained")
    for name, curve in sorted(summary.curves.items()):
        for ax, key in zip(axes, (TRAIN_LOSS, VAL_LOSS), strict=True):
            if curve[key]:
                steps, values = zip(*sorted(curve[key]), strict=True)
                ax.plot(steps, values, label=name, linewidth=1, marker=".", markersize=4)
    for ax, title in zip(axes, ("training loss", "validation loss"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy loss (nats per token)")
    if len(summary.curves) <= 16:
        fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="outside right center")
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
