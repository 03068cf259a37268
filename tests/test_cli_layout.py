"""The command line's layers: the sweep commands never import torch (GPUs are counted through NVML),
each command checks its tracking store once, and the worker commands keep their command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from clirunner import run_cli
from test_preflight import TINY, base_sweep

from orchestrator import gpus
from workers.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# What `run`, `resume`, `status`, `report` and `ui` import, besides what running them imports.
DRIVER_MODULES = ["orchestrator.cli", "orchestrator.cli_shared", "orchestrator.worker_commands",
                  "orchestrator.tune_driver", "orchestrator.mlflow_sweep", "orchestrator.mlflow_views",
                  "orchestrator.report", "orchestrator.report_plots", "orchestrator.comparison",
                  "orchestrator.preflight", "orchestrator.sweep", "orchestrator.cluster", "orchestrator.environment",
                  "orchestrator.heartbeat", "orchestrator.gpus", "orchestrator.model_shape", "workers.store_check",
                  "workers.tracking", "workers.names", "workers.redaction"]


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace (the cwd): a tiny LLaMA config, a training and a test set, a sweep file `sweep.yaml`."""
    (tmp_path / "models" / "llama").mkdir(parents=True)
    (tmp_path / "models" / "llama" / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "data").mkdir()
    records = [{"instruction": f"q{i}", "output": "true", "answer": "true"} for i in range(24)]
    (tmp_path / "data" / "train.json").write_text(json.dumps(records))
    (tmp_path / "data" / "test.json").write_text(json.dumps(records[:8]))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(base_sweep(tmp_path)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ADAPTUNE_DATA", str(tmp_path / "data"))
    return tmp_path


def test_the_sweep_commands_never_import_torch(ws: Path) -> None:
    """Every module the sweep commands use, then `run --dry-run`, `run` on more GPUs than the machine
    has (counted without torch), `status` and `report`: torch stays out of the driver's process."""
    raw = base_sweep(ws)
    raw["resources"] = {"gpus_per_trial": 1, "workers_per_trial": 64}
    (ws / "gpus.yaml").write_text(yaml.safe_dump(raw))
    code = f"""
import sys
from orchestrator.cli import main
for m in {DRIVER_MODULES!r}:
    __import__(m)
codes = []
for argv in (["run", "sweep.yaml", "--dry-run"], ["run", "gpus.yaml"], ["status"], ["report", "pf"]):
    sys.argv = ["adaptune", *argv]
    try:
        main()
    except SystemExit as exc:
        codes.append(exc.code or 0)
    else:
        codes.append(0)
print(codes, sorted(m for m in ("torch", "transformers", "deepspeed", "datasets") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ws,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "this machine has" in done.stderr and "resources.gpus_per_trial" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[0, 2, 0, 2] []", done.stdout + done.stderr


@pytest.mark.slow
def test_a_whole_sweep_imports_no_torch_into_the_driver(ws: Path) -> None:
    """`adaptune run` to the end of a sweep, Tune and its callbacks included: torch stays in the trials'
    processes (Tune's default TensorBoard logger imported it into the driver, 2 s of a 2-core machine's first
    trial), and Tune still writes the result files its result grid reads."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestrator.cli", "run", "sweep.yaml"],
                          capture_output=True, text=True, timeout=600, cwd=ws,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert {"orchestrator.tune_driver", "ray.tune.logger.json"} <= imported  # the driver's imports, Tune's loggers
    assert imported.isdisjoint({"torch", "transformers", "deepspeed", "tensorboardX"})
    assert list((ws / "runs" / "pf").rglob("result.json"))
    assert not list((ws / "runs" / "pf").rglob("events.out.tfevents*"))


def _fake_nvml(monkeypatch: pytest.MonkeyPatch, count: int | None) -> None:
    """NVML that sees `count` GPUs, or (None) whose library or driver is missing."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init() -> None:
        if count is None:
            raise NVMLError("NVML Shared Library Not Found")

    nvml.NVMLError = NVMLError
    nvml.nvmlInit = init
    nvml.nvmlDeviceGetCount = lambda: count
    nvml.nvmlShutdown = lambda: None
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


@pytest.mark.parametrize(("count", "visible", "expected"), [
    (None, None, 0), (2, None, 2), (4, "1,3", 2), (4, "", 0), (4, "-1", 0), (4, "0,-1,2", 1), (1, "0,1,2", 1),
    (2, "GPU-8a4d1c2e,GPU-77f0", 2),
])
def test_gpus_are_counted_as_cuda_would_without_torch(count, visible, expected, monkeypatch) -> None:
    _fake_nvml(monkeypatch, count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpus.visible_gpus() == expected


def test_no_nvml_is_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed (macOS, Windows)
    assert gpus.visible_gpus() == 0


@pytest.mark.parametrize("argv", [["run", "sweep.yaml", "--dry-run"], ["run", "sweep.yaml"], ["resume", "pf"],
                                  ["status", "pf"], ["report", "pf"]])
def test_each_command_checks_its_store_once(argv: list[str], ws: Path, monkeypatch, capsys) -> None:
    """A dry run checks it once and ends; the others are stopped by the check (before Ray starts)."""
    import workers.store_check

    calls: list[str] = []
    dry = "--dry-run" in argv

    def refuse(uri: str, timeout_s: float = 10.0) -> None:
        calls.append(uri)
        if not dry:
            raise ConfigError(None, "tracking.uri", "stopped here by the test")

    (ws / "runs" / "pf").mkdir(parents=True)
    (ws / "runs" / "pf" / "sweep.yaml").write_text((ws / "sweep.yaml").read_text())
    (ws / "mlflow.db").write_bytes(b"")  # an empty store: status and report check it before reading
    monkeypatch.setattr(workers.store_check, "check_tracking_store", refuse)
    if argv[0] == "run":
        (ws / "runs" / "pf" / "sweep.yaml").unlink()
        (ws / "runs" / "pf").rmdir()
    code, _, err = run_cli(argv, monkeypatch, capsys)
    assert (code, "stopped here by the test" in err) == ((0, False) if dry else (2, True)), err
    assert calls == [f"sqlite:///{ws}/mlflow.db"]
