"""Ray Tune schedules the trials of a sweep; the only module that imports ray.

A trial that needs one worker calls `run_trial` inside its own Tune trial and reports through
`tune.report`. A trial that needs several (data parallel, ZeRO-3 across GPUs) builds a Ray Train
`TorchTrainer` whose workers call `run_trial`; rank 0's reports reach Tune through
`TuneReportCallback`. Trials keep their checkpoints under `<storage>/<sweep>/trials/<trial id>`, so
a restored experiment resumes each unfinished trial where it stopped and never re-runs a finished
one (its `summary.json` is there); a finished one whose record still waits in its tracking spool (the
store was down for longer than the trial waited) delivers it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune
from rich.console import Console
from rich.live import Live
from rich.table import Table

from orchestrator import reaper
from orchestrator.cluster import check_address, is_uri, probe_node, single_machine_uri
from orchestrator.environment import cluster_environment, environment, without_secrets
from orchestrator.heartbeat import Heartbeat, driver_gone
from orchestrator.sweep import Point, SweepSpec, experiment_dir, optuna_space, point_from_optuna, redacted_text
from workers.errors import ConfigError, TrialFailed
from workers.names import (
    BRANCH_TAG,
    HEARTBEAT,
    MACRO_ACCURACY,
    SPOOL,
    SUMMARY_FILE,
    SWEEP_FILE,
    TRAIN_LOSS,
    VAL_LOSS,
)
from workers.redaction import redact, redact_text
from workers.results import TrialStatus
from workers.spec import trial_id
from workers.spool import undelivered

if TYPE_CHECKING:  # mlflow's import (3 s on 2 cores) overlaps Ray's start: see `_prepare_store`
    from workers.tracking import MlflowTracker


@dataclass(frozen=True)
class Context:
    """What every trial of one sweep needs besides its own point."""

    sweep: dict[str, Any]
    root: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    max_outage_s: float
    # The points whole: Tune's search space, which Ray stores on disk, holds them redacted, with an index.
    points: tuple[dict[str, Any], ...] = ()


def _point(config: dict[str, Any], ctx: Context) -> Point:
    if "point" in config:
        return Point.model_validate(ctx.points[config["point"]["index"]])
    return point_from_optuna(SweepSpec.model_validate(ctx.sweep), config)


def _final_metrics(summary: Path) -> dict[str, float]:
    data = json.loads(summary.read_text())
    return data["metrics"]


def _tracker(ctx: Context, point: Point, tid: str) -> MlflowTracker:
    from workers.tracking import MlflowTracker

    return MlflowTracker(ctx.tracking_uri, ctx.experiment, point.name, trial_id=tid,
                         parent_run_id=ctx.parent_run_id, tags={BRANCH_TAG: str(point.branch)},
                         spool_dir=Path(ctx.root) / "trials" / tid / SPOOL, max_outage_s=ctx.max_outage_s)


def _raise_unless_done(status: TrialStatus, error: str | None, name: str) -> None:
    # An errored Tune trial is re-run by `adaptune resume`; OOM is final and not retried blindly.
    if status == TrialStatus.FAILED:
        raise TrialFailed(error or f"trial {name} failed")


def failures(results: Any) -> list[tuple[str, str]]:
    """(name, one-line cause) of every trial of a Tune result grid that ended in an error."""
    out = []
    for result in results:
        if result.error is None:
            continue
        config = result.config or {}
        name = Point.model_validate(config["point"]).name if "point" in config else result.path.rsplit("/", 1)[-1]
        cause = getattr(result.error, "cause", None) or result.error
        if isinstance(cause, TrialFailed | ConfigError):
            text = str(cause)
        else:
            lines = [line for line in str(cause).splitlines() if line.strip()]
            text = f"{type(cause).__name__}: {lines[-1].strip() if lines else '(no message)'}"
        out.append((name, redact_text(text.splitlines()[0] if text else type(cause).__name__)))
    return sorted(out)


def worker_resources(ctx: Context) -> dict[str, float]:
    """What each Ray Train worker of a multi-worker trial holds: its CPUs, and its GPU where it has one (Ray Train
    gives a worker one whole GPU unless told)."""
    return {"CPU": ctx.cpus_per_worker, **({"GPU": ctx.gpus_per_worker} if ctx.gpus_per_worker else {})}


def hide_gpus_unless_given(ctx: Context) -> None:
    """A trial given no GPU sees none. Ray leaves CUDA_VISIBLE_DEVICES as it is for a task given no GPU: on a GPU node
    such a trial saw every GPU and trained on the first, in bf16, beside the trials that hold it. Set before the
    trial's first CUDA call, where torch reads it."""
    if not ctx.gpus_per_worker:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _worker_loop(config: dict[str, Any], ctx: Context, spec: dict[str, Any]) -> None:
    """One Ray Train worker of a multi-worker trial."""
    import ray.train

    hide_gpus_unless_given(ctx)

    from workers.job import run_trial  # the worker imports torch; the driver never does
    from workers.tracking import MemoryTracker

    context = ray.train.get_context()
    os.environ.setdefault("LOCAL_RANK", str(context.get_local_rank()))
    point = Point.model_validate(spec)
    tid = config["trial_id"]
    tracker = _tracker(ctx, point, tid) if context.get_world_rank() == 0 else MemoryTracker()
    # Every rank watches the driver's heartbeat; the trainer stops them all when one sees it still.
    result = run_trial(point.spec, tracker, Path(ctx.root) / "trials" / tid,
                       report=lambda metrics, checkpoint: ray.train.report(metrics),
                       should_stop=driver_gone(Path(ctx.root) / HEARTBEAT), gpu_share=ctx.gpus_per_worker)
    _raise_unless_done(result.status, result.error, point.name)


