"""What a result was made with: package versions, the code's git SHA, the accelerators."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import workers

PACKAGES = ("torch", "transformers", "deepspeed", "datasets", "ray", "mlflow")


HERE = Path(__file__).resolve().parent


def git_sha() -> str:
    """The commit of the adaptune checkout this runs from, or `unknown` for an installed copy."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def provenance() -> dict[str, str]:
    info = {"adaptune": workers.__version__, "git_sha": git_sha()}
    for name in PACKAGES:
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = "absent"
    import torch  # here, not at the top: the sweep driver takes `git_sha` from this module, without torch

    count = torch.cuda.device_count()
    info["gpu_count"] = str(count)
    info["gpu_name"] = torch.cuda.get_device_name(0) if count else "none"
    return info
