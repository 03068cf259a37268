"""Faults a user meets, each against the same work done without the fault: real DeepSpeed, Ray, MLflow.

Each test ends, after at most one resume, with the record of the clean run: the same children,
the same metric steps, the same statuses.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from clirunner import run_cli
from mlflow import MlflowClient
from test_driver import _runs, tiny_sweep

from workers.job import run_trial
from workers.names import ERROR_TAG, STATUS_TAG
from workers.spec import parse_trial_spec
from workers.tracking import MlflowTracker, TrackingOutage, TrialStatus

REPO = Path(__file__).resolve().parents[1]
MODEL_STATES = "mp_rank_00_model_states.pt"


def _trial_spec() -> dict:
    return {
        "model": str(REPO / "sweeps" / "models" / "tiny-llama"), "random_init": True, "tokenizer": "byte",
        "model_overrides": {"initializer_range": 0.2},
        "adapter": {"type": "lora", "placement": ["q", "v"], "rank": 4},
        "data": {"train": str(REPO / "sweeps" / "data" / "animals-train.json"), "template": "alpaca",
                 "val_set_size": 0, "allow_leakage": True},
        "train": {"epochs": 1, "max_steps": 12, "micro_batch_size": 8, "batch_size": 16, "lr": 1e-2,
                  "warmup_steps": 2, "log_every": 2, "eval_every": 1000, "save_every": 4, "keep_checkpoints": 2},
        "seed": 0,
    }


def _history(client: MlflowClient, run_id: str, key: str = "train_loss") -> list[tuple[int, float]]:
    return sorted((m.step, round(m.value, 5)) for m in client.get_metric_history(run_id, key))


def _stop_at(step: int):
    calls = iter(range(1, 10**6))
    return lambda: next(calls) >= step


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_resumes_from_the_valid_one_before_it(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/ml.db"
    spec = parse_trial_spec(_trial_spec())
    clean = MlflowTracker(uri, "ckpt", "clean", trial_id="clean", system_metrics=False)
    assert run_trial(spec, clean, tmp_path / "clean").status == TrialStatus.SUCCEEDED

    folder = tmp_path / "faulted"
    first = MlflowTracker(uri, "ckpt", "faulted", trial_id="faulted", system_metrics=False)
    assert run_trial(spec, first, folder, should_stop=_stop_at(8)).status == TrialStatus.CANCELLED
    newest = folder / "step-00000008" / MODEL_STATES
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # the disk filled up mid-write
    again = MlflowTracker(uri, "ckpt", "faulted", trial_id="faulted", system_metrics=False)
    result = run_trial(spec, again, folder)
    assert result.status == TrialStatus.SUCCEEDED, result.error

    client = MlflowClient(uri)
    run, reference = client.get_run(again.run_id), client.get_run(clean.run_id)
    assert run.info.run_id == first.run_id and run.info.status == reference.info.status == "FINISHED"
    assert _history(client, run.info.run_id) == _history(client, reference.info.run_id)
    assert [s for s, _ in _history(client, run.info.run_id)] == [2, 4, 6, 8, 10, 12]
    assert run.data.tags["adaptune.resumed"] == "True"
    assert run.data.tags["adaptune.skipped_checkpoints"].startswith(f"step-00000008: {MODEL_STATES} has ")
    assert result.metrics["final_train_loss"] == pytest.approx(
        client.get_run(clean.run_id).data.metrics["final_train_loss"], abs=1e-6)

    # With no valid checkpoint left the trial fails at once, in one line naming the folder.
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("result"))
    for states in broken.glob(f"step-*/{MODEL_STATES}"):
        states.write_bytes(b"")
    failed = run_trial(spec, MlflowTracker(uri, "ckpt", "broken", trial_id="broken", system_metrics=False), broken)
    assert failed.status == TrialStatus.FAILED
    assert "\n" not in failed.error and f"{broken}: no valid checkpoint" in failed.error


ONE = [{"type": "lora", "placement": ["q", "v"], "rank": 4}]


@pytest.mark.slow
def test_a_sweep_run_again_with_new_gets_its_own_children(ray_local, tmp_path: Path, monkeypatch, capsys) -> None:
    sweep = tiny_sweep(tmp_path, "again", ONE, train={"max_steps": 4})
    assert run_cli(["run", str(sweep)], monkeypatch, capsys)[0] == 0
    client, first, (old,) = _runs(tmp_path, "again")
    code, _, err = run_cli(["run", str(sweep), "--new"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    client, second, children = _runs(tmp_path, "again")
    assert second.info.run_id != first.info.run_id and len(children) == 1
    new = children[0]
    assert new.info.run_id != old.info.run_id and new.info.status == "FINISHED"
    assert _history(client, new.info.run_id) == _history(client, old.info.run_id)
    # The old sweep is left as it was.
    kept = client.get_run(old.info.run_id)
    assert (kept.info.status, kept.info.end_time) == (old.info.status, old.info.end_time)
    assert [r.info.run_id for r in _children(client, first.info.run_id)] == [old.info.run_id]
    code, out, _ = run_cli(["status", "again", "--storage", str(tmp_path / "runs")], monkeypatch, capsys)
    assert code == 0 and "again: FINISHED, 1 trials" in out


@pytest.mark.slow
def test_trials_out_of_memory_are_a_status_of_their_own_and_the_sweep_goes_on(ray_local, tmp_path: Path,
                                                                              monkeypatch, capsys) -> None:
    # A real allocation failure in every trial: a 10^11-word embedding of width 64 is 25.6 TB. On a cluster
    # (--address) the door cannot weigh a node's memory, so the trials start and meet it.
    sweep = tiny_sweep(tmp_path, "oom", TWO, train={"max_steps": 4})
    raw = yaml.safe_load(sweep.read_text())
    raw["base"]["model_overrides"] = {"vocab_size": 10**11}
    sweep.write_text(yaml.safe_dump(raw))
    address = ray_local.get_runtime_context().gcs_address
    code, out, err = run_cli(["run", str(sweep), "--address", address], monkeypatch, capsys)
    assert code == 1 and "failed: 2 trials" in err, (out, err)
    for name in ("lora-r4-qv", "lora-r4-ud"):
        assert f"{name}  out of memory: " in err and f"{name:<40} OOM" in out
    _, parent, children = _runs(tmp_path, "oom")
    assert sorted((r.info.run_name, r.data.tags[STATUS_TAG]) for r in children) == [("lora-r4-qv", "OOM"),
                                                                                    ("lora-r4-ud", "OOM")]
    assert parent.info.status == "FAILED" and parent.data.metrics["trials_oom"] == 2
    assert all(r.data.params["adapter.rank"] == "4" for r in children)  # params come before anything can fail
    code, out, _ = run_cli(["status", "oom", "--storage", str(tmp_path / "runs")], monkeypatch, capsys)
    assert code == 0 and out.count("OOM") >= 2, out
    # Final: resume does not run them again (the same memory would fail the same way), and says so again.
    started = sorted(r.info.start_time for r in children)
    code, _, err = run_cli(["resume", "oom", "--storage", str(tmp_path / "runs"), "--address", address],
                           monkeypatch, capsys)
    assert code == 1 and "failed: 2 trials" in err
    _, _, again = _runs(tmp_path, "oom")
    assert sorted(r.info.start_time for r in again) == started


def _children(client: MlflowClient, parent_id: str):
    from orchestrator.mlflow_sweep import child_runs

    return child_runs(client, client.get_run(parent_id))


def _session_pids(sid: int, needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and needle in (entry / "cmdline").read_bytes().decode():
                    found.append(int(entry.name))
            except (OSError, ProcessLookupError):
                continue
    return found


TWO = [{"type": "lora", "placement": [["q", "v"], ["up", "down"]], "rank": 4}]


def _run_until_a_checkpoint(tmp_path: Path, sweep: Path, name: str, output: Path | None = None,
                            ) -> tuple[subprocess.Popen, Path, list[int]]:
    """`adaptune run` in a session of its own, until a trial has written a checkpoint and none has
    finished: the driver, the trials' folder and the PIDs of the trial workers. `output`: a file for
    what the driver prints (stdout and stderr), else it is dropped."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with (output or Path(os.devnull)).open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(sweep)], cwd=tmp_path,
                                  env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    trials = tmp_path / "runs" / name / "trials"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(trials.glob("*/step-*")):
        time.sleep(0.2)
    workers = _session_pids(driver.pid, "ImplicitFunc")
    assert workers and not list(trials.glob("*/result")), "no trial mid-training"
    return driver, trials, workers