def trial_function(config: dict[str, Any], ctx: Context) -> None:
    """The Tune trainable: one trial of the sweep."""
    point = _point(config, ctx)
    tid = trial_id(point.spec)
    folder = Path(ctx.root) / "trials" / tid
    summary = folder / "result" / SUMMARY_FILE
    if summary.is_file():
        if undelivered(folder / SPOOL):
            # It finished, and failed waiting for a store that stayed down: its record, from the spool.
            _tracker(ctx, point, tid).finish(TrialStatus.SUCCEEDED)
        tune.report(_final_metrics(summary))
        return
    if ctx.workers == 1:
        hide_gpus_unless_given(ctx)
        from workers.job import run_trial  # the trial's actor imports torch; the driver never does

        # Stop with a checkpoint when the driver is gone: `adaptune resume` takes the trial up there.
        result = run_trial(point.spec, _tracker(ctx, point, tid), folder,
                           report=lambda metrics, checkpoint: tune.report(metrics),
                           should_stop=driver_gone(Path(ctx.root) / HEARTBEAT), gpu_share=ctx.gpus_per_worker)
        _raise_unless_done(result.status, result.error, point.name)
        return
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    # Ray keeps a Train run's config in its state: the spec and the store's URI (secrets) go with the function.
    trainer = TorchTrainer(
        functools.partial(_worker_loop, ctx=ctx, spec=point.model_dump(mode="json")),
        train_loop_config={"trial_id": tid},
        scaling_config=ScalingConfig(num_workers=ctx.workers, use_gpu=ctx.gpus_per_worker > 0,
                                     resources_per_worker=worker_resources(ctx)),
        run_config=RunConfig(name=f"train-{tid}", storage_path=str(Path(ctx.root) / "train"),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


class ProgressTable(tune.Callback):
    """A live table of the trials: status, step/total, loss, accuracy, ETA."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.started: dict[str, float] = {}
        self.live: Live | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; a live display does not pickle.
        return {**self.__dict__, "live": None}

    def setup(self, **info: Any) -> None:
        self.live = Live(self._table(), console=Console(stderr=True), refresh_per_second=2)
        self.live.start()

    def _name(self, trial: Any) -> str:
        point = trial.config.get("point")
        return (point and Point.model_validate(point).name) or trial.trial_id

    def _table(self) -> Table:
        table = Table(title="adaptune sweep", expand=False)
        for col in ("trial", "status", "step", "loss", "val loss", "accuracy", "ETA"):
            table.add_column(col)
        for name, row in sorted(self.rows.items()):
            table.add_row(name, row.get("status", ""), row.get("step", ""), row.get("loss", ""),
                          row.get("val", ""), row.get("acc", ""), row.get("eta", ""))
        return table

    def _update(self, trial: Any, **fields: str) -> None:
        self.rows.setdefault(self._name(trial), {}).update(fields)
        if self.live is not None:
            self.live.update(self._table())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.monotonic()
        self._update(trial, status="RUNNING")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        fields = {}
        if "step" in result and "total_steps" in result:
            step, total = int(result["step"]), int(result["total_steps"])
            fields["step"] = f"{step}/{total}"
            elapsed = time.monotonic() - self.started.get(trial.trial_id, time.monotonic())
            if 0 < step < total:
                fields["eta"] = f"{elapsed / step * (total - step):.0f} s"
        if TRAIN_LOSS in result:
            fields["loss"] = f"{result[TRAIN_LOSS]:.4f}"
        if VAL_LOSS in result:
            fields["val"] = f"{result[VAL_LOSS]:.4f}"
        if MACRO_ACCURACY in result:
            fields["acc"] = f"{result[MACRO_ACCURACY]:.2%}"
            fields["eta"] = ""
        self._update(trial, **fields)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, status="DONE")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, status="ERROR")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.live is not None:
            self.live.stop()
            if not self.live.console.is_terminal:  # rich ends the table's last line only on a terminal
                self.live.console.line()


# Tune's loggers of a failed trial's traceback and of the trials that did not complete: the closing table names
# them (with their causes), the trial's MLflow run and Tune's `error.txt` keep the tracebacks.
TUNE_ERROR_LOGGERS = ("ray.tune.tune", "ray.tune.execution.tune_controller")

# How Tune runs here, read from the driver's environment while it runs:
TUNE_SETTINGS = {
    # The old output engine: it prints nothing of its own at `verbose=0`; the new one prints each errored trial.
    "RAY_AIR_NEW_OUTPUT": "0",
    # No logger callbacks of Tune's choosing: `tune_loggers` names them. Its default TensorBoard logger imported
    # torch into the driver (2 s of the first trial's start on 2 cores) for event files no one reads.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


def tune_loggers() -> list[tune.Callback]:
    """Tune's own result files, which its result grid reads back (`result.json`, `progress.csv`); the record
    is MLflow's."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


@contextlib.contextmanager
def _tune_settings() -> Iterator[None]:
    """While Tune runs: `TUNE_SETTINGS`, and none of its own end-of-trial blocks on the terminal, which the live
    table replaces."""
    loggers = [logging.getLogger(name) for name in TUNE_ERROR_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with environment({**os.environ, **TUNE_SETTINGS}):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While Tune runs, SIGTERM (a cluster's job scheduler at its time limit, `kill`, `timeout`) stops the sweep as
    Ctrl-C does: Tune saves its state and stops its trials, and the parent run is closed KILLED with the trials
    `resume` continues. By default SIGTERM ends the driver at once, its parent run left RUNNING. A second one, as a
    second Ctrl-C, goes to the SIGINT handler Tune restored: KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:  # None: a handler set outside Python, which Python cannot set back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: `--address`, else RAY_ADDRESS; None to start a local one."""
    address = address or os.environ.get("RAY_ADDRESS")
    return None if address == "local" else address


# The reaper of what this process starts (its clusters), one for the life of the process.
_reaper: list[subprocess.Popen] = []

# Ray starts one idle worker per CPU for a new driver, without a runtime env; Tune gives every trial actor one (its
# env_vars), so no trial ever runs in them, and on 2 cores their start only delays the trial's own worker. A RayConfig
# entry, which Ray's processes read from their environment.
NO_PRESTART = {"RAY_prestart_worker_first_driver": "0"}


def connect(address: str | None) -> bool:
    """Join the cluster at `address` (already checked to answer), or start a local one when None.

    Returns True when the cluster was started here (then it is this machine, and its only node).
    """
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return False
    # A cluster started here serves this machine alone: its node address is the loopback, so what Ray binds
    # to that address (its three Prometheus metrics endpoints) answers on 127.0.0.1 only. Ray takes the
    # loopback where it would not span machines (its `ENABLE_RAY_CLUSTER` switch); restored once started.
    from ray._private import ray_constants

    spans = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    if not _reaper:  # it ends what is left of the cluster after this process
        _reaper.append(reaper.start())
    try:
        with environment({**NO_PRESTART, **cluster_environment(os.environ)}):  # what the cluster's processes inherit
            ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = spans
    token = Path.home() / ".ray" / "auth_token"  # the cluster's token, which Ray writes world-readable
    if token.is_file() and token.stat().st_uid == os.getuid():
        token.chmod(0o600)
    return True


def check_nodes(storage: str | Path, tracking_uri: str, timeout_s: float = 30.0) -> None:
    """After `ray.init`: every alive node sees the same storage folder and reaches the tracking store.

    A local `storage` path must be one shared folder (the same files on every node); the driver
    creates it and leaves a marker file that each node must see. SQLite tracking is refused on a
    cluster spanning machines: each machine would write its own file.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node["Alive"]]
    machines = {n["NodeManagerAddress"] for n in nodes}
    if single_machine_uri(tracking_uri) and len(machines) > 1:
        raise ConfigError(None, "tracking.uri", f"{tracking_uri} is a file on one machine, and this cluster spans "
                                                f"{len(machines)}: use an MLflow server (http://...) or a database "
                                                f"(postgresql://...)")
    folder = marker = None
    if not is_uri(str(storage)):
        path = Path(storage).expanduser().resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(None, "storage", f"cannot create {path}: {exc.strerror}") from None
        folder = str(path)
        # Under Ray Client the driver's disk is not the cluster's: only each node's own view is checked.
        if not ray.util.client.ray.is_connected():
            marker = f".adaptune-probe-{uuid.uuid4().hex}"
            (path / marker).touch()
    probe = ray.remote(num_cpus=0)(probe_node)
    try:
        refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(folder, marker, tracking_uri, n["NodeManagerAddress"]): n for n in nodes}
        done, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        problems = [p for ref in done for p in ray.get(ref)]
        problems += [("--address", f"node {refs[ref]['NodeManagerAddress']} did not answer within {timeout_s:.0f} s")
                     for ref in late]
        for ref in late:
            ray.cancel(ref, force=True)
    finally:
        if marker:
            (Path(folder) / marker).unlink(missing_ok=True)
    if problems:
        fields = sorted({field for field, _ in problems})
        raise ConfigError(None, " and ".join(fields), "; ".join(message for _, message in problems))


# What the Tune trial of a multi-worker trial holds itself (Tune refuses an empty request).
DRIVER_CPU = 0.01


def per_trial(sweep: SweepSpec) -> dict[str, float]:
    r = sweep.resources
    driver = DRIVER_CPU if r.workers_per_trial > 1 else 0.0
    return {"CPU": r.cpus_per_worker * r.workers_per_trial + driver, "GPU": r.gpus_per_trial * r.workers_per_trial}


def max_concurrent(sweep: SweepSpec, cluster: dict[str, float]) -> int:
    """As many trials as the cluster holds at once: its GPUs (or CPUs) over one trial's need."""
    need = per_trial(sweep)
    if need["GPU"] > cluster.get("GPU", 0):
        raise ConfigError(None, "resources.gpus_per_trial",
                          f"a trial needs {need['GPU']:g} GPUs; the cluster has {cluster.get('GPU', 0):g}")
    if need["CPU"] > cluster.get("CPU", 0):
        raise ConfigError(None, "resources.cpus_per_worker",
                          f"a trial needs {need['CPU']:g} CPUs; the cluster has {cluster.get('CPU', 0):g}")
    kind = "GPU" if need["GPU"] > 0 else "CPU"
    return max(1, math.floor(cluster[kind] / need[kind]))


def _tune_config(sweep: SweepSpec, points: list[Point], concurrency: int) -> tuple[dict[str, Any], Any]:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = sweep.scheduler
    scheduler = (ASHAScheduler(metric=s.metric, mode=s.mode, grace_period=s.grace_period,
                               reduction_factor=s.reduction_factor, max_t=10**9)
                 if s.type == "asha" else FIFOScheduler())
    if sweep.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(space=optuna_space(sweep), metric=sweep.search.metric, mode=sweep.search.mode,
                              seed=sweep.search.seed)
        config = tune.TuneConfig(search_alg=search, num_samples=sweep.search.num_samples, scheduler=scheduler,
                                 max_concurrent_trials=concurrency, reuse_actors=True)
        return {}, config
    space = {"point": tune.grid_search([{**redact(p.model_dump(mode="json")), "index": i}
                                        for i, p in enumerate(points)])}
    # Reused actors keep torch, transformers and DeepSpeed imported: ~9 s saved per trial here.
    return space, tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=concurrency, reuse_actors=True)


def _prepare_store(uri: str, experiment: str) -> None:
    """The store's tables and experiment, and mlflow's own import (3 s on 2 cores): both while Ray starts, which
    mostly waits on its processes."""
    from orchestrator import mlflow_sweep

    mlflow_sweep.prepare_store(uri, experiment)


@dataclass(frozen=True)
class SweepEnd:
    """How a `run` or `resume` left its sweep: a summary row per trial that has a run, the failed trials with their
    causes, and how many of the sweep's trials, started or not, did not finish (Ctrl-C stops Tune early)."""

    rows: list[dict[str, Any]]
    failures: list[tuple[str, str]]
    unfinished: int


def unfinished_trials(experiment_path: str, planned: int) -> int:
    """Of the `planned` trials, how many Tune neither finished nor failed (a scheduler's stop is an end) in the state
    it saved, the one `resume` restores, or never created.

    Not from the result grid `fit` returns: on Ctrl-C, Tune saves its state, then marks every trial it stops as it
    cleans up TERMINATED in memory, as if it had finished.
    """
    saved = tune.ExperimentAnalysis(experiment_path).trials
    return planned - sum(trial.status in ("TERMINATED", "ERROR") for trial in saved)


def run(sweep: SweepSpec, points: list[Point], file: Path, *, address: str | None, resume: bool,
        progress: bool = True) -> SweepEnd:
    """Run (or resume) a sweep until its trials end or Tune is interrupted."""
    root = experiment_dir(sweep)
    root.mkdir(parents=True, exist_ok=True)
    if not resume:
        (root / SWEEP_FILE).write_text(redacted_text(file))
    uri = sweep.tracking.uri  # checked by the command before it called here (`workers.store_check`)
    address = cluster_address(address)
    if address and not ray.is_initialized():
        check_address(address)
    with ThreadPoolExecutor(1) as pool:
        store = pool.submit(_prepare_store, uri, sweep.experiment)  # while Ray starts
        started_here = connect(address)
        store.result()
    from orchestrator import mlflow_sweep
    concurrency = max_concurrent(sweep, ray.cluster_resources())
    if not started_here:  # a cluster started here is this machine, which the checks above have seen
        check_nodes(root, uri)
    parent = mlflow_sweep.start_parent(uri, sweep, file, points, resume=resume)
    r = sweep.resources
    ctx = Context(sweep=sweep.model_dump(mode="json"), root=str(root), tracking_uri=uri,
                  experiment=sweep.experiment, parent_run_id=parent, workers=r.workers_per_trial,
                  gpus_per_worker=r.gpus_per_trial, cpus_per_worker=r.cpus_per_worker,
                  max_outage_s=sweep.tracking.max_outage_s,
                  points=tuple(p.model_dump(mode="json") for p in points))
    # A multi-worker trial's own actor only drives the Train run; its workers hold the resources.
    resources = ({"cpu": r.cpus_per_worker, "gpu": r.gpus_per_trial} if r.workers_per_trial == 1
                 else {"cpu": DRIVER_CPU})
    trainable = tune.with_resources(tune.with_parameters(trial_function, ctx=ctx), resources)
    callbacks = [*([ProgressTable()] if progress else []), *tune_loggers()]
    run_config = tune.RunConfig(name=sweep.name, storage_path=str(root.parent), callbacks=callbacks, verbose=0)
    tuner_dir = root / "tuner.pkl"
    if resume and tuner_dir.exists():
        tuner = tune.Tuner.restore(str(root), trainable, resume_unfinished=True, restart_errored=True)
    else:
        space, tune_config = _tune_config(sweep, points, concurrency)
        tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
    # Tune copies some of the driver's variables (AWS_*) into every trial's runtime env, which Ray logs in clear:
    # a cluster started here inherited what it needs already, so the driver holds no secret while Tune runs.
    kept_home = environment(without_secrets(os.environ)) if started_here else contextlib.nullcontext()
    with Heartbeat(root / HEARTBEAT), kept_home, _tune_settings(), terminate_as_interrupt():
        results = tuner.fit()
    # A trial out of memory is no Tune error (resume would retry it blindly), but the sweep did not finish it.
    failed = sorted(failures(results) + mlflow_sweep.out_of_memory(uri, parent))
    unfinished = unfinished_trials(results.experiment_path, len(points) or sweep.search.num_samples)
    rows = mlflow_sweep.finish_parent(uri, parent, failed=bool(failed), unfinished=unfinished,
                                      metric=sweep.search.metric, mode=sweep.search.mode)
    return SweepEnd(rows, failed, unfinished)
