"""The report of a sweep: one row per configuration, plots, and how sure the winner is.

Trials that differ only in their seed are one configuration. Its accuracy is the mean over seeds
with a 95% Student-t interval, mean ± t(0.975, n-1) · s / √n (none for a single run).

Whether the best configuration beats the runner-up is asked of the same seeds and questions
(`orchestrator.comparison`): a two-level bootstrap (seeds, then questions within seeds) and a
seed-paired t-test; "beats" only when the bootstrap's 95% interval excludes zero. The two are chosen
on the validation split (lowest mean `val_loss`) when every ranked configuration has one, and then
compared on the test sets; otherwise they are the test ranking's top two, and the verdict says so.

Plots: accuracy vs trainable parameters with the Pareto front, a placement x method heatmap,
accuracy vs bottleneck size and vs LoRA rank (when the sweep varies them), and training curves.
`collect` reads the trials through a `TrialSource` (`orchestrator.mlflow_sweep.MlflowTrials` reads
them from the MLflow store: this module never touches MLflow) and `write_report` writes a folder,
which `orchestrator.mlflow_sweep.finish_parent` logs on the sweep's parent run.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from rich.table import Table

from orchestrator.comparison import two_level_bootstrap
from orchestrator.report_data import Configuration, Interval, Summary, Trial, mean_interval
from workers.names import (
    ACCURACY_PREFIX,
    CPU_HOURS,
    FINAL_TRAIN_LOSS,
    GPU_HOURS,
    MACRO_ACCURACY,
    TOKENS_TRAINED,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    TRAINABLE_PARAMS,
    VAL_LOSS,
)

COSTS = (GPU_HOURS, CPU_HOURS, TOKENS_TRAINED, TRAIN_SECONDS)


def varied_params(keys: Sequence[Mapping[str, str]]) -> list[str]:
    """The non-adapter params that take more than one value among the configurations that have them
    (a trial that failed before logging its params varies nothing)."""
    names = {k for key in keys for k in key if not k.startswith("adapter.")}
    return sorted(k for k in names if len({key[k] for key in keys if k in key}) > 1)


def group(trials: Sequence[Trial]) -> list[Configuration]:
    """Configurations in first-seen order, labelled by the adapter's short name plus whatever else
    the sweep varied between configurations (`lora-r8-qv lr=0.001`)."""
    by_key: dict[tuple, list[Trial]] = defaultdict(list)
    for trial in trials:
        by_key[trial.config_key()].append(trial)
    keys = list(by_key)
    varied = varied_params([dict(key) for key in keys])
    configs = []
    for key in keys:
        values = dict(key)
        members = by_key[key]
        extra = " ".join(f"{k.rsplit('.', 1)[-1]}={values[k]}" for k in varied if k in values)
        configs.append(Configuration(" ".join(filter(None, [members[0].adapter, extra])), members))
    return configs


def metric_names(trials: Sequence[Trial]) -> list[str]:
    """The accuracy metrics the trials report, macro first."""
    names = sorted({k for t in trials for k in t.metrics if k.startswith(ACCURACY_PREFIX) and k != MACRO_ACCURACY})
    return [MACRO_ACCURACY, *names] if any(MACRO_ACCURACY in t.metrics for t in trials) else names


def rank(configs: Sequence[Configuration], metric: str, mode: str) -> list[Configuration]:
    """Configurations with a value of `metric`, best first."""
    scored = [c for c in configs if c.stats.get(metric) and not math.isnan(c.stats[metric].mean)]
    return sorted(scored, key=lambda c: c.stats[metric].mean, reverse=mode == "max")


class TrialSource(Protocol):
    """Where a sweep's trials are read from."""

    def trials(self) -> list[Trial]:
        """The sweep's trials, oldest first."""

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of one metric of one trial."""

    def predictions(self, run_id: str, folder: Path) -> Path:
        """Fetch a trial's predictions into `folder`; returns the folder holding `<task>.jsonl`."""


