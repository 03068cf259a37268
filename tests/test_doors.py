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
    from orchestrator.tune_driver import SweepEnd

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
    failure = ("lora-r4-qv", f"ConfigError: http://user:{password}@mlflow.example:5000 refused")
    with pytest.raises(BaseException):  # noqa: B017 - typer.Exit(130): an interrupted sweep with a failed trial
        _finish(shown, SweepEnd([], [failure], unfinished=3))
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


def test_an_fp16_optimizers_dynamic_loss_scaler_loads_as_it_was_saved(tmp_path: Path) -> None:
    """A ZeRO optimizer's state holds its loss scaler itself; in fp16 (a GPU's) the dynamic one, with its state."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from workers.safe_checkpoint import SafeCheckpointEngine

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=1,
                               consecutive_hysteresis=False)
    scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter = 2.0**15, 7, 6  # halved by an overflow at 6
    torch.save({"loss_scaler": scaler, "step": 7}, tmp_path / "optim_states.pt")
    loaded = SafeCheckpointEngine().load(str(tmp_path / "optim_states.pt"))["loss_scaler"]
    assert type(loaded) is DynamicLossScaler and vars(loaded) == vars(scaler) and loaded.cur_scale == 2.0**15


def test_the_spec_kept_beside_checkpoints_has_no_secret(tmp_path: Path) -> None:
    from workers.job import check_resumable
    from workers.spec import parse_trial_spec

    spec = parse_trial_spec({"model": "m", "model_overrides": {"api_key": SECRETS[0], "hub": SECRETS[1]},
                             "adapter": {"type": "prefix", "virtual_tokens": 2}})
    check_resumable(spec, tmp_path)
    check_resumable(spec, tmp_path)  # the same spec resumes
    assert not any(s in (tmp_path / "spec.json").read_text() for s in SECRETS)


def test_a_cluster_started_here_inherits_an_allow_list_and_the_driver_no_secret_while_tune_runs() -> None:
    from orchestrator.environment import allowed, cluster_environment, environment, without_secrets

    env = {"PATH": "/bin", "HF_HOME": "/cache", "ADAPTUNE_DATA": "/d", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
           "HF_TOKEN": "hf_x", "AWS_SECRET_ACCESS_KEY": "s", "MLFLOW_TRACKING_PASSWORD": "p",
           "OPENAI_API_KEY": "sk-x", "GITHUB_TOKEN": "g", "SOMETHING_ELSE": "x", "ADAPTUNE_API_KEY": "k"}
    assert allowed(env) == {"PATH": "/bin", "HF_HOME": "/cache", "ADAPTUNE_DATA": "/d",
                            "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    assert cluster_environment(env) == {**allowed(env), "HF_TOKEN": "hf_x", "AWS_SECRET_ACCESS_KEY": "s",
                                        "MLFLOW_TRACKING_PASSWORD": "p"}
    assert without_secrets(env) == {**allowed(env), "SOMETHING_ELSE": "x"}
    import os

    before = dict(os.environ)
    with environment({"PATH": "/bin"}):
        assert dict(os.environ) == {"PATH": "/bin"}
    assert dict(os.environ) == before


def test_mlflow_clients_never_print_the_uri(monkeypatch) -> None:
    """MLflow prints "View run at: URL" with the URI's password unless told not to."""
    import os

    from workers.tracking import mlflow_client

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    mlflow_client("http://user:pass@127.0.0.1:1")
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"


def test_tune_prints_no_block_of_its_own_while_it_runs(monkeypatch) -> None:
    import logging
    import os

    from orchestrator.tune_driver import TUNE_ERROR_LOGGERS, _tune_settings

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")
    with _tune_settings():
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
        assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"
        assert all(logging.getLogger(n).getEffectiveLevel() == logging.CRITICAL for n in TUNE_ERROR_LOGGERS)
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "0"
    assert all(logging.getLogger(n).level == logging.NOTSET for n in TUNE_ERROR_LOGGERS)


def test_tune_writes_its_result_files_and_no_tensorboard_events() -> None:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
    from ray.tune.utils.callback import _create_default_callbacks

    from orchestrator.tune_driver import _tune_settings, tune_loggers

    with _tune_settings():  # what Tune's fit makes of the driver's callbacks
        kinds = [type(c) for c in _create_default_callbacks(tune_loggers())]
    assert CSVLoggerCallback in kinds and JsonLoggerCallback in kinds and TBXLoggerCallback not in kinds


ENV_SECRETS = {"AWS_SECRET_ACCESS_KEY": "awsSECRETaccess0123456789", "HF_TOKEN": "hf_envSECRETtoken0123456789",
               "MLFLOW_TRACKING_PASSWORD": "mlflowSECRETpassword0123"}


@pytest.mark.slow
def test_no_secret_of_the_file_the_uri_or_the_environment_is_in_anything_a_run_writes(tmp_path: Path) -> None:
    """A real `adaptune run` (its own local Ray) on an MLflow server at a URI with a password, with secrets in
    the sweep file and the environment: none of them is in any file under the run's folders, the store, the
    server's artifacts, the Ray session of the run, or in what the run printed."""
    import os
    import subprocess

    from services import mlflow_server
    from test_driver import REPO, tiny_sweep

    file_secret, uri_secret = "sk-fileSECRETkey0123456789", "uriSECRETpassword0123"
    secrets = [file_secret, uri_secret, *ENV_SECRETS.values()]
    env = {**os.environ, **ENV_SECRETS, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    with mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts", timeout_s=300) as url:
        path = tiny_sweep(tmp_path, "secrets", [{"type": "lora", "placement": ["q", "v"], "rank": 4}])
        raw = yaml.safe_load(path.read_text())
        raw["base"]["model_overrides"] = {"api_key": file_secret}
        raw["tracking"]["uri"] = url.replace("http://", f"http://adaptune:{uri_secret}@")
        path.write_text(yaml.safe_dump(raw))
        driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(path)], cwd=tmp_path,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = driver.communicate(timeout=900)
    assert driver.returncode == 0, err[-3000:]
    assert "done: 1 trials" in out and "***" in out
    sessions = list(Path("/tmp/ray").glob(f"session_*_{driver.pid}"))  # the Ray this run started: its pid
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != path]
    written += [p for s in sessions for p in s.rglob("*") if p.is_file() and not p.is_symlink()]
    assert sessions and any("runtime_env_agent" in p.name for p in written)
    for secret in secrets:
        assert secret not in out + err, secret
        hits = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert not hits, (secret, hits)


def test_a_ranks_rng_state_holds_its_own_gpus_alone(monkeypatch) -> None:
    """Every visible GPU's state was kept, and restored by index: a rank resumed where it sees fewer GPUs (its
    trial's workers placed on other nodes) failed with IndexError."""
    import torch

    from workers.safe_checkpoint import rng_state, set_rng_state

    generators = {3: torch.tensor([3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: generators[device].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: generators.__setitem__(device, state))
    state = rng_state()
    assert torch.equal(state["cuda"], torch.tensor([3], dtype=torch.uint8))
    generators[3] = torch.tensor([9], dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # resumed on a node where it is GPU 0 of one
    generators[0] = torch.tensor([0], dtype=torch.uint8)
    set_rng_state(state)
    assert torch.equal(generators[0], torch.tensor([3], dtype=torch.uint8))
