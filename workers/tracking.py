"""Where a trial's record goes: the `Tracker` protocol, an MLflow tracker and an in-memory one.

The only worker module that imports mlflow. Parameters and tags pass `workers.redaction` on their
way in: values under secret-looking keys, and values that look like credentials themselves, become
`***`. A caller that logs a spec as an artifact redacts it with `redact` first. The environment is
never logged. Tag names live in `workers.names`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from workers.names import (
    CHANGED_PARAM_TAG,
    DATASET_CONTEXT_TAG,
    ERROR_TAG,
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    PARENT_TAG,
    STATUS_TAG,
    TRIAL_ID_TAG,
)
from workers.redaction import redact, redact_value
from workers.results import TrialStatus
from workers.run_inputs import DatasetRecord
from workers.spool import Call, Spool

T = TypeVar("T")
# Tags that describe how one attempt of a trial ended: a new attempt starts without them.
ATTEMPT_TAGS = (STATUS_TAG, ERROR_TAG)
# How long a spooling tracker lets the store be unreachable before the trial fails, and how often it retries.
DEFAULT_MAX_OUTAGE_S = 1800.0
RETRY_S = 5.0
# Errors of the store that a retry may cure (MLflow reports a refused connection as INTERNAL_ERROR).
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
# Seconds between two samples of CPU, memory, disk, network and (with pynvml) GPU figures.
SYSTEM_METRICS_INTERVAL_S = 5.0


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


# --- flattening ----------------------------------------------------------------------------------------------

def mlflow_client(uri: str) -> mlflow.MlflowClient:
    """A client of `uri` whose runs never print it: MLflow's "View run at: URL" lines would show its password.
    adaptune prints its own pointer, redacted."""
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return mlflow.MlflowClient(uri)


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


class TrackingOutage(RuntimeError):
    """The tracking store stayed unreachable longer than the trial's allowed outage."""


def transient(exc: Exception) -> bool:
    """Whether a failed tracking call may succeed when retried (an outage, not a refusal)."""
    return not isinstance(exc, MlflowException) or exc.error_code in _TRANSIENT_CODES


def trial_filter(trial_id: str, parent_run_id: str | None) -> str:
    """The search for a trial's run: by its id, under its own sweep's parent run when it has one."""
    query = f"tags.`{TRIAL_ID_TAG}` = '{trial_id}'"
    return f"{query} and tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else query


