"""Sweep files beyond tests/test_driver.py: branch overrides, every distribution, Optuna's suggestions,
and distributions whose bounds cannot be sampled (an error naming the field, before Ray starts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.sweep import load_sweep, optuna_space, point_from_optuna
from workers.errors import ConfigError

# The example space, on a hub id: a trial spec does no I/O, so nothing is downloaded.
EXAMPLE = {
    "name": "placement-llama7b",
    "base": {"model": "huggyllama/llama-7b", "data": {"train": "math_10k", "eval": ["gsm8k", "svamp", "aqua"]}},
    "train": {"epochs": 3, "lr": 3e-4},
    "space": [
        {"type": "series", "placement": [["attn"], ["mlp"], ["attn", "mlp"]], "bottleneck": [64, 128, 256, 512]},
        {"type": "parallel", "placement": [["attn"], ["mlp"], ["attn", "mlp"]], "bottleneck": [256]},
        {"type": "lora", "placement": [["q", "k", "v"], ["up", "down"], ["q", "k", "v", "up", "down"]],
         "rank": [4, 8, 16, 32, 64]},
        {"type": "prefix", "virtual_tokens": [10, 30]},
    ],
}


def write(tmp_path: Path, sweep: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_a_branchs_train_overrides_the_sweeps(tmp_path: Path) -> None:
    raw = dict(EXAMPLE, train={"lr": [1e-4, 3e-4]}, seed=[1, 2, 3],
               space=[{"type": "lora", "placement": [["q", "v"]], "rank": [8, 16]},
                      {"type": "prefix", "virtual_tokens": 10, "train": {"lr": 3e-2}}])
    _, points = load_sweep(write(tmp_path, raw))
    lora = [p for p in points if p.branch == 0]
    assert len(lora) == 2 * 2 * 3  # rank x lr x seed
    assert {(p.spec.adapter.rank, p.spec.train.lr, p.spec.seed) for p in lora} == {
        (r, lr, s) for r in (8, 16) for lr in (1e-4, 3e-4) for s in (1, 2, 3)}
    prefix = [p for p in points if p.branch == 1]
    assert [p.spec.train.lr for p in prefix] == [3e-2] * 3  # a branch's train overrides the sweep's
    assert len({p.name for p in points}) == len(points)
    assert {p.name for p in prefix} == {"prefix-v10-s1", "prefix-v10-s2", "prefix-v10-s3"}


def test_random_search_samples_distributions_within_their_bounds(tmp_path: Path) -> None:
    raw = dict(EXAMPLE, search={"algorithm": "random", "num_samples": 6, "seed": 3},
               train={"lr": {"loguniform": [1e-5, 1e-2]}, "warmup_steps": {"randint": [0, 10]}},
               space=[{"type": "lora", "placement": [["q", "v"]], "rank": {"choice": [4, 8]},
                       "dropout": {"uniform": [0.0, 0.2]}}])
    path = write(tmp_path, raw)
    _, points = load_sweep(path)
    assert len(points) == 6
    for p in points:
        assert 1e-5 <= p.spec.train.lr <= 1e-2
        assert p.spec.train.warmup_steps in range(10)
        assert p.spec.adapter.rank in (4, 8)
        assert 0.0 <= p.spec.adapter.dropout <= 0.2
    assert len({p.spec.train.lr for p in points}) == 6
    _, again = load_sweep(path)
    assert [p.spec for p in again] == [p.spec for p in points]  # the search seed fixes the draw


def test_optuna_suggestions_become_valid_trials(tmp_path: Path) -> None:
    import optuna

    raw = dict(EXAMPLE, search={"algorithm": "optuna", "num_samples": 10, "metric": "accuracy/macro"},
               train={"lr": {"loguniform": [1e-5, 1e-2]}})
    sweep, points = load_sweep(write(tmp_path, raw))
    assert points == []  # Optuna draws while the sweep runs
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    define = optuna_space(sweep)
    seen_branches = set()
    for _ in range(12):
        trial = study.ask()
        define(trial)
        point = point_from_optuna(sweep, dict(trial.params))
        seen_branches.add(point.branch)
        assert point.spec.adapter.type == EXAMPLE["space"][point.branch]["type"]
        assert 1e-5 <= point.spec.train.lr <= 1e-2
        if point.spec.adapter.type == "lora":
            assert point.spec.adapter.rank in (4, 8, 16, 32, 64)
    assert len(seen_branches) > 1


def test_a_grid_refuses_distributions(tmp_path: Path) -> None:
    raw = dict(EXAMPLE, space=[{"type": "lora", "placement": [["q", "v"]], "rank": {"loguniform": [4, 64]}}])
    with pytest.raises(ConfigError) as info:
        load_sweep(write(tmp_path, raw))
    assert info.value.field == "space[0].rank" and "random or optuna" in info.value.message


BAD_BOUNDS = [
    {"loguniform": [0, 1e-3]},     # log 0
    {"loguniform": [1e-2, 1e-4]},  # low above high
    {"uniform": [1e-3]},           # one bound
    {"randint": [5, 5]},           # an empty range (the upper bound is excluded)
    {"choice": []},
]


@pytest.mark.parametrize("dist", BAD_BOUNDS, ids=[str(d) for d in BAD_BOUNDS])
def test_unsampleable_distributions_name_their_field(dist: dict, tmp_path: Path) -> None:
    raw = dict(EXAMPLE, search={"algorithm": "random", "num_samples": 2}, train={"lr": dist})
    with pytest.raises(ConfigError) as info:
        load_sweep(write(tmp_path, raw))
    assert info.value.field == "train.lr"


def test_the_driver_validates_and_schedules_without_importing_torch() -> None:
    """Checking a sweep file and scheduling it needs no torch: `adaptune run`, `status` and `report`
    start in about two seconds instead of six; only a trial's own process imports torch."""
    modules = ["orchestrator.cli", "orchestrator.tune_driver", "orchestrator.mlflow_sweep", "orchestrator.report",
               "orchestrator.sweep", "orchestrator.cluster", "workers.spec", "workers.adapters.config"]
    code = (f"import sys\nfor m in {modules!r}:\n    __import__(m)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'datasets') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
