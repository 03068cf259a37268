"""Doors: names cannot leave the storage folder, a model folder's code runs only when asked twice,
and the secrets of a sweep file are in nothing adaptune copies, logs to MLflow or prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from clirunner import run_cli
from test_preflight import TINY, base_sweep, base_trial

SECRETS = ("sk-preflightSECRETkey0123456789", "hf_preflightSECRETtoken0123", "uriSECRETpass")


@pytest.fixture
def evil_model(tmp_path: Path) -> tuple[Path, Path]:
    """A LLaMA folder with remote code that leaves a marker when it runs."""
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "remote-code-ran"
    config = {**TINY, "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n"
                                    "from transformers import LlamaForCausalLM as EvilModel\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text(json.dumps(
        [{"instruction": f"q{i}", "output": "true", "answer": "true"} for i in range(24)]))
    (tmp_path / "data" / "test.json").write_text((tmp_path / "data" / "train.json").read_text())
    return folder, marker


def test_plan_never_runs_a_model_folders_code(evil_model, tmp_path, monkeypatch, capsys) -> None:
    folder, marker = evil_model
    spec = {**base_trial(tmp_path), "model": str(folder), "trust_remote_code": True}
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = run_cli(["plan", str(path)], monkeypatch, capsys)
    assert code == 0, err
    assert "trust_remote_code: ignored" in err and "trainable parameters" in out
    assert not marker.exists()


def test_remote_code_needs_the_flag_as_well_as_the_file(evil_model, tmp_path, monkeypatch, capsys) -> None:
    folder, marker = evil_model
    raw = base_sweep(tmp_path)
    raw["base"].update(model=str(folder), trust_remote_code=True)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setitem(sys.modules, "ray", None)
    code, _, err = run_cli(["run", str(path), "--dry-run"], monkeypatch, capsys)
    assert code == 2 and "base.trust_remote_code" in err and "--trust-remote-code" in err
    code, _, err = run_cli(["run", str(path), "--dry-run", "--trust-remote-code"], monkeypatch, capsys)
    assert code == 0 and "will run the Python files" in err, err
    assert not marker.exists()  # a dry run loads nothing


def test_a_sweeps_secrets_are_in_nothing_adaptune_copies_or_logs(tmp_path, monkeypatch, capsys) -> None:
    """The saved copy, the parent run's artifacts and parameters, the store, the closing lines."""
    from orchestrator.cli import _finish
    from orchestrator.mlflow_sweep import start_parent
    from orchestrator.sweep import load_sweep, redacted_text

    api_key, token, password = SECRETS
    (tmp_path / "data").mkdir()
    raw = base_sweep(tmp_path)
    raw["base"]["model_overrides"] = {"api_key": api_key, "hub_token": token}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw["tracking"] = {"uri": uri}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    sweep, points = load_sweep(path)
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "copy.yaml"
    copy.write_text(redacted_text(path))
    start_parent(uri, sweep, path, points, resume=False)
    shown = sweep.model_copy(update={"tracking": sweep.tracking.model_copy(
        update={"uri": f"http://user:{password}@mlflow.example:5000"})})
    with pytest.raises(BaseException):  # noqa: B017 - typer.Exit(1): a failed trial
        _finish(shown, [], [("lora-r4-qv", f"ConfigError: http://user:{password}@mlflow.example:5000 refused")])
    printed = capsys.readouterr()
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != path]
    assert copy in written and any("expanded_space.json" in str(p) for p in written)
    for secret in SECRETS:
        assert secret not in printed.out + printed.err
        for file in written:
            assert secret.encode() not in file.read_bytes(), file
    assert "***" in copy.read_text()


def test_resume_asks_for_the_original_file_when_the_copy_lost_its_secrets(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "runs" / "pf").mkdir(parents=True)
    (tmp_path / "runs" / "pf" / "sweep.yaml").write_text("name: pf\ntracking: {uri: 'http://u:***@h:5000'}\n")
    (tmp_path / "other.yaml").write_text("name: other\n")
    code, _, err = run_cli(["resume", "pf", "--storage", str(tmp_path / "runs")], monkeypatch, capsys)
    assert code == 2 and "--sweep FILE" in err
    code, _, err = run_cli(["resume", "pf", "--storage", str(tmp_path / "runs"), "--sweep",
                            str(tmp_path / "other.yaml")], monkeypatch, capsys)
    assert code == 2 and "is not the file sweep 'pf' was started with" in err


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "..", ".hidden", "a/b", "x" * 101])
def test_names_are_one_safe_path_component(name: str) -> None:
    from pydantic import ValidationError

    from workers.spec import TrialSpec

    with pytest.raises(ValidationError):
        TrialSpec.model_validate({"name": name, "model": "m", "adapter": {"type": "prefix", "virtual_tokens": 2}})


class _RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('code-ran').write_text('x')",))


def test_checkpoints_load_weights_only_and_keep_rng_states(tmp_path: Path, monkeypatch) -> None:
    import random

    import numpy as np
    import torch

    from workers.safe_checkpoint import SafeCheckpointEngine, rng_state, set_rng_state

    monkeypatch.chdir(tmp_path)
    engine = SafeCheckpointEngine()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save({"rng": [rng_state()], "global_step": 3}, tmp_path / "ok.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(engine.load(str(tmp_path / "ok.pt"))["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    torch.save({"rng": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        engine.load(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "code-ran").exists()


def test_the_spec_kept_beside_checkpoints_has_no_secret(tmp_path: Path) -> None:
    from workers.job import check_resumable
    from workers.spec import parse_trial_spec

    spec = parse_trial_spec({"model": "m", "model_overrides": {"api_key": SECRETS[0], "hub": SECRETS[1]},
                             "adapter": {"type": "prefix", "virtual_tokens": 2}})
    check_resumable(spec, tmp_path)
    check_resumable(spec, tmp_path)  # the same spec resumes
    assert not any(s in (tmp_path / "spec.json").read_text() for s in SECRETS)


def test_tune_gets_no_credentials_to_copy_into_runtime_envs(monkeypatch) -> None:
    """Tune copies AWS_* from the driver into every trial's runtime env, which Ray logs in clear; a cluster
    started here inherited them already, so they leave the driver's environment while Tune runs."""
    import os

    from orchestrator.tune_driver import _credentials_kept_home

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    with _credentials_kept_home(started_here=False):
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"  # a cluster joined needs them passed on
    with _credentials_kept_home(started_here=True):
        assert "AWS_SECRET_ACCESS_KEY" not in os.environ
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