class MlflowTracker:
    """One trial = one MLflow run, found again by its `adaptune.trial_id` tag when the trial resumes.

    A trial of a sweep is looked up only under its sweep's parent run: a sweep started anew has
    runs of its own. On re-attaching, what the previous attempt could not deliver is delivered, then
    the tags of its end (`adaptune.status`, `adaptune.error`) are removed, so the run describes its
    last attempt; metric points at steps already logged are skipped: a resumed trial recomputes them
    identically, and the run keeps one continuous history. OOM is recorded as `adaptune.status=OOM`
    on a FAILED run.

    With a `spool_dir`, every call is written ahead to a `Spool` there and delivered in order: while
    the store is unreachable the trial trains on and its calls wait on disk (retried every few
    seconds, and at `finish` until they are delivered); only an outage longer than `max_outage_s`
    fails the trial, whose next attempt delivers what was left before anything new. MLflow's own
    HTTP retries are then cut to one, so a call never blocks training for minutes.

    Metrics of one call go in one `log_batch` request; parameters are flattened and redacted. MLflow's
    system metrics (CPU, memory, disk, network; GPU utilisation and memory where a GPU and `pynvml` are
    present) are sampled every `SYSTEM_METRICS_INTERVAL_S` seconds (`MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`
    overrides) and logged through the spool like the trial's own metrics (`workers.system_metrics`).
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
        spool_dir: Path | None = None,
        max_outage_s: float = DEFAULT_MAX_OUTAGE_S,
    ) -> None:
        if spool_dir is not None:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.client = mlflow_client(uri)
        self._lock = threading.RLock()
        self.max_outage_s = max_outage_s
        self._outage_since: float | None = None
        self._last_try = 0.0
        self._spool: Spool | None = None
        self._spooling = spool_dir is not None
        self._params: dict[str, str] = {}
        run = self._retry(lambda: self._attach(uri, experiment, run_name, trial_id, parent_run_id, tags or {}))
        self.run_id: str = run.info.run_id
        self._logged_to: dict[str, int] = {}
        if spool_dir is not None:
            self._spool = Spool(spool_dir, self.run_id)
        if self.resumed:
            self._flush(wait=True)  # what the last attempt could not deliver, its end included, before anything new
            self._retry(self._reopen)
            self._logged_to = self._retry(self._steps_logged)
        self._monitor = None
        if system_metrics:
            from workers.system_metrics import SpooledSystemMetrics

            self._monitor = SpooledSystemMetrics(self.log_metrics, self.run_id, uri,
                                                 interval_s=SYSTEM_METRICS_INTERVAL_S, resumed=self.resumed)
            self._monitor.start()

    def _attach(self, uri: str, experiment: str, run_name: str, trial_id: str, parent_run_id: str | None,
                tags: Mapping[str, str]) -> Run:
        """The trial's run: found again (`resumed`), or created."""
        self.experiment_id = experiment_id(self.client, experiment, uri)
        found = self.client.search_runs(
            [self.experiment_id], filter_string=trial_filter(trial_id, parent_run_id),
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        self.resumed = bool(found)
        if not found:
            run_tags = {TRIAL_ID_TAG: trial_id, **tags}
            if parent_run_id:
                run_tags[PARENT_TAG] = parent_run_id
            return self.client.create_run(self.experiment_id, run_name=run_name, tags=run_tags)
        return found[0]

    def _reopen(self) -> None:
        """Make the found run describe a new attempt: RUNNING, without the tags of the last one's end.

        After the last attempt's spool is delivered: a trial failed by an outage spooled its own end
        (`adaptune.error`, FAILED), which must not outlive the attempt that follows.
        """
        run = self.client.get_run(self.run_id)
        self._params = dict(run.data.params)
        self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        for key in ATTEMPT_TAGS:
            if key in run.data.tags:
                self.client.delete_tag(self.run_id, key)

    def _steps_logged(self) -> dict[str, int]:
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                for key in self.client.get_run(self.run_id).data.metrics}

    def _outage(self, error: Exception) -> None:
        """Note a failed attempt; raise once the store has been unreachable for too long."""
        self._outage_since = self._outage_since or self._last_try
        if time.monotonic() - self._outage_since > self.max_outage_s:
            where = f"; the calls wait in {self._spool.path}" if self._spool else ""
            raise TrackingOutage(f"the tracking store has not answered for {self.max_outage_s:.0f} s{where}: "
                                 f"{error}") from error

    def _retry(self, fn: Callable[[], T]) -> T:
        """`fn()`, retried every RETRY_S through an outage when spooling."""
        while True:
            self._last_try = time.monotonic()
            try:
                result = fn()
            except Exception as exc:
                if not (self._spooling and transient(exc)):
                    raise
                self._outage(exc)
                time.sleep(RETRY_S)
                continue
            self._outage_since = None
            return result

    def _call(self, call: Call) -> None:
        with self._lock:  # the trial's thread and the system metrics' share the spool
            if self._spool is None:
                self._send(call)
                return
            self._spool.append(call)
            self._flush(wait=call["op"] == "finish")

    def _flush(self, *, wait: bool) -> None:
        """Deliver the spooled calls; during an outage retry every RETRY_S (and block only when `wait`)."""
        if self._spool is None:
            return
        if not wait and self._outage_since is not None and time.monotonic() - self._last_try < RETRY_S:
            return
        while True:
            self._last_try = time.monotonic()
            error = self._spool.deliver(self._send, transient)
            if error is None:
                self._outage_since = None
                return
            self._outage(error)
            if not wait:
                return
            time.sleep(RETRY_S)

    def _send(self, call: Call) -> None:
        op = call["op"]
        if op == "params":
            items = [Param(k, v) for k, v in call["params"].items()]
            for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_TAGS_PER_BATCH])
        elif op == "metrics":
            batch = [Metric(k, v, call["time"], call["step"]) for k, v in call["metrics"].items()]
            for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=batch[start:start + MAX_METRICS_PER_BATCH])
        elif op == "tags":
            items = [RunTag(k, v) for k, v in call["tags"].items()]
            for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=items[start:start + MAX_PARAMS_TAGS_PER_BATCH])
        elif op == "artifact":
            self._upload(Path(call["path"]), call["name"])
        elif op == "datasets":
            inputs = [
                DatasetInput(Dataset(d["name"], d["digest"], "local", json.dumps({"uri": d["path"]}),
                                     profile=json.dumps({"num_rows": d["rows"], **d["profile"]})),
                             [InputTag(DATASET_CONTEXT_TAG, d["context"])])
                for d in call["datasets"]
            ]
            self.client.log_inputs(self.run_id, datasets=inputs)
        elif op == "finish":
            self.client.set_terminated(self.run_id, status=call["status"])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters; on a resumed run, one already logged keeps its value and a new value of it
        (a resume under another code version or evaluation setting) becomes a tag."""
        flat = flatten_params(params)
        changed = {f"{CHANGED_PARAM_TAG}{k}": v for k, v in flat.items() if self._params.get(k, v) != v}
        fresh = {k: v for k, v in flat.items() if k not in self._params}
        self._params.update(fresh)
        if fresh:
            self._call({"op": "params", "params": fresh})
        if changed:
            self.set_tags(changed)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        with self._lock:
            fresh = {k: float(v) for k, v in metrics.items() if step > self._logged_to.get(k, -1)}
            if not fresh:
                return
            self._call({"op": "metrics", "step": step, "time": int(time.time() * 1000), "metrics": fresh})
            for key in fresh:
                self._logged_to[key] = step

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        """Log a file or a folder as artifact `name` (default: its own name) at the run's root."""
        self._call({"op": "artifact", "path": str(path), "name": name or path.name})

    def _upload(self, path: Path, name: str) -> None:
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
        self._call({"op": "tags", "tags": {k: redact_value(str(v)) for k, v in tags.items()}})

    def log_datasets(self, datasets: Sequence[DatasetRecord]) -> None:
        """The trial's datasets as MLflow run inputs: the runs table's Dataset column, the run page's inputs."""
        self._call({"op": "datasets", "datasets": [dataclasses.asdict(d) for d in datasets]})

    def finish(self, status: TrialStatus) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if status == TrialStatus.OOM:
            self.set_tags({STATUS_TAG: str(status)})
        self._call({"op": "finish", "status": _RUN_STATUS[str(status)]})

