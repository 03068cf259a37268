"""Where a trial's record goes: the `Tracker` protocol, an MLflow tracker and an in-memory one.

The only worker module that imports mlflow. Parameters and tags pass `redact` on their way in:
values under secret-looking keys, and values that look like credentials themselves, become `***`.
A caller that logs a spec as an artifact redacts it with `redact` first. The environment is never
logged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from workers.errors import ConfigError
from workers.run_inputs import DatasetRecord

TRIAL_ID_TAG = "adaptune.trial_id"
PARENT_TAG = "mlflow.parentRunId"
REDACTED = "***"
# The experiment tag MLflow's UI reads to open an experiment on its runs table, not on the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# Seconds between two samples of CPU, memory, disk, network and (with pynvml) GPU figures.
SYSTEM_METRICS_INTERVAL_S = 5.0

_SECRET_KEY = re.compile(r"(^|[._-])(token|password|passwd|secret|credentials?|auth|(api|access|private)?[_-]?key)$",
                         re.IGNORECASE)
_SECRET_VALUE = re.compile(
    r"^(hf_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"
    r"|(AKIA|ASIA)[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,}|eyJ[\w-]+\.[\w-]+\.[\w-]+)$"
)
_USERINFO = re.compile(r"^(\w[\w+.-]*://)[^/@\s:]*:[^/@\s]*@")


class TrialStatus(StrEnum):
    """How a trial ended."""

    SUCCEEDED = "SUCCEEDED"
    OOM = "OOM"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


# How a trial's status reads in MLflow.
_RUN_STATUS = {"SUCCEEDED": "FINISHED", "OOM": "FAILED", "FAILED": "FAILED", "CANCELLED": "KILLED"}


class Tracker(Protocol):
    """What a trial logs to. Only rank 0 of a trial calls it."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, name: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_datasets(self, datasets: Sequence[DatasetRecord]) -> None: ...

    def finish(self, status: TrialStatus) -> None: ...


# --- redaction and flattening ---------------------------------------------------------------------------------

