"""Sweep files: expansion (grid, random, Optuna), names, and every bad input caught before Ray starts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.sweep import load_sweep, optuna_space, point_from_optuna
from workers.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "sweeps" / "models" / "tiny-llama")

# The issue's example: series 3 x 4, parallel 3 x 1, LoRA 3 x 5, prefix 2.
EXAMPLE = {
    "name": "placement-llama7b",
    "base": {"model": "huggyllama/llama-7b", "data": {"train": "math_10k", "eval": ["gsm8k", "svamp", "aqua"]}},
    "train": {"epochs": 3, "lr": 3e-4, "zero_stage": 2},
    "space": [
        {"type": "series", "placement": [["attn"], ["mlp"], ["attn", "mlp"]], "bottleneck": [64, 128, 256, 512]},
        {"type": "parallel", "placement": [["attn"], ["mlp"], ["attn", "mlp"]], "bottleneck": [256]},
        {"type": "lora", "placement": [["q", "k", "v"], ["up", "down"], ["q", "k", "v", "up", "down"]],
         "rank": [4, 8, 16, 32, 64]},
        {"type": "prefix", "virtual_tokens": [10, 30]},
    ],
    "search": {"algorithm": "grid"},
    "scheduler": {"type": "fifo"},
    "resources": {"gpus_per_trial": 1, "workers_per_trial": 1, "cpus_per_worker": 4},
    "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "placement-llama7b"},
}


def write(tmp_path: Path, sweep: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sweep))
    return path


def tiny_sweep(tmp_path: Path, **changes) -> dict:
    sweep = {
        "name": "tiny", "base": {"model": TINY, "random_init": True, "tokenizer": "byte",
                                 "data": {"train": "boolq", "eval": ["boolq"]}},
        "train": {"max_steps": 2}, "space": [{"type": "lora", "placement": [["q", "v"]], "rank": [4, 8]}],
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "storage": str(tmp_path / "runs"),
    }
    sweep.update(changes)
    return sweep


def test_the_issues_example_expands_to_32_trials(tmp_path: Path) -> None:
    _, points = load_sweep(write(tmp_path, EXAMPLE))
    assert Counter(p.branch for p in points) == {0: 12, 1: 3, 2: 15, 3: 2}
    assert len({p.name for p in points}) == 32
    lora = [p for p in points if p.branch == 2]
    assert sorted({p.spec.adapter.rank for p in lora}) == [4, 8, 16, 32, 64]
    assert {tuple(p.spec.adapter.placement) for p in lora} == {("q", "k", "v"), ("up", "down"),
                                                               ("q", "k", "v", "up", "down")}
    # The sweep's train section reaches every trial; the base's data too.
    assert {(p.spec.train.lr, p.spec.train.zero_stage, p.spec.train.epochs) for p in points} == {(3e-4, 2, 3.0)}
    assert {tuple(p.spec.data.eval) for p in points} == {("gsm8k", "svamp", "aqua")}
    assert "lora-r32-qkvud" in {p.name for p in points}


def test_train_fields_and_seeds_are_axes_across_branches(tmp_path: Path) -> None:
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


BAD_SPACE = [
    ({"type": "adapterx", "rank": [8]}, "space[0]", "unknown adapter type"),
    ({"type": "series", "placement": [["attn", "foo"]], "bottleneck": 64}, "space[0].placement", "foo"),
    ({"type": "series", "placement": [["attn"]], "bottleneck": 64, "rank": [8, 16]}, "space[0].rank", "unknown field"),
    ({"type": "series", "placement": [["attn"]], "bottleneck": []}, "space[0].bottleneck", "empty axis"),
    ({"type": "lora", "placement": [["q", "v"]], "rank": ["eight", 16]}, "space[0].rank", "integer"),
    ({"type": "lora", "placement": [["q", "v"]], "rank": {"loguniform": [4, 64]}}, "space[0].rank", "random or optuna"),
]


@pytest.mark.parametrize(("branch", "field", "needle"), BAD_SPACE, ids=[b[1] + "-" + b[2] for b in BAD_SPACE])
def test_bad_space_names_branch_and_field(branch: dict, field: str, needle: str, tmp_path: Path) -> None:
    path = write(tmp_path, tiny_sweep(tmp_path, space=[branch]))
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert info.value.file == str(path)
    assert info.value.field.startswith(field)
    assert needle in info.value.message


def _cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr("sys.argv", ["adaptune", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code or 0, capsys.readouterr().err


def _bad_inputs(tmp_path: Path) -> list[tuple[str, dict, str, str]]:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    taken = tmp_path / "taken"
    (taken / "tiny").mkdir(parents=True)
    return [
        ("unknown method", {"space": [{"type": "adapterx"}]}, "space[0]", "unknown adapter type"),
        ("unknown slot", {"space": [{"type": "lora", "placement": [["qq"]]}]}, "space[0].placement", "qq"),
        ("field a method does not take", {"space": [{"type": "prefix", "virtual_tokens": 4, "rank": 8}]},
         "space[0].rank", "unknown field"),
        ("empty axis", {"space": [{"type": "lora", "placement": [["q"]], "rank": []}]}, "space[0].rank", "empty axis"),
        ("axis of the wrong type", {"space": [{"type": "lora", "placement": [["q"]], "rank": [1.5, 8]}]},
         "space[0].rank", "integer"),
        ("more GPUs than the machine", {"resources": {"gpus_per_trial": 64}}, "resources.gpus_per_trial", "64"),
        ("unknown search algorithm", {"search": {"algorithm": "bayes"}}, "search.algorithm", "bayes"),
        ("unknown scheduler metric", {"scheduler": {"type": "asha", "metric": "accuracy"}}, "scheduler.metric",
         "accuracy"),
        ("storage not writable", {"storage": str(blocked / "runs")}, "storage", str(blocked)),
        ("unreachable tracking URI", {"tracking": {"uri": "http://127.0.0.1:9"}}, "tracking.uri", "127.0.0.1:9"),
        ("duplicate sweep name", {"storage": str(taken)}, "name", "adaptune resume tiny"),
    ]


def test_every_bad_input_is_one_line_with_exit_code_2(tmp_path: Path, monkeypatch, capsys) -> None:
    """All of them fail in `_prepare_sweep`, before the driver connects to or starts Ray."""
    import ray

    ray_was_up = ray.is_initialized()
    for label, changes, field, needle in _bad_inputs(tmp_path):
        path = write(tmp_path, tiny_sweep(tmp_path, **changes), f"{label.replace(' ', '-')}.yaml")
        code, err = _cli(["run", str(path)], monkeypatch, capsys)
        assert code == 2, label
        lines = err.strip().splitlines()
        assert len(lines) == 1, (label, err)
        assert lines[0].startswith(f"error: {path}: {field}"), (label, lines[0])
        assert needle in lines[0], (label, lines[0])
    assert ray.is_initialized() == ray_was_up


def test_dry_run_lists_the_trials_and_starts_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    path = write(tmp_path, tiny_sweep(tmp_path))
    monkeypatch.setattr("sys.argv", ["adaptune", "run", str(path), "--dry-run"])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr().out
    assert (info.value.code or 0) == 0
    assert "2 trials" in out and "lora-r4-qv" in out and "lora-r8-qv" in out
    assert not (tmp_path / "runs").exists()


def test_loguniform_bounds_must_be_positive(tmp_path: Path) -> None:
    raw = dict(EXAMPLE, search={"algorithm": "random", "num_samples": 2}, train={"lr": {"loguniform": [0, 1e-3]}})
    with pytest.raises(ConfigError) as info:
        load_sweep(write(tmp_path, raw))
    assert info.value.field == "train.lr"