def _question_scores(
    source: TrialSource, configs: Sequence[Configuration], tasks: Sequence[str]
) -> list[dict[str, np.ndarray]]:
    """Per configuration and task: a seeds x questions array of correctness, rows in the order of the
    seeds every configuration finished, columns the questions every one of those trials answered."""
    answers: list[dict[str, dict[str, dict[int, bool]]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for c_index, config in enumerate(configs):
            runs = {}
            for trial in (t for t in config.trials if t.succeeded):
                folder = Path(tmp) / f"{c_index}-{trial.run_id}"
                folder.mkdir()
                local = source.predictions(trial.run_id, folder)
                runs[trial.params.get("seed", "?")] = {
                    t: {row["id"]: bool(row["correct"])
                        for row in map(json.loads, (local / f"{t}.jsonl").read_text().splitlines())}
                    for t in tasks
                }
            answers.append(runs)
    seeds = sorted(set.intersection(*(set(runs) for runs in answers)))
    if not seeds:
        raise ValueError("the configurations share no training seed")
    scores = []
    for runs in answers:
        per_task = {}
        for t in tasks:
            shared = sorted(set.intersection(*(set(r[s][t]) for r in answers for s in seeds)))
            per_task[t] = np.array([[runs[s][t][q] for q in shared] for s in seeds], dtype=float)
        scores.append(per_task)
    return scores


def _task_of(metric: str) -> str:
    return metric.split("/", 1)[1]


def collect(source: TrialSource, *, metric: str = MACRO_ACCURACY, mode: str = "max",
            resamples: int = 10_000) -> Summary:
    """Read the sweep's trials from `source` and compute the configurations, ranking and bootstrap."""
    trials = source.trials()
    configs = group(trials)
    names = [*metric_names(trials), VAL_LOSS, FINAL_TRAIN_LOSS]
    for config in configs:
        done = [t for t in config.trials if t.succeeded]
        config.stats = {m: mean_interval([t.metrics[m] for t in done if m in t.metrics]) for m in names}
    costs = {c: sum(t.metrics.get(c, 0.0) for t in trials) for c in COSTS}
    curves = {
        t.name + ("" if len(trials) == len({x.name for x in trials}) else f" ({t.run_id[:6]})"): {
            key: source.history(t.run_id, key)
            for key in (TRAIN_LOSS, VAL_LOSS)
        }
        for t in trials
    }
    summary = Summary(metric, mode, configs, trials, costs, curves, ranked=rank(configs, metric, mode))
    if len(summary.ranked) < 2:
        summary.note = "fewer than two finished configurations: nothing to compare"
    elif not metric.startswith(ACCURACY_PREFIX):
        summary.note = f"{metric} is not an accuracy: no per-question comparison"
    else:
        by_validation = rank(summary.ranked, VAL_LOSS, "min")
        if len(by_validation) == len(summary.ranked):
            summary.compared, summary.chosen_on = by_validation[:2], "validation loss"
        else:
            summary.compared, summary.chosen_on = summary.ranked[:2], "the test sets"
        best = summary.compared[0]
        tasks = ([_task_of(m) for m in metric_names(best.trials) if m != MACRO_ACCURACY]
                 if metric == MACRO_ACCURACY else [_task_of(metric)])
        try:
            a, b = _question_scores(source, summary.compared, tasks)
        except ValueError as exc:
            summary.note = f"no paired comparison: {exc}"
        else:
            summary.bootstrap = two_level_bootstrap(a, b, resamples=resamples)
    return summary


# --- output ---------------------------------------------------------------------------------------------------

def _fmt(interval: Interval | None, percent: bool) -> str:
    if interval is None or interval.n == 0 or math.isnan(interval.mean):
        return "-"
    scale, unit = (100, "%") if percent else (1, "")
    text = f"{interval.mean * scale:.2f}{unit}"
    if interval.n > 1:
        text += f" [{interval.low * scale:.2f}, {interval.high * scale:.2f}]"
    return text


def configuration_rows(summary: Summary) -> list[dict[str, object]]:
    """The summary table, one row per configuration, best first, unfinished ones last."""
    order = summary.ranked + [c for c in summary.configurations if c not in summary.ranked]
    metrics = metric_names(summary.trials)
    rows = []
    for config in order:
        row: dict[str, object] = {
            "configuration": config.label, "method": config.method, "placement": config.placement,
            "bottleneck": config.params.get("adapter.bottleneck", ""), "rank": config.params.get("adapter.rank", ""),
            TRAINABLE_PARAMS: config.params.get(TRAINABLE_PARAMS, ""),
            "seeds": " ".join(config.seeds), "finished": sum(t.succeeded for t in config.trials),
            "statuses": " ".join(sorted({t.status for t in config.trials})),
        }
        for m in [*metrics, VAL_LOSS]:
            interval = config.stats.get(m)
            row[f"{m} mean"] = interval.mean if interval and interval.n else ""
            row[f"{m} ci95 low"] = interval.low if interval and interval.n > 1 else ""
            row[f"{m} ci95 high"] = interval.high if interval and interval.n > 1 else ""
        for cost in COSTS:
            row[cost] = sum(t.metrics.get(cost, 0.0) for t in config.trials)
        rows.append(row)
    return rows


def unfinished(summary: Summary) -> list[Trial]:
    """The trials that did not finish (failed, out of memory, stopped), listed apart from the ranking."""
    return [t for t in summary.trials if not t.succeeded]


def verdict(summary: Summary) -> str:
    """Two sentences: the winner and how sure the sweep is of it, and how the two were chosen."""
    if summary.bootstrap is None:
        return summary.note
    best, runner_up = summary.compared
    b = summary.bootstrap
    sure = "beats" if b.significant else "is not distinguishable from"
    t_test = (f"seed-paired t-test one-sided p = {b.t_p_value:.4f}" if not math.isnan(b.t_p_value)
              else "no seed-paired t-test (one seed: training-seed variance is not measured)")
    chosen = ("Both were chosen on the validation split (lowest validation loss) and compared on the test sets."
              if summary.chosen_on == "validation loss" else
              "Both were chosen on the test sets they are compared on (no validation loss for every "
              "configuration), so the gap is optimistic.")
    return (f"{best.label} {sure} the runner-up {runner_up.label} on the same {b.seeds} seed(s) x {b.questions} "
            f"questions: {b.delta * 100:+.2f} points of macro accuracy, 95% interval [{b.low * 100:+.2f}, "
            f"{b.high * 100:+.2f}] (two-level bootstrap over seeds and questions, {b.resamples} resamples, "
            f"one-sided p = {b.p_value:.4f}); {t_test}. {chosen}")


def table(summary: Summary) -> Table:
    """The summary table for the terminal."""
    metrics = metric_names(summary.trials)
    out = Table(title=f"configurations by {summary.metric} ({summary.mode}); mean [95% interval] over seeds")
    for column in ("configuration", "params", "seeds", *metrics, VAL_LOSS, "status"):
        out.add_column(column, justify="left" if column in ("configuration", "status") else "right")
    for config in summary.ranked + [c for c in summary.configurations if c not in summary.ranked]:
        params = config.trainable_params
        out.add_row(
            config.label, f"{params:,.0f}" if params is not None else "-", str(len(config.trials)),
            *(_fmt(config.stats.get(m), True) for m in metrics), _fmt(config.stats.get(VAL_LOSS), False),
            " ".join(sorted({t.status for t in config.trials})),
        )
    return out


def write_csv(rows: Sequence[Mapping[str, object]], path: Path) -> None:
    """Rows as CSV, with the union of their keys as columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _json_safe(values: Mapping[str, object]) -> dict[str, object]:
    """NaN (a t-test of one seed) as null: JSON has no NaN."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}


def write_report(summary: Summary, out_dir: Path) -> Path:
    """configurations.csv, comparison.json, the plots and report.md in `out_dir`; returns report.md."""
    from orchestrator import report_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = configuration_rows(summary)
    write_csv(rows, out_dir / "configurations.csv")
    comparison = {
        "metric": summary.metric, "mode": summary.mode, "verdict": verdict(summary),
        "best": summary.compared[0].label if summary.compared else None,
        "runner_up": summary.compared[1].label if summary.compared else None,
        "chosen_on": summary.chosen_on or None,
        "comparison": _json_safe(vars(summary.bootstrap)) if summary.bootstrap else None, "costs": summary.costs,
    }
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    plots = report_plots.draw_all(summary, out_dir)
    lines = [f"# Sweep report ({len(summary.trials)} trials, {len(summary.configurations)} configurations)", "",
             verdict(summary), "", f"| configuration | trainable | seeds | {summary.metric} |", "|---|---:|---:|---:|"]
    for config in summary.ranked:
        params = config.trainable_params
        lines.append(f"| {config.label} | {params:,.0f} | {len(config.trials)} | "
                     f"{_fmt(config.stats.get(summary.metric), summary.metric.startswith(ACCURACY_PREFIX))} |"
                     if params is not None else f"| {config.label} | - | {len(config.trials)} | - |")
    failed = unfinished(summary)
    if failed:
        lines += ["", "Trials that did not finish:", "", *(f"- {t.name}: {t.status}" for t in failed)]
    # Plots by name, not embedded: MLflow's artifact viewer renders this file but not relative images.
    lines += ["", "Costs: " + ", ".join(f"{k} {v:,.4g}" for k, v in summary.costs.items()), "",
              "Plots, next to this file:", "", *(f"- `{p.name}`" for p in plots)]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
