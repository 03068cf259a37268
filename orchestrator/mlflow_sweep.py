"""The sweep's record in MLflow: one parent run per sweep, the trials' runs nested under it.

The parent holds the sweep file, the expanded space, the git SHA, and at the end the summary table,
the cost totals and the plots. The MLflow store is the source of truth for `status` and `report`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Run

from orchestrator.mlflow_views import save_runs_view
from orchestrator.report import Trial, collect, write_csv, write_report
from orchestrator.sweep import Point, SweepSpec
from workers.names import (
    ADAPTER_TAG,
    CPU_HOURS,
    ERROR_TAG,
    GIT_SHA_TAG,
    GPU_HOURS,
    INTERRUPTED_TAG,
    MACRO_ACCURACY,
    PARENT_TAG,
    PREDICTIONS_ARTIFACT,
    REPORT_ARTIFACT,
    STATUS_TAG,
    SUMMARY_CSV,
    SWEEP_TAG,
    TOKENS_TRAINED,
    TRAINABLE_PARAMS,
)
from workers.provenance import git_sha
from workers.redaction import redact
from workers.tracking import experiment_id, mlflow_client

COSTS = (GPU_HOURS, CPU_HOURS, TOKENS_TRAINED)


class MlflowTrials:
    """The trials of one sweep, read from its MLflow store (a `report.TrialSource`)."""

    def __init__(self, uri: str, parent_run_id: str) -> None:
        self.client = mlflow_client(uri)
        self.parent = self.client.get_run(parent_run_id)

    def trials(self) -> list[Trial]:
        runs = sorted(child_runs(self.client, self.parent), key=lambda run: run.info.start_time)
        return [Trial(run.info.run_id, run.info.run_name, run.data.tags.get(STATUS_TAG, run.info.status),
                      dict(run.data.params), dict(run.data.metrics),
                      run.data.tags.get(ADAPTER_TAG, run.info.run_name))
                for run in runs]

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def predictions(self, run_id: str, folder: Path) -> Path:
        # One progress bar per small download would bury the report's table.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        return Path(self.client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, str(folder)))


def find_parent(client: MlflowClient, experiment: str, name: str) -> Run | None:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def prepare_store(uri: str, experiment: str) -> str:
    """Create the store's tables (a new SQLite store takes 1-2 s of migrations) and the experiment; its id."""
    return experiment_id(mlflow_client(uri), experiment, uri)


def start_parent(uri: str, sweep: SweepSpec, file: Path, points: Sequence[Point], *, resume: bool) -> str:
    """The parent run of `sweep`: the existing one when resuming, else a new one with the sweep's inputs."""
    client = mlflow_client(uri)
    if resume:
        found = find_parent(client, sweep.experiment, sweep.name)
        if found is not None:
            client.update_run(found.info.run_id, status="RUNNING")
            if INTERRUPTED_TAG in found.data.tags:
                client.delete_tag(found.info.run_id, INTERRUPTED_TAG)
            return found.info.run_id
    exp_id = experiment_id(client, sweep.experiment, uri)
    save_runs_view(client, exp_id, sweep.search.metric)
    run = client.create_run(exp_id, run_name=sweep.name, tags={SWEEP_TAG: sweep.name, GIT_SHA_TAG: git_sha()})
    run_id = run.info.run_id
    client.log_param(run_id, "trials", str(len(points)) if points else f"optuna x {sweep.search.num_samples}")
    client.log_param(run_id, "search", sweep.search.algorithm)
    client.log_param(run_id, "scheduler", sweep.scheduler.type)
    with tempfile.TemporaryDirectory() as tmp:
        # The sweep file less its secrets: tracking.uri may carry a password.
        copy = Path(tmp) / file.name
        copy.write_text(yaml.safe_dump(redact(yaml.safe_load(file.read_text())), sort_keys=False))
        client.log_artifact(run_id, str(copy), artifact_path="sweep")
        space = Path(tmp) / "expanded_space.json"
        space.write_text(json.dumps([{"name": p.name, "branch": p.branch, "values": redact(p.values),
                                      "spec": redact(p.spec.model_dump(mode="json"))} for p in points], indent=1))
        client.log_artifact(run_id, str(space), artifact_path="sweep")
    return run_id


def child_runs(client: MlflowClient, parent: Run) -> list[Run]:
    query = f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    return client.search_runs([parent.info.experiment_id], filter_string=query, max_results=50_000)


def out_of_memory(uri: str, parent_id: str) -> list[tuple[str, str]]:
    """(name, the error's first line) of every trial of the sweep whose last attempt ran out of memory.

    Final for the sweep: `resume` does not run it again as it stands (it would fail the same way).
    """
    client = mlflow_client(uri)
    return sorted((run.info.run_name, run.data.tags.get(ERROR_TAG, "out of memory").splitlines()[0])
                  for run in child_runs(client, client.get_run(parent_id))
                  if run.data.tags.get(STATUS_TAG) == "OOM")


