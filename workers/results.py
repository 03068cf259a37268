"""What a trial and its training hand back: plain types, shared by `workers.job` and `workers.train`.

Imports nothing heavy (no torch, no mlflow): the driver and the trackers read these types too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

# report(metrics, checkpoint): at every log point and at the end; `checkpoint` is the newest checkpoint
# on disk then (it may predate the metrics' step), or None.
Report = Callable[[dict[str, float], Path | None], None]


class TrialStatus(StrEnum):
    """How a trial ended."""

    SUCCEEDED = "SUCCEEDED"
    OOM = "OOM"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


@dataclass
class TrialResult:
    status: TrialStatus
    metrics: dict[str, float]
    adapter_dir: Path | None = None
    error: str | None = None


@dataclass
class TrainOutcome:
    global_step: int
    total_steps: int
    final_loss: float
    tokens: int
    seconds: float
    peak_memory_bytes: int
    cancelled: bool = False
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_loss: float | None = None
