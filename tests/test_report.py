"""The sweep report: intervals over seeds, the Pareto front, best vs runner-up, files, the command.

The store is a real MLflow sqlite store filled through the worker's own `MlflowTracker`, with
per-question predictions drawn at random: every expected number is recomputed here from those inputs.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from orchestrator.mlflow_sweep import MlflowTrials, build_report
from orchestrator.report import (
    collect,
    configuration_rows,
    mean_interval,
    verdict,
)
from orchestrator.report_data import pareto_front
from workers.spec import parse_trial_spec
from workers.tracking import MlflowTracker, TrialStatus

TASKS = {"boolq": 120, "piqa": 80}
# (adapter, trainable params, chance of a correct answer, seeds); the first is the planted winner.
CONFIGS = [
    ({"type": "lora", "placement": ["q", "v"], "rank": 8}, 4096, 0.85, [0, 1, 2]),
    ({"type": "lora", "placement": ["q", "v"], "rank": 32}, 16384, 0.60, [0, 1, 2]),
    ({"type": "series", "placement": ["attn"], "bottleneck": 16}, 2048, 0.55, [0, 1]),
    ({"type": "series", "placement": ["attn"], "bottleneck": 64}, 8192, 0.50, [0]),
    ({"type": "prefix", "virtual_tokens": 8}, 1024, 0.40, [0]),
]


def _spec(adapter: dict, seed: int):
    return parse_trial_spec({
        "model": "org/tiny", "tokenizer": "byte", "adapter": adapter,
        "data": {"train": "train.json", "eval": list(TASKS)}, "train": {"lr": 1e-3}, "seed": seed,
    })


def _log_trial(uri: str, parent: str, folder: Path, adapter: dict, params: int, p: float, seed: int,
               rng: random.Random) -> dict[str, list[bool]]:
    spec = _spec(adapter, seed)
    name = f"{spec.adapter.short_name()}-s{seed}"
    tracker = MlflowTracker(uri, "report-test", name, trial_id=f"{parent}:{name}", parent_run_id=parent)
    tracker.log_params({**spec.model_dump(mode="json"), "trainable_params": params, "base_params": 10**6})
    tracker.set_tags({"adaptune.adapter": spec.adapter.short_name()})
    for step in range(1, 6):
        tracker.log_metrics({"train_loss": 3.0 / step + rng.random() * 0.1}, step=step)
    tracker.log_metrics({"val_loss": 2.0 - p}, step=5)
    answers = {t: [rng.random() < p for _ in range(n)] for t, n in TASKS.items()}
    out = folder / name / "predictions"
    out.mkdir(parents=True)
    for task, correct in answers.items():
        (out / f"{task}.jsonl").write_text("".join(json.dumps({"id": i, "correct": c}) + "\n"
                                                   for i, c in enumerate(correct)))
    accuracy = {f"accuracy/{t}": sum(c) / len(c) for t, c in answers.items()}
    accuracy["accuracy/macro"] = sum(accuracy.values()) / len(accuracy)
    tracker.log_metrics({**accuracy, "trainable_params": params, "cpu_hours": 0.01, "tokens_trained": 1000.0}, step=5)
    tracker.log_artifact(out, "predictions")
    tracker.finish(TrialStatus.SUCCEEDED)
    return answers


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("report-test", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="study", tags={"adaptune.sweep": "study"}).info.run_id
    rng = random.Random(7)
    answers: dict[str, list[dict[str, list[bool]]]] = {}
    for adapter, params, p, seeds in CONFIGS:
        label = _spec(adapter, 0).adapter.short_name()
        answers[label] = [_log_trial(uri, parent, root / "preds", adapter, params, p, s, rng) for s in seeds]
    failed = MlflowTracker(uri, "report-test", "lora-r4-qv-s0", trial_id=f"{parent}:broken", parent_run_id=parent)
    failed.log_params({**_spec({"type": "lora", "placement": ["q", "v"], "rank": 4}, 0).model_dump(mode="json")})
    failed.set_tags({"adaptune.adapter": "lora-r4-qv"})
    failed.finish(TrialStatus.FAILED)
    # A fourth seed of the winner that crashed: it counts in no mean and has no predictions.
    crashed = MlflowTracker(uri, "report-test", "lora-r8-qv-s3", trial_id=f"{parent}:crashed", parent_run_id=parent)
    crashed.log_params({**_spec(CONFIGS[0][0], 3).model_dump(mode="json"), "trainable_params": CONFIGS[0][1]})
    crashed.set_tags({"adaptune.adapter": "lora-r8-qv"})
    crashed.finish(TrialStatus.FAILED)
    return {"uri": uri, "parent": parent, "answers": answers, "root": root}


def test_mean_interval_is_the_student_t_interval() -> None:
    values = [0.61, 0.64, 0.58, 0.66]
    got = mean_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert got.n == 4
    assert got.mean == pytest.approx(np.mean(values))
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))
    single = mean_interval([0.5])
    assert single.mean == 0.5 and math.isnan(single.low) and math.isnan(single.high)


def test_pareto_front_matches_the_definition() -> None:
    rng = random.Random(3)
    points = [(rng.choice([1, 2, 4, 8, 16]), rng.choice([0.1, 0.2, 0.3, 0.4])) for _ in range(30)]
    front = pareto_front(points)
    for i, (cost, score) in enumerate(points):
        beaten = any(c <= cost and s >= score and (c, s) != (cost, score) for c, s in points)
        if beaten:
            assert i not in front
        else:
            assert points[i] in [points[j] for j in front]
    assert len({points[i] for i in front}) == len(front)
    costs = [points[i][0] for i in front]
    scores = [points[i][1] for i in front]
    assert costs == sorted(costs) and scores == sorted(scores)  # more parameters buy more accuracy


def test_configurations_group_seeds_with_their_intervals(store: dict) -> None:
    summary = collect(MlflowTrials(store["uri"], store["parent"]), resamples=2000)
    by_label = {c.label: c for c in summary.configurations}
    assert set(by_label) == {"lora-r8-qv", "lora-r32-qv", "series-b16-attn", "series-b64-attn", "prefix-v8",
                             "lora-r4-qv"}
    for label, runs in store["answers"].items():
        macro = [np.mean([np.mean(run[t]) for t in TASKS]) for run in runs]
        interval = by_label[label].stats["accuracy/macro"]
        assert interval.n == len(runs)
        assert interval.mean == pytest.approx(np.mean(macro))
        if len(runs) > 1:
            low, _ = stats.t.interval(0.95, len(runs) - 1, loc=np.mean(macro), scale=stats.sem(macro))
            assert interval.low == pytest.approx(low)
    assert by_label["lora-r4-qv"].stats["accuracy/macro"].n == 0  # failed: listed, never ranked
    assert len(by_label["lora-r8-qv"].trials) == 4  # three finished seeds and the crashed one
    assert [c.label for c in summary.ranked] == sorted(
        store["answers"], key=lambda lab: -np.mean([np.mean([np.mean(r[t]) for t in TASKS])
                                                    for r in store["answers"][lab]]))
    assert summary.costs["cpu_hours"] == pytest.approx(0.01 * 10)
    assert summary.costs["tokens_trained"] == pytest.approx(1000.0 * 10)


def test_bootstrap_of_best_vs_runner_up_uses_the_shared_questions(store: dict) -> None:
    summary = collect(MlflowTrials(store["uri"], store["parent"]), resamples=2000)
    best, runner_up = summary.ranked[:2]
    assert best.label == "lora-r8-qv"
    a, b = store["answers"][best.label], store["answers"][runner_up.label]
    # The gap over the shared seeds and questions, averaged per task, then over tasks.
    expected = np.mean([np.mean(np.mean([r[t] for r in a], axis=0) - np.mean([r[t] for r in b], axis=0))
                        for t in TASKS])
    assert summary.bootstrap.delta == pytest.approx(expected)
    assert summary.bootstrap.questions == sum(TASKS.values()) and summary.bootstrap.seeds == 3
    assert summary.chosen_on == "validation loss"  # every trial logged val_loss
    assert summary.bootstrap.low <= summary.bootstrap.delta <= summary.bootstrap.high
    assert summary.bootstrap.significant  # 0.85 vs 0.60 on 200 questions x 3 seeds
    assert verdict(summary).startswith(f"lora-r8-qv beats the runner-up {runner_up.label}")


def test_report_files(store: dict, tmp_path: Path) -> None:
    path = build_report(store["uri"], store["parent"], tmp_path / "out")
    out = path.parent
    assert path.name == "report.md" and "beats the runner-up" in path.read_text()
    for png in ("accuracy_vs_params", "placement_heatmap", "accuracy_vs_bottleneck", "accuracy_vs_rank",
                "training_curves"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"- `{png}.png`" in path.read_text()
    with (out / "configurations.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    ranked = collect(MlflowTrials(store["uri"], store["parent"]), resamples=100).ranked
    assert [r["configuration"] for r in rows][:5] == [c.label for c in ranked]
    top = rows[0]
    assert float(top["accuracy/macro mean"]) > float(rows[1]["accuracy/macro mean"])
    assert float(top["accuracy/macro ci95 low"]) < float(top["accuracy/macro mean"]) < float(
        top["accuracy/macro ci95 high"])
    assert top["seeds"] == "0 1 2 3" and top["finished"] == "3" and top["trainable_params"] == "4096"
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["best"] == "lora-r8-qv" and comparison["comparison"]["p_value"] < 0.05
    assert comparison["chosen_on"] == "validation loss" and 0 <= comparison["comparison"]["t_p_value"] < 0.05


def test_report_plots_draw_without_a_warning_and_label_their_axes(store: dict, tmp_path: Path) -> None:
    import warnings

    from orchestrator import report_plots

    summary = collect(MlflowTrials(store["uri"], store["parent"]), resamples=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's tight_layout warning among them
        drawn = report_plots.draw_all(summary, tmp_path)
    assert len(drawn) == 5
    assert report_plots.metric_label("accuracy/macro") == "macro accuracy (%)"
    # Equal parameter counts are spread apart, symmetrically on the log axis; others stay put.
    xs = report_plots.dodged([100.0, 100.0, 100.0, 1000.0])
    assert len(set(xs)) == 4 and xs[1] == 100.0 and xs[3] == 1000.0
    assert math.isclose(math.log10(xs[0]) + math.log10(xs[2]), 4.0)


def test_rows_without_a_second_configuration_say_so(store: dict) -> None:
    summary = collect(MlflowTrials(store["uri"], store["parent"]), metric="accuracy/boolq", resamples=200)
    assert summary.bootstrap is not None and summary.bootstrap.questions == TASKS["boolq"]
    rows = configuration_rows(summary)
    assert rows[-1]["configuration"] == "lora-r4-qv" and rows[-1]["finished"] == 0


def test_report_command(store: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    from orchestrator.cli import main

    storage = tmp_path / "runs"
    (storage / "study").mkdir(parents=True)
    sweep = {"name": "study", "base": {"model": "org/tiny", "tokenizer": "byte",
                                       "data": {"train": "train.json", "eval": list(TASKS)}},
             "space": [{"type": "prefix", "virtual_tokens": 8}],
             "tracking": {"uri": store["uri"], "experiment": "report-test"}, "storage": str(storage)}
    (storage / "study" / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    out = tmp_path / "plots"
    monkeypatch.setattr("sys.argv", ["adaptune", "report", "study", "--storage", str(storage), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    text = capsys.readouterr().out
    assert exit_info.value.code in (0, None)
    assert "lora-r8-qv" in text and "beats the runner-up" in text
    assert (out / "accuracy_vs_params.png").is_file()
    monkeypatch.setattr("sys.argv", ["adaptune", "report", "nosuch", "--storage", str(storage)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "nosuch" in capsys.readouterr().err


def test_a_sweep_without_finished_trials_still_gets_its_report(store: dict, tmp_path: Path) -> None:
    """finish_parent writes the report of every sweep, the ones where everything failed included."""
    from mlflow import MlflowClient

    client = MlflowClient(store["uri"])
    exp = client.get_experiment_by_name("report-test").experiment_id
    parent = client.create_run(exp, run_name="doomed").info.run_id
    tracker = MlflowTracker(store["uri"], "report-test", "prefix-v8-s0", trial_id=f"{parent}:t", parent_run_id=parent)
    tracker.log_params(_spec({"type": "prefix", "virtual_tokens": 8}, 0).model_dump(mode="json"))
    tracker.finish(TrialStatus.FAILED)
    path = build_report(store["uri"], parent, tmp_path / "out")
    assert "nothing to compare" in path.read_text()
    assert not list(path.parent.glob("*.png"))
    with (path.parent / "configurations.csv").open() as fh:
        assert [r["statuses"] for r in csv.DictReader(fh)] == ["FAILED"]