def parent_run_id(uri: str, experiment: str, name: str) -> str | None:
    """The run id of sweep `name`'s parent run (the newest), or None."""
    found = find_parent(mlflow_client(uri), experiment, name)
    return found.info.run_id if found else None


def sweep_status(uri: str, experiment: str, name: str) -> tuple[str, str | None, list[dict[str, Any]]] | None:
    """The parent run's status, what interrupted it (or None), one row per trial; None when the sweep has no run."""
    client = mlflow_client(uri)
    parent = find_parent(client, experiment, name)
    if parent is None:
        return None
    return parent.info.status, parent.data.tags.get(INTERRUPTED_TAG), summary_rows(client, parent)


def build_report(uri: str, parent_id: str, out_dir: Path, *, metric: str = MACRO_ACCURACY,
                 mode: str = "max") -> Path:
    """Write the sweep's report into `out_dir` from its MLflow store; returns the report.md path."""
    return write_report(collect(MlflowTrials(uri, parent_id), metric=metric, mode=mode), Path(out_dir))


def close_stragglers(client: MlflowClient, parent_id: str) -> int:
    """Mark child runs left RUNNING (a trial stopped by the scheduler or killed with the driver) KILLED."""
    parent = client.get_run(parent_id)
    count = 0
    for run in child_runs(client, parent):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, STATUS_TAG, "STOPPED")
            client.set_terminated(run.info.run_id, status="KILLED")
            count += 1
    return count


def summary_rows(client: MlflowClient, parent: Run) -> list[dict[str, Any]]:
    """One row per trial: its point, status, parameters that matter and every final metric."""
    rows = []
    for run in child_runs(client, parent):
        p, m = run.data.params, run.data.metrics
        rows.append({
            "trial": run.info.run_name,
            "status": run.data.tags.get(STATUS_TAG, run.info.status),
            "type": p.get("adapter.type", ""),
            "placement": p.get("adapter.placement", ""),
            "bottleneck": p.get("adapter.bottleneck", ""),
            "rank": p.get("adapter.rank", ""),
            "virtual_tokens": p.get("adapter.virtual_tokens", ""),
            "seed": p.get("seed", ""),
            TRAINABLE_PARAMS: p.get(TRAINABLE_PARAMS, ""),
            **{k: round(v, 6) for k, v in sorted(m.items())},
        })
    return sorted(rows, key=lambda r: r["trial"])


# Counter of the parent run -> the trial statuses it counts.
COUNTED = {
    "trials_finished": ("FINISHED", "SUCCEEDED"),
    "trials_failed": ("FAILED",),
    "trials_oom": ("OOM",),
    "trials_stopped": ("STOPPED", "KILLED", "CANCELLED"),
}


def trial_counts(statuses: Iterable[str]) -> dict[str, int]:
    """The parent run's counters, from its children's statuses as they stand (never accumulated)."""
    statuses = list(statuses)
    return {"trials_total": len(statuses),
            **{name: sum(s in counted for s in statuses) for name, counted in COUNTED.items()}}


def finish_parent(
    uri: str, parent_id: str, *, failed: bool, unfinished: int = 0, metric: str = MACRO_ACCURACY, mode: str = "max"
) -> list[dict[str, Any]]:
    """Close stragglers, log the summary table, the cost totals and the report on the parent run.

    Its status: KILLED while `unfinished` trials of the sweep (started or not) did not finish (an interrupted
    `run`, for `resume`), else FAILED when a trial failed, else FINISHED.
    """
    client = mlflow_client(uri)
    close_stragglers(client, parent_id)
    parent = client.get_run(parent_id)
    rows = summary_rows(client, parent)
    for cost in COSTS:
        total = sum(float(r[cost]) for r in rows if isinstance(r.get(cost), float | int))
        client.log_metric(parent_id, f"total_{cost}", total)
    for name, count in trial_counts(r["status"] for r in rows).items():
        client.log_metric(parent_id, name, count)
    client.log_metric(parent_id, "trials_unfinished", unfinished)
    if unfinished:
        name = parent.data.tags.get(SWEEP_TAG, parent.info.run_name)
        client.set_tag(parent_id, INTERRUPTED_TAG, f"{unfinished} trials did not finish: adaptune resume {name}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_csv(rows, folder / SUMMARY_CSV)
        if rows:
            build_report(uri, parent_id, folder, metric=metric, mode=mode)
        client.log_artifacts(parent_id, str(folder), artifact_path=REPORT_ARTIFACT)
    client.set_terminated(parent_id, status="KILLED" if unfinished else "FAILED" if failed else "FINISHED")
    return rows
