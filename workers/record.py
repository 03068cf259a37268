"""What a trial leaves behind, written by rank 0 alone: the one place a trial asks its rank.

A `Record` is the trial's tracker plus its result folder (`adapter/`, `predictions/`, `summary.json`,
`spec.yaml`). On rank 0 it passes every call on; on any other rank every call does nothing, as
torchtune's metric loggers do, so a trial's phases run the same code on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.adapters.io import save_adapter
from workers.adapters.registry import finalize
from workers.names import ADAPTER_ARTIFACT, PREDICTIONS_ARTIFACT
from workers.repo_paths import repo_relative

if TYPE_CHECKING:
    from torch import nn

    from workers.results import TrialStatus
    from workers.run_inputs import DatasetRecord
    from workers.spec import TrialSpec
    from workers.tracking import Tracker


class Record:
    """`tracker` and the result folder `out` on rank 0; a record that keeps nothing on any other rank."""

    def __init__(self, tracker: Tracker, rank: int, out: Path) -> None:
        self.tracker, self.out, self.writes = tracker, out, rank == 0

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.writes:
            self.tracker.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.writes:
            self.tracker.log_metrics(metrics, step=step)

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        if self.writes:
            self.tracker.log_artifact(path, name)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.writes:
            self.tracker.set_tags(tags)

    def log_datasets(self, datasets: Sequence[DatasetRecord]) -> None:
        if self.writes:
            self.tracker.log_datasets(datasets)

    def finish(self, status: TrialStatus) -> None:
        if self.writes:
            self.tracker.finish(status)

    def evaluates(self, spec: TrialSpec) -> bool:
        """Whether this rank evaluates: rank 0, and every rank under ZeRO-3, whose parameters are partitioned
        (every rank takes part in each forward then)."""
        return bool(spec.data.eval) and (self.writes or spec.train.zero_stage == 3)

    @property
    def predictions_dir(self) -> Path | None:
        """Where evaluation writes its predictions: on rank 0 only."""
        return self.out / PREDICTIONS_ARTIFACT if self.writes else None

    @property
    def adapter_dir(self) -> Path | None:
        """The saved adapter's folder, on rank 0."""
        return self.out / ADAPTER_ARTIFACT if self.writes else None

    def write_text(self, name: str, text: str) -> None:
        """`text` as the file `name` of the result folder."""
        if self.writes:
            (self.out / name).write_text(text)

    def save_adapter(self, model: nn.Module, spec: TrialSpec) -> None:
        """Finalize the trained adapter into its deployed form and save it (under ZeRO-3, inside
        `gathered_adapter()`): on rank 0, whose model alone is saved, and after evaluation."""
        if self.writes:
            deployed = finalize(model, spec.adapter)
            save_adapter(model, deployed, self.out / ADAPTER_ARTIFACT, base_model=repo_relative(spec.model),
                         trained_as=spec.adapter if deployed != spec.adapter else None)