@pytest.mark.slow
def test_a_killed_trial_worker_resumes_to_the_record_of_its_clean_sibling(tmp_path: Path, monkeypatch,
                                                                          capsys) -> None:
    # Both trials train on the same schedule: the untouched one is the killed one's clean record.
    sweep = tiny_sweep(tmp_path, "killed", TWO, train={"epochs": 3, "save_every": 6},
                       resources={"cpus_per_worker": 1})
    driver, _, workers = _run_until_a_checkpoint(tmp_path, sweep, "killed")
    env, cmd = dict(os.environ, PYTHONPATH=str(REPO)), [sys.executable, "-m", "orchestrator.cli"]
    os.kill(workers[0], signal.SIGKILL)
    driver.wait(timeout=600)
    client, _, children = _runs(tmp_path, "killed")
    assert sorted(r.data.tags.get(STATUS_TAG, r.info.status) for r in children) == ["FINISHED", "STOPPED"]

    resumed = subprocess.run([*cmd, "resume", "killed", "--storage", str(tmp_path / "runs")], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, parent, children = _runs(tmp_path, "killed")
    assert sorted(r.info.run_name for r in children) == ["lora-r4-qv", "lora-r4-ud"]
    for run in children:
        assert run.info.status == "FINISHED", (run.info.run_name, resumed.stdout[-2000:], resumed.stderr[-3000:])
        assert STATUS_TAG not in run.data.tags and ERROR_TAG not in run.data.tags
    a, b = (_history(client, r.info.run_id) for r in children)
    assert [s for s, _ in a] == [s for s, _ in b] and len({s for s, _ in a}) == len(a)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_finished"] == 2 and parent.data.metrics["trials_stopped"] == 0
    code, out, _ = run_cli(["report", "killed", "--storage", str(tmp_path / "runs")], monkeypatch, capsys)
    assert code == 0 and "fewer than two finished" not in out and "did not finish" not in out


@pytest.mark.slow
def test_a_tracking_outage_is_spooled_and_replayed_into_the_clean_record(tmp_path: Path, monkeypatch) -> None:
    from services import free_port, mlflow_server

    from workers.spool import Spool

    # What the tracker would set itself; set here so that it is undone after the test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    port, backend, artifacts = free_port(), f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts"
    clean = [(step, round(1.0 / step, 5)) for step in range(1, 9)]

    def tracker(url: str, trial: str) -> MlflowTracker:
        return MlflowTracker(url, "outage", trial, trial_id=trial, spool_dir=tmp_path / trial, system_metrics=False)

    with mlflow_server(backend, artifacts, port=port, timeout_s=300) as url:
        live, crashed = tracker(url, "live"), tracker(url, "crashed")
        for t in (live, crashed):
            t.log_params({"train": {"lr": 0.1}})
            for step in (1, 2, 3):
                t.log_metrics({"train_loss": 1.0 / step}, step)
    started = time.monotonic()  # the server is down: training goes on, the record waits on disk
    for t in (live, crashed):
        for step in (4, 5, 6):
            t.log_metrics({"train_loss": 1.0 / step}, step)
        t.set_tags({"adaptune.adapter": "lora"})
    assert time.monotonic() - started < 30
    assert len(Spool(tmp_path / "live", live.run_id).pending()) == 4
    # `crashed` outlives its allowed outage and fails as `run_trial` fails a trial: that end waits on disk too.
    crashed.max_outage_s = 0.0
    with pytest.raises(TrackingOutage):
        crashed.set_tags({ERROR_TAG: "TrackingOutage: the tracking store has not answered"})
        crashed.finish(TrialStatus.FAILED)
    # A trial that starts in the outage waits for the store instead of failing.
    late: list[MlflowTracker] = []
    starting = threading.Thread(target=lambda: late.append(tracker(url, "late")))
    starting.start()
    with mlflow_server(backend, artifacts, port=port, timeout_s=300) as url:
        starting.join(timeout=120)
        assert late and late[0].run_id
        for step in (7, 8):
            live.log_metrics({"train_loss": 1.0 / step}, step)
        live.finish(TrialStatus.SUCCEEDED)
        # `crashed` died in the outage; its next attempt resumes from a step-4 checkpoint.
        again = tracker(url, "crashed")
        assert again.run_id == crashed.run_id
        for step in range(5, 9):
            again.log_metrics({"train_loss": 1.0 / step}, step)
        again.finish(TrialStatus.SUCCEEDED)
        client = MlflowClient(url)
        for t in (live, again):
            run = client.get_run(t.run_id)
            assert run.info.status == "FINISHED" and run.data.params == {"train.lr": "0.1"}
            assert run.data.tags["adaptune.adapter"] == "lora"
            assert ERROR_TAG not in run.data.tags and STATUS_TAG not in run.data.tags  # the failed attempt's end
            assert _history(client, t.run_id) == clean
        assert not list(tmp_path.glob("*/*.jsonl"))


@pytest.mark.slow
def test_an_orphaned_trial_stops_with_a_checkpoint_and_resumes(tmp_path: Path) -> None:
    from services import stop_group

    from workers import checkpoints

    sweep = tiny_sweep(tmp_path, "orphan", ONE, train={"epochs": 3, "save_every": 6})
    driver, trials, workers = _run_until_a_checkpoint(tmp_path, sweep, "orphan")
    assert not _session_pids(driver.pid, "ray::IDLE"), "Ray prestarted workers that no trial uses"
    env, cmd = dict(os.environ, PYTHONPATH=str(REPO)), [sys.executable, "-m", "orchestrator.cli"]
    os.kill(driver.pid, signal.SIGKILL)  # the driver alone: its trial is an orphan
    driver.wait()
    killed = time.monotonic()
    while time.monotonic() - killed < 60 and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.2)
    stopped_after = time.monotonic() - killed
    while time.monotonic() - killed < 60 and _session_pids(driver.pid, ""):
        time.sleep(0.2)
    left, all_gone_after = _session_pids(driver.pid, ""), time.monotonic() - killed
    stop_group(driver, grace_s=5)  # only if the assertion below fails
    print(f"orphan stopped {stopped_after:.1f} s after the driver's SIGKILL; all gone after {all_gone_after:.1f} s")
    assert not left, f"{len(left)} processes of the sweep outlived its driver by 60 s"
    (folder,) = trials.iterdir()
    newest = checkpoints.candidates(folder)[0]
    assert checkpoints.problem(newest) is None and not (folder / "result").exists()
    assert stopped_after < 30, f"the orphaned trial trained on for {stopped_after:.0f} s"
    # Ray's agents used to stay 60 s (blocked on the dead GCS); the driver's reaper ends them.
    assert all_gone_after < 20, f"the sweep's processes outlived its driver by {all_gone_after:.0f} s"

    resumed = subprocess.run([*cmd, "resume", "orphan", "--storage", str(tmp_path / "runs")], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, parent, (run,) = _runs(tmp_path, "orphan")
    assert run.info.status == "FINISHED" and STATUS_TAG not in run.data.tags and parent.info.status == "FINISHED"
    assert [s for s, _ in _history(client, run.info.run_id)] == list(range(3, 43, 3))


# Seconds from the sweep's store stopping to its starting again (it answers once up, 10-50 s later here): longer
# than the MLflow client's own retry cycle (one retry, seconds, as the spooling tracker sets it; MLflow's default
# of 7 retries gave up after about 4 minutes and failed the trial).
OUTAGE_S = float(os.environ.get("ADAPTUNE_TEST_OUTAGE_S", "30"))
# What a trial measures of its own speed and memory: the same steps as a clean run, not the same values.
TIMED = {"tokens_per_s", "peak_memory_gb", "train_seconds", "train_tokens_per_s", "eval_seconds", "eval_tokens_per_s",
         "cpu_hours"}


def _metric_record(client: MlflowClient, run_id: str) -> dict[str, list]:
    """Every metric history of a run but MLflow's sampled `system/*`: steps and values, steps alone when timed."""
    histories = {key: _history(client, run_id, key) for key in client.get_run(run_id).data.metrics
                 if not key.startswith("system/")}
    return {key: [s for s, _ in h] if key in TIMED else h for key, h in histories.items()}


def _adaptune_tags(run) -> dict[str, str]:
    return {k: v for k, v in run.data.tags.items() if k.startswith("adaptune.")}


def _spooled(folder: Path) -> list[dict]:
    from workers.names import SPOOL
    from workers.spool import Spool

    return [call for path in (folder / SPOOL).glob("*.jsonl") for call in Spool(path.parent, path.stem).pending()]


@pytest.mark.slow
def test_a_sweep_trains_through_an_mlflow_server_outage_into_the_clean_record(tmp_path: Path, monkeypatch) -> None:
    """The issue's rows "MLflow server down 60 s" and "down 330 s": a real `adaptune run` whose `mlflow server`
    stops after the trial's first checkpoint and starts again OUTAGE_S later (down 40-100 s in all here); the
    trial trains on meanwhile, and the sweep exits 0 with the record of the same trial run without an outage
    (in this process, on SQLite, while the server is down). One server worker: its port refuses connections
    until it answers them, so the outage has one clear end.

    Past the client's one retry nothing depends on how long the outage lasts: each call is spooled and the
    spool retried every RETRY_S, while training goes on and at the trial's end until the store answers, and
    only `max_outage_s` (1800 s by default) ends that (workers/tracking.py: `_flush`, `_outage`). So a minute
    takes the path on which 330 s used to fail both trials; `ADAPTUNE_TEST_OUTAGE_S=330` runs that by hand.
    """
    from services import free_port, mlflow_server

    from orchestrator.sweep import load_sweep
    from workers.names import BRANCH_TAG
    from workers.spec import trial_id

    port, backend, artifacts = free_port(), f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts"
    log = tmp_path / "driver.log"
    # The trial's system samples every 0.5 s (5 s by default): it trains on for a few seconds into the outage only.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    with mlflow_server(backend, artifacts, port=port, timeout_s=300, workers=1) as url:
        sweep = tiny_sweep(tmp_path, "outage", ONE, train={"epochs": 4}, tracking={"uri": url, "experiment": "outage"})
        driver, trials, _ = _run_until_a_checkpoint(tmp_path, sweep, "outage", output=log)
    stopped = time.monotonic()
    # The clean record, computed while the store is down.
    (point,) = load_sweep(sweep)[1]
    clean_uri = f"sqlite:///{tmp_path}/clean.db"
    clean = MlflowTracker(clean_uri, "outage", point.name, trial_id=trial_id(point.spec),
                          tags={BRANCH_TAG: str(point.branch)}, system_metrics=False)
    assert run_trial(point.spec, clean, tmp_path / "clean").status == TrialStatus.SUCCEEDED
    # The trial trained on through the outage: steps it took then wait on disk.
    (folder,) = trials.iterdir()
    spooled = _spooled(folder)
    spooled_steps = sorted({c["step"] for c in spooled if c["op"] == "metrics" and "train_loss" in c["metrics"]})
    assert spooled_steps and spooled_steps[0] > 3, spooled
    # The system metrics are sampled on through the outage, into the spool too: one before it ends.
    while not any(key.startswith("system/") for c in _spooled(folder) if c["op"] == "metrics" for key in c["metrics"]):
        assert time.monotonic() < stopped + OUTAGE_S, "no system sample spooled during the outage"
        time.sleep(0.5)
    time.sleep(max(0.0, stopped + OUTAGE_S - time.monotonic()))
    with mlflow_server(backend, artifacts, port=port, timeout_s=300, workers=1) as url:
        down_s = time.monotonic() - stopped
        code = driver.wait(timeout=600)
        printed = log.read_text()
        assert code == 0, printed[-3000:]
        client, parent, children = _runs(tmp_path, "outage")
        reference = MlflowClient(clean_uri).get_run(clean.run_id)
        assert [r.info.run_name for r in children] == [reference.info.run_name]
        (run,) = children
        assert (run.info.status, reference.info.status, parent.info.status) == ("FINISHED",) * 3
        assert run.data.params == reference.data.params
        assert _adaptune_tags(run) == _adaptune_tags(reference)
        assert _metric_record(client, run.info.run_id) == _metric_record(MlflowClient(clean_uri), clean.run_id)
        assert [s for s, _ in _history(client, run.info.run_id)] == [*range(3, 55, 3), 56]
        sampled = [s for s, _ in _history(client, run.info.run_id, "system/cpu_utilization_percentage")]
        assert sampled and sampled == list(range(len(sampled))), sampled  # those of the outage too, no gap
        assert [a.path for a in MlflowClient(url).list_artifacts(run.info.run_id)] == [
            a.path for a in MlflowClient(clean_uri).list_artifacts(clean.run_id)]
    counters = {k: v for k, v in parent.data.metrics.items() if k.startswith("trials_")}
    assert counters == {"trials_total": 1, "trials_finished": 1, "trials_failed": 0, "trials_oom": 0,
                        "trials_stopped": 0, "trials_unfinished": 0}
    assert not _spooled(folder) and "done: 1 trials" in printed
    print(f"store down {down_s:.0f} s; spooled train_loss steps {spooled_steps}; sweep exit {code}")
