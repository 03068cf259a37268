"""The paper's studies in sweeps/paper: each one validated and counted through `adaptune plan`.

The study files name hub models; with no network here, each is planned on the shared config.json
of the same model (meta device, no weights): only `base.model` changes. Their data sets, which the
pre-flight reads, resolve against a data root of small stand-ins.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.sweep import load_sweep

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "sweeps" / "paper").glob("*.yaml"))
# The shared folder of each hub model the studies use.
CONFIG_FOLDER = {"yahma/llama-7b-hf": "llama-7b", "bigscience/bloomz-7b1": "bloomz-7b1",
                 "EleutherAI/gpt-j-6b": "gpt-j-6b"}
# What each study is: the paper's design, trial by trial (method comparisons: 4 methods x 3 seeds).
TRIALS = {"placement": 9, "bottleneck": 8, "rank": 5, "prefix": 4, "math": 12, "commonsense": 12}
# The reference's updated math table (README): AddSub, MultiArith and SingleEq are inside math_10k.
MATH_SETS = {"gsm8k", "aqua", "mawps", "svamp"}
COMMONSENSE_SETS = {"boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"}


def stand_in_data(root: Path) -> Path:
    """A data root with a small stand-in file for every set the studies name (the pre-flight reads them)."""
    from workers.tasks import TASKS, TRAIN_SETS

    def records(prefix: str) -> str:
        return json.dumps([{"instruction": f"{prefix} {i}", "output": "1", "answer": "1"} for i in range(200)])

    for name in TRAIN_SETS.values():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(records("train"))
    for task in TASKS.values():
        (root / "dataset" / task.folder).mkdir(parents=True, exist_ok=True)
        (root / "dataset" / task.folder / "test.json").write_text(records(task.name))
    return root


def plan(study: Path, tmp_path: Path, model_configs: Path, monkeypatch, capsys) -> tuple[dict, dict]:
    monkeypatch.setenv("ADAPTUNE_DATA", str(stand_in_data(tmp_path / "data")))
    raw = yaml.safe_load(study.read_text())
    local = dict(raw, base={**raw["base"], "model": str(model_configs / CONFIG_FOLDER[raw["base"]["model"]])})
    path = tmp_path / study.name
    path.write_text(yaml.safe_dump(local))
    monkeypatch.setattr("sys.argv", ["adaptune", "plan", str(path), "--json"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    assert exit_info.value.code in (0, None), out.err
    return raw, json.loads(out.out)


def test_every_study_of_the_paper_is_shipped() -> None:
    names = {p.stem for p in STUDIES}
    assert names == {"placement-llama7b", "bottleneck-llama7b", "rank-llama7b", "prefix-llama7b",
                     *(f"{task}-{model}" for task in ("math", "commonsense")
                       for model in ("llama7b", "bloomz7b1", "gptj6b"))}


@pytest.mark.parametrize("study", STUDIES, ids=[p.stem for p in STUDIES])
def test_study_plans(study: Path, tmp_path: Path, model_configs: Path, monkeypatch, capsys) -> None:
    raw, planned = plan(study, tmp_path, model_configs, monkeypatch, capsys)
    kind = study.stem.split("-")[0]
    assert planned["sweep"] == raw["name"] == study.stem
    assert planned["trials"] == len(planned["points"]) == TRIALS[kind]
    assert len({p["trial"] for p in planned["points"]}) == TRIALS[kind]
    # The largest point: parallel 512 beside LLaMA-7B's up and down, 7.1% of the base.
    assert all(0 < p["trainable_params"] < p["base_params"] / 10 for p in planned["points"])
    sets = set(raw["base"]["data"]["eval"])
    assert sets == (COMMONSENSE_SETS if kind == "commonsense" else MATH_SETS)
    assert raw["base"]["data"]["train"] == ("commonsense_170k" if kind == "commonsense" else "math_10k")


def _share(planned: dict, prefix: str) -> set[float]:
    return {round(p["trainable_percent"], 2) for p in planned["points"] if p["trial"].startswith(prefix)}


def test_llama7b_comparison_has_the_papers_trainable_shares(tmp_path: Path, model_configs: Path, monkeypatch,
                                                            capsys) -> None:
    """Table 1 of the paper (LLaMA-7B): series 0.99%, parallel 3.54%, LoRA 0.83% of the parameters."""
    _, planned = plan(REPO / "sweeps" / "paper" / "math-llama7b.yaml", tmp_path, model_configs, monkeypatch, capsys)
    assert _share(planned, "series") == {0.99}
    assert _share(planned, "parallel") == {3.54}
    assert _share(planned, "lora") == {0.83}
    # Prefix: n virtual tokens of keys and values in every layer, n · layers · 2 · hidden.
    config = json.loads((model_configs / "llama-7b" / "config.json").read_text())
    prefix = [p for p in planned["points"] if p["trial"].startswith("prefix")]
    expected = 10 * config["num_hidden_layers"] * 2 * config["hidden_size"]  # the reference's command: 10
    assert {p["trainable_params"] for p in prefix} == {expected}


def test_sizes_grow_along_the_studies_axes(tmp_path: Path, model_configs: Path, monkeypatch, capsys) -> None:
    _, ranks = plan(REPO / "sweeps" / "paper" / "rank-llama7b.yaml", tmp_path, model_configs, monkeypatch, capsys)
    counts = [p["trainable_params"] for p in ranks["points"]]
    # LoRA's parameters are linear in the rank: r · (d_in + d_out) per wrapped linear.
    assert [c / counts[0] for c in counts] == [1, 2, 4, 8, 16]
    _, sizes = plan(REPO / "sweeps" / "paper" / "bottleneck-llama7b.yaml", tmp_path, model_configs, monkeypatch,
                    capsys)
    for method in ("series", "parallel"):
        mine = [p["trainable_params"] for p in sizes["points"] if p["trial"].startswith(method)]
        assert all(math.isclose(b / a, 2, rel_tol=1e-3) for a, b in itertools.pairwise(mine))


def _points(study: str) -> dict[str, list]:
    """The expanded trial specs of a study, by method (parallel by form)."""
    _, points = load_sweep(REPO / "sweeps" / "paper" / f"{study}.yaml")
    out: dict[str, list] = {}
    for p in points:
        a = p.spec.adapter
        out.setdefault(a.type + (f"-{a.form}" if a.type == "parallel" else ""), []).append(p.spec)
    return out


@pytest.mark.parametrize("model", ["llama7b", "bloomz7b1", "gptj6b"])
@pytest.mark.parametrize("kind", ["math", "commonsense"])
def test_comparisons_take_the_reference_commands_settings(kind: str, model: str) -> None:
    """math_running_commands: validation 120 and the best checkpoint only for LLaMA's series and for prefix."""
    by = _points(f"{kind}-{model}")
    assert set(by) == {"series", "parallel-linear", "lora", "prefix"}
    held_out = {"series"} if model == "llama7b" else set()
    for method, specs in by.items():
        for spec in specs:
            keeps_best = method in held_out | {"prefix"}
            assert (spec.data.val_set_size, spec.train.load_best) == ((120, True) if keeps_best else (0, False)), method
            assert spec.eval.max_new_tokens is None  # 256 for math, 32 for commonsense (the evaluation scripts)
            assert spec.data.template == "paper"
    prefix = by["prefix"][0]
    assert (prefix.adapter.virtual_tokens, prefix.train.lr, prefix.train.batch_size, prefix.train.epochs) == (
        10, 3e-2, 8, 5)
    assert (prefix.train.eval_every, prefix.train.save_every) == (10, 10)
    assert by["parallel-linear"][0].adapter.placement == ["up", "down"]
    assert by["series"][0].adapter.compute_dtype == "float32"


