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

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "sweeps" / "paper").glob("*.yaml"))
# The shared folder of each hub model the studies use.
CONFIG_FOLDER = {"yahma/llama-7b-hf": "llama-7b", "bigscience/bloomz-7b1": "bloomz-7b1",
                 "EleutherAI/gpt-j-6b": "gpt-j-6b"}
# What each study is: the paper's design, trial by trial (method comparisons: 4 methods x 3 seeds).
TRIALS = {"placement": 9, "bottleneck": 8, "rank": 5, "math": 12, "commonsense": 12}
MATH_SETS = {"multiarith", "gsm8k", "addsub", "aqua", "singleeq", "svamp", "mawps"}
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
    assert names == {"placement-llama7b", "bottleneck-llama7b", "rank-llama7b",
                     *(f"{task}-{model}" for task in ("math", "commonsense")
                       for model in ("llama7b", "bloomz7b1", "gptj6b"))}


@pytest.mark.parametrize("study", STUDIES, ids=[p.stem for p in STUDIES])
def test_study_plans(study: Path, tmp_path: Path, model_configs: Path, monkeypatch, capsys) -> None:
    raw, planned = plan(study, tmp_path, model_configs, monkeypatch, capsys)
    kind = study.stem.split("-")[0]
    assert planned["sweep"] == raw["name"] == study.stem
    assert planned["trials"] == len(planned["points"]) == TRIALS[kind]
    assert len({p["trial"] for p in planned["points"]}) == TRIALS[kind]
    assert all(0 < p["trainable_params"] < p["base_params"] / 20 for p in planned["points"])
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
    expected = 30 * config["num_hidden_layers"] * 2 * config["hidden_size"]
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
