"""requirements.lock: current against pyproject.toml, refused in one line when not, and its CPU subset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import lockfile  # noqa: E402


def test_the_committed_lock_is_current() -> None:
    assert lockfile.check() == 0


def test_the_cpu_subset_drops_torch_and_its_cuda_wheels_only(capsys: pytest.CaptureFixture[str]) -> None:
    everything = lockfile.requirements(lockfile.LOCK)
    lockfile.cpu()
    cpu = capsys.readouterr().out.splitlines()
    dropped = {line.split("==")[0] for line in everything} - {line.split("==")[0] for line in cpu}
    assert "torch" in dropped and "nvidia-cublas" in dropped and "cuda-toolkit" in dropped
    assert all(name in ("torch", "triton") or name.startswith(("nvidia-", "cuda-")) for name in dropped)
    assert "nvidia-ml-py" not in dropped  # NVML bindings: pure Python, a dependency of adaptune itself
    assert {"transformers", "peft", "deepspeed", "ray", "mlflow", "sympy"} <= {line.split("==")[0] for line in cpu}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The files `make venv` reads before it installs anything, in a folder of their own."""
    for name in ("Makefile", "pyproject.toml", "requirements.lock", "tools/lockfile.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def edit_pyproject(root: Path) -> None:
    path = root / "pyproject.toml"
    path.write_text(path.read_text().replace('"pyyaml>=6",', '"pyyaml>=6", "tabulate>=0.9",'))


def edit_lock(root: Path) -> None:
    path = root / "requirements.lock"
    path.write_text(path.read_text().replace("\ntransformers==5.", "\ntransformers==4.", 1))


@pytest.mark.parametrize(("edit", "says"), [
    (edit_pyproject, "does not match pyproject.toml's dependencies: run `make lock`"),
    (edit_lock, "was edited by hand: run `make lock`"),
])
def test_a_stale_lock_stops_make_in_one_line_before_anything_is_installed(checkout: Path, edit, says: str) -> None:
    edit(checkout)
    # As a user's make, not a sub-make of the `make test` that may be running this test.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    out = subprocess.run(["make", "-s", "venv", f"PYTHON={sys.executable}"], cwd=checkout, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if not line.startswith("make:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: requirements.lock {says}"), out.stderr
    assert not (checkout / ".venv").exists()


def test_stamping_a_fresh_resolution_makes_the_lock_current_again(checkout: Path, monkeypatch) -> None:
    edit_pyproject(checkout)
    monkeypatch.setattr(lockfile, "PYPROJECT", checkout / "pyproject.toml")
    monkeypatch.setattr(lockfile, "LOCK", checkout / "requirements.lock")
    assert lockfile.check() == 2
    fresh = checkout / "fresh.txt"
    fresh.write_text("# uv's own header\n" + lockfile.split((REPO / "requirements.lock").read_text())[1])
    lockfile.stamp(fresh)
    assert lockfile.check() == 0