def test_the_bottleneck_curve_holds_the_compared_configurations() -> None:
    compared = [s.adapter for specs in _points("math-llama7b").values() for s in specs]
    curve = [s.adapter for specs in _points("bottleneck-llama7b").values() for s in specs]
    assert all(a in curve for a in compared if a.type in ("series", "parallel"))
    assert {a.form for a in curve if a.type == "parallel"} == {"linear"}
    placement = _points("placement-llama7b")
    assert [s.adapter.placement for s in placement["parallel-linear"]] == [
        ["q", "k", "v"], ["up", "down"], ["q", "k", "v", "up", "down"]]
    assert [s.adapter.virtual_tokens for s in _points("prefix-llama7b")["prefix"]] == [10, 20, 30, 40]


def test_load_best_needs_a_validation_split_and_whole_parameters() -> None:
    from workers.errors import ConfigError
    from workers.spec import parse_trial_spec

    base = {"model": "m", "adapter": {"type": "lora", "placement": ["q"], "rank": 4}}
    assert parse_trial_spec({**base, "train": {"load_best": True}}).data.val_set_size == 120
    with pytest.raises(ConfigError, match=r"give data\.val_set_size > 0"):
        parse_trial_spec({**base, "train": {"load_best": True}, "data": {"val_set_size": 0}})
    with pytest.raises(ConfigError, match="zero_stage 0, 1 or 2"):
        parse_trial_spec({**base, "train": {"load_best": True, "zero_stage": 3}})