def is_secret_key(key: str) -> bool:
    """Whether the last part of a dotted key names a secret (`hf_token`, `tracking.password`)."""
    return bool(_SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def redact_value(value: str) -> str:
    """`value` with credentials removed: a token-shaped value entirely, a URL's user:password part."""
    if _SECRET_VALUE.match(value.strip()):
        return REDACTED
    return _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", value)


def redact(tree: Any, key: str = "") -> Any:
    """A copy of a JSON-like tree with every secret replaced by `***`."""
    if key and is_secret_key(key) and tree is not None:
        return REDACTED
    if isinstance(tree, Mapping):
        return {k: redact(v, f"{key}.{k}" if key else str(k)) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [redact(v) for v in tree]
    return redact_value(tree) if isinstance(tree, str) else tree


def flatten_params(spec_dict: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys and string values of a nested spec (`adapter.rank` -> "32"), secrets redacted.

    Lists of scalars are written as JSON (`adapter.placement` -> `["q", "v"]`); values are cut at
    MLflow's parameter length limit.
    """
    flat: dict[str, str] = {}
    for key, value in redact(dict(spec_dict)).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[name] = text[:MAX_PARAM_VAL_LENGTH]
    return flat


# --- the tracking URI -----------------------------------------------------------------------------------------

def _writable_folder(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def check_tracking_uri(uri: str) -> None:
    """Fail fast, before a model loads, when `uri` cannot take a run.

    sqlite: the database's folder must exist and be writable; http(s): the server must answer;
    file: or a plain path: its nearest existing folder must be writable.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        db = Path(uri.split("sqlite:///", 1)[-1]).expanduser()
        folder = db.parent.resolve()
        if not _writable_folder(folder):
            raise ConfigError(None, "tracking.uri", f"{uri}: the folder {folder} does not exist or is not writable")
        if db.exists() and not (db.is_file() and os.access(db, os.W_OK)):
            raise ConfigError(None, "tracking.uri", f"{uri}: the database is not a writable file")
    elif scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                pass
        except urllib.error.HTTPError:
            pass  # the server answered; what it said about /health does not matter here
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(None, "tracking.uri", f"the tracking server at {uri} does not answer: {reason}") from None
    elif scheme in ("", "file"):
        path = Path(parts.path if scheme == "file" else uri).expanduser().resolve()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not _writable_folder(existing):
            raise ConfigError(None, "tracking.uri", f"{uri}: {existing} is not a writable folder")


# --- trackers -------------------------------------------------------------------------------------------------

class MemoryTracker:
    """Keeps everything in memory: for unit tests, and for ranks that do not log."""

    def __init__(self) -> None:
        self.params: dict[str, str] = {}
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.artifacts: dict[str, Path] = {}
        self.tags: dict[str, str] = {}
        self.datasets: list[DatasetRecord] = []
        self.status: TrialStatus | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(flatten_params(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        self.artifacts[name or path.name] = path

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_datasets(self, datasets: Sequence[DatasetRecord]) -> None:
        self.datasets.extend(datasets)

    def finish(self, status: TrialStatus) -> None:
        self.status = status


def _artifact_location(uri: str) -> str | None:
    # A sqlite store keeps its artifacts next to the database, not in the caller's working directory.
    if uri.startswith("sqlite:///"):
        db = Path(uri.split("sqlite:///", 1)[1]).expanduser().resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def experiment_id(client: mlflow.MlflowClient, name: str, uri: str) -> str:
    """The id of experiment `name`, created when missing (safe against a concurrent creator) as a
    model-training experiment, which MLflow's UI opens on its runs."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri),
                                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class MlflowTracker:
    """One trial = one MLflow run, found again by its `adaptune.trial_id` tag when the trial resumes.

    On re-attaching, metric points at steps already logged are skipped: a resumed trial recomputes
    them identically, and the run keeps one continuous history. Metrics of one call go in one
    `log_batch` request; parameters are flattened and redacted. MLflow's system metrics (CPU, memory,
    disk, network; GPU utilisation and memory where a GPU and `pynvml` are present) are sampled into
    the run every `SYSTEM_METRICS_INTERVAL_S` seconds (`MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` overrides).
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        *,
        trial_id: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        system_metrics: bool = True,
    ) -> None:
        self.client = mlflow.MlflowClient(uri)
        self.experiment_id = experiment_id(self.client, experiment, uri)
        self._logged_to: dict[str, int] = {}
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        self.resumed = bool(found)
        if found:
            run = found[0]
            self.client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            for key in run.data.metrics:
                history = self.client.get_metric_history(run.info.run_id, key)
                self._logged_to[key] = max(m.step for m in history)
        else:
            run_tags = {TRIAL_ID_TAG: trial_id, **(tags or {})}
            if parent_run_id:
                run_tags[PARENT_TAG] = parent_run_id
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=run_tags)
        self.run_id: str = run.info.run_id
        self._monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                                 resume_logging=self.resumed, tracking_uri=uri)
            self._monitor.start()

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self._logged_to.get(k, -1)]
        for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[start:start + MAX_METRICS_PER_BATCH])
        for metric in batch:
            self._logged_to[metric.key] = step

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        """Log a file or a folder as artifact `name` (default: its own name) at the run's root."""
        name = name or path.name
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=name)
            return
        folder, _, filename = name.rpartition("/")
        if filename == path.name:
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            renamed = Path(tmp) / filename
            shutil.copyfile(path, renamed)
            self.client.log_artifact(self.run_id, str(renamed), artifact_path=folder or None)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        items = [RunTag(k, redact_value(str(v))) for k, v in tags.items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[start:start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_datasets(self, datasets: Sequence[DatasetRecord]) -> None:
        """The trial's datasets as MLflow run inputs: the runs table's Dataset column, the run page's inputs."""
        inputs = [
            DatasetInput(Dataset(d.name, d.digest, "local", json.dumps({"uri": d.path}),
                                 profile=json.dumps({"num_rows": d.rows, **d.profile})),
                         [InputTag("mlflow.data.context", d.context)])
            for d in datasets
        ]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def finish(self, status: TrialStatus) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self.client.set_terminated(self.run_id, status=_RUN_STATUS[str(status)])

