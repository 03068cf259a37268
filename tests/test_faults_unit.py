"""The logic behind fault recovery, without processes: checkpoint selection, labels, parent counters."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.mlflow_sweep import trial_counts
from orchestrator.report import Summary, Trial, group, unfinished, varied_params
from workers import checkpoints
from workers.checkpoints import CheckpointError


def _checkpoint(root: Path, step: int, payload: bytes = b"weights" * 100) -> Path:
    tmp = root / (checkpoints.TMP_PREFIX + checkpoints.tag(step))
    (tmp / "sub").mkdir(parents=True)
    (tmp / "mp_rank_00_model_states.pt").write_bytes(payload)
    (tmp / "sub" / "optim.pt").write_bytes(payload[::-1])
    final = root / checkpoints.tag(step)
    checkpoints.commit(tmp, final)
    return final


def test_a_committed_checkpoint_is_renamed_whole_and_valid(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path, 40)
    assert folder.name == "step-00000040" and not list(tmp_path.glob(".tmp-*"))
    assert checkpoints.problem(folder) is None
    assert checkpoints.newest_valid(tmp_path) == (folder, [])


def test_no_checkpoint_at_all_is_a_fresh_start(tmp_path: Path) -> None:
    assert checkpoints.newest_valid(tmp_path) == (None, [])


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda f: (f / "mp_rank_00_model_states.pt").write_bytes(b"weights"), "has 7 bytes, the manifest says 700"),
    (lambda f: (f / "sub" / "optim.pt").write_bytes(b"x" * 700), "sub/optim.pt does not match its checksum"),
    (lambda f: (f / "sub" / "optim.pt").unlink(), "sub/optim.pt is missing"),
    (lambda f: (f / "manifest.json").unlink(), "no manifest.json"),
    (lambda f: (f / "manifest.json").write_text("{"), "unreadable manifest.json"),
])
def test_the_newest_valid_checkpoint_wins_and_the_skipped_one_is_named(tmp_path: Path, damage, reason) -> None:
    older = _checkpoint(tmp_path, 40)
    newer = _checkpoint(tmp_path, 60)
    damage(newer)
    chosen, skipped = checkpoints.newest_valid(tmp_path)
    assert chosen == older
    assert [p for p, _ in skipped] == [newer] and reason in skipped[0][1]


def test_no_valid_checkpoint_is_one_line_naming_the_folder(tmp_path: Path) -> None:
    only = _checkpoint(tmp_path, 40)
    (only / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        checkpoints.newest_valid(tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path}: no valid checkpoint")
    assert "step-00000040: mp_rank_00_model_states.pt has 0 bytes" in message


def test_an_interrupted_write_is_never_a_candidate_and_is_pruned(tmp_path: Path) -> None:
    valid = _checkpoint(tmp_path, 20)
    (tmp_path / ".tmp-step-00000040").mkdir()  # the process died while writing step 40
    assert checkpoints.newest_valid(tmp_path) == (valid, [])
    _checkpoint(tmp_path, 60)
    _checkpoint(tmp_path, 80)
    checkpoints.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000060", "step-00000080"]


def test_a_replayed_step_replaces_its_old_checkpoint(tmp_path: Path) -> None:
    first = _checkpoint(tmp_path, 60, payload=b"a" * 10)
    (first / "mp_rank_00_model_states.pt").write_bytes(b"")  # damaged; the trial resumed from step 40
    again = _checkpoint(tmp_path, 60, payload=b"b" * 10)
    assert again == first and checkpoints.problem(again) is None


def _trial(name: str, status: str, **params: str) -> Trial:
    return Trial(name, name, status, dict(params), {}, name)


def test_labels_vary_only_by_params_that_differ_among_the_trials_that_have_them() -> None:
    base = {"adapter.type": "lora", "model": "m", "train.epochs": "1", "data.train": "t.json"}
    trials = [_trial("lora-a", "FINISHED", **base, **{"train.lr": "0.01"}),
              _trial("lora-b", "FINISHED", **base, **{"train.lr": "0.001"}),
              _trial("early", "FAILED")]  # failed before logging anything
    assert varied_params([dict(t.config_key()) for t in trials]) == ["train.lr"]
    assert [c.label for c in group(trials)] == ["lora-a lr=0.01", "lora-b lr=0.001", "early"]


def test_failed_trials_are_listed_apart() -> None:
    trials = [_trial("a", "FINISHED"), _trial("b", "OOM"), _trial("c", "STOPPED"), _trial("d", "SUCCEEDED")]
    summary = Summary("accuracy/macro", "max", group(trials), trials, {}, {})
    assert [t.name for t in unfinished(summary)] == ["b", "c"]


def test_parent_counters_are_recomputed_from_the_children_as_they_stand() -> None:
    statuses = ["FINISHED", "SUCCEEDED", "OOM", "FAILED", "STOPPED", "KILLED", "RUNNING"]
    assert trial_counts(statuses) == {"trials_total": 7, "trials_finished": 2, "trials_failed": 1,
                                      "trials_oom": 1, "trials_stopped": 2}
    assert trial_counts([]) == dict.fromkeys(
        ("trials_total", "trials_finished", "trials_failed", "trials_oom", "trials_stopped"), 0)


# --- one run per trial and attempt, in a real sqlite store ----------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('faults')}/ml.db"


def _parent(store: str, name: str) -> str:
    from mlflow import MlflowClient

    from workers.tracking import experiment_id

    client = MlflowClient(store)
    return client.create_run(experiment_id(client, "faults", store), run_name=name).info.run_id


def test_a_trial_is_looked_up_only_under_its_own_parent(store: str) -> None:
    from mlflow import MlflowClient

    from workers.tracking import MlflowTracker, TrialStatus

    old_parent, new_parent = _parent(store, "old"), _parent(store, "new")
    old = MlflowTracker(store, "faults", "t", trial_id="same-trial", parent_run_id=old_parent)
    old.log_metrics({"train_loss": 1.0}, step=1)
    old.finish(TrialStatus.SUCCEEDED)
    before = MlflowClient(store).get_run(old.run_id)
    new = MlflowTracker(store, "faults", "t", trial_id="same-trial", parent_run_id=new_parent)
    assert not new.resumed and new.run_id != old.run_id
    new.finish(TrialStatus.SUCCEEDED)
    after = MlflowClient(store).get_run(old.run_id)
    assert (after.info.status, after.info.end_time) == (before.info.status, before.info.end_time)
    again = MlflowTracker(store, "faults", "t", trial_id="same-trial", parent_run_id=new_parent)
    assert again.resumed and again.run_id == new.run_id


def test_a_new_attempt_clears_the_tags_of_the_last_ones_end(store: str) -> None:
    from mlflow import MlflowClient

    from orchestrator.mlflow_sweep import close_stragglers
    from workers.names import ERROR_TAG, STATUS_TAG
    from workers.tracking import MlflowTracker, TrialStatus

    parent = _parent(store, "sweep")
    first = MlflowTracker(store, "faults", "t", trial_id="retried", parent_run_id=parent)
    first.set_tags({ERROR_TAG: "ConnectionError: the store went away"})
    client = MlflowClient(store)
    close_stragglers(client, parent)  # the driver's end: the run left RUNNING becomes STOPPED
    assert client.get_run(first.run_id).data.tags[STATUS_TAG] == "STOPPED"
    second = MlflowTracker(store, "faults", "t", trial_id="retried", parent_run_id=parent)
    second.finish(TrialStatus.SUCCEEDED)
    run = client.get_run(second.run_id)
    assert run.info.status == "FINISHED"
    assert STATUS_TAG not in run.data.tags and ERROR_TAG not in run.data.tags


def test_out_of_memory_is_a_status_of_its_own(store: str) -> None:
    from mlflow import MlflowClient

    from orchestrator.mlflow_sweep import summary_rows
    from workers.tracking import MlflowTracker, TrialStatus

    parent = _parent(store, "oom-sweep")
    MlflowTracker(store, "faults", "big", trial_id="oom", parent_run_id=parent).finish(TrialStatus.OOM)
    MlflowTracker(store, "faults", "small", trial_id="ok", parent_run_id=parent).finish(TrialStatus.SUCCEEDED)
    client = MlflowClient(store)
    rows = summary_rows(client, client.get_run(parent))
    assert {r["trial"]: r["status"] for r in rows} == {"big": "OOM", "small": "FINISHED"}


# --- the tracking spool ---------------------------------------------------------------------------------------

def test_the_spool_delivers_in_order_and_keeps_what_an_outage_held_back(tmp_path: Path) -> None:
    from workers.spool import Spool

    delivered: list[int] = []
    up = {"store": True}

    def send(call: dict) -> None:
        if not up["store"]:
            raise ConnectionError("refused")
        delivered.append(call["n"])

    spool = Spool(tmp_path, "run")
    for n in range(3):
        spool.append({"n": n})
    assert spool.deliver(send, lambda exc: True) is None and delivered == [0, 1, 2]
    up["store"] = False
    for n in range(3, 6):
        spool.append({"n": n})
        assert isinstance(spool.deliver(send, lambda exc: True), ConnectionError)
    up["store"] = True
    reopened = Spool(tmp_path, "run")  # the next attempt of the trial, after a crash
    assert [c["n"] for c in reopened.pending()] == [3, 4, 5]
    assert reopened.deliver(send, lambda exc: True) is None
    assert delivered == list(range(6)) and not list(tmp_path.iterdir())


def test_a_call_the_store_refuses_for_good_is_dropped_and_raised(tmp_path: Path) -> None:
    from workers.spool import Spool

    def send(call: dict) -> None:
        if call["n"] == 1:
            raise ValueError("refused for good")

    spool = Spool(tmp_path, "run")
    for n in range(3):
        spool.append({"n": n})
    with pytest.raises(ValueError, match="for good"):
        spool.deliver(send, lambda exc: False)
    assert [c["n"] for c in spool.pending()] == [2]


@pytest.mark.filterwarnings("ignore:`report` is meant")  # Tune's report, called here outside a Tune session
def test_a_finished_trial_whose_record_waited_on_disk_delivers_it_when_resumed(tmp_path: Path, store: str,
                                                                              monkeypatch) -> None:
    """A trial that finished while the store was down, and failed waiting for it longer than `max_outage_s`,
    is not re-run by `resume` (its summary.json is there); its record is delivered from its spool then,
    and the run ends FINISHED with every step, without the failed wait's end (it was left STOPPED)."""
    import json

    from mlflow import MlflowClient
    from services import free_port
    from test_driver import tiny_sweep

    from orchestrator.mlflow_sweep import close_stragglers
    from orchestrator.sweep import experiment_dir, load_sweep
    from orchestrator.tune_driver import Context, _tracker, trial_function
    from workers.names import ERROR_TAG, SPOOL, STATUS_TAG, SUMMARY_FILE
    from workers.spec import trial_id
    from workers.spool import undelivered
    from workers.tracking import TrackingOutage, TrialStatus, mlflow_client

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # what the tracker sets, undone after the test
    sweep, (point,) = load_sweep(tiny_sweep(tmp_path, "late", [{"type": "lora", "placement": ["q", "v"], "rank": 4}]))
    parent, tid = _parent(store, "late"), trial_id(point.spec)
    ctx = Context(sweep=sweep.model_dump(mode="json"), root=str(experiment_dir(sweep)), tracking_uri=store,
                  experiment="faults", parent_run_id=parent, workers=1, gpus_per_worker=0, cpus_per_worker=1,
                  max_outage_s=0.0, points=(point.model_dump(mode="json"),))
    first = _tracker(ctx, point, tid)
    first.log_metrics({"train_loss": 1.0}, step=1)
    first.client = mlflow_client(f"http://127.0.0.1:{free_port()}")  # the store stops answering
    with pytest.raises(TrackingOutage):
        first.log_metrics({"train_loss": 0.5}, step=2)
    first.set_tags({ERROR_TAG: "TrackingOutage: the tracking store has not answered"})  # as run_trial's end
    with pytest.raises(TrackingOutage):
        first.finish(TrialStatus.FAILED)
    folder = experiment_dir(sweep) / "trials" / tid
    (folder / "result").mkdir()
    (folder / "result" / SUMMARY_FILE).write_text(json.dumps({"metrics": {"final_train_loss": 0.5}}))
    client = MlflowClient(store)
    close_stragglers(client, parent)  # the sweep's end, with its store back

    trial_function({"point": {"index": 0}}, ctx)  # `adaptune resume`
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and ERROR_TAG not in run.data.tags and STATUS_TAG not in run.data.tags
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")] == [(1, 1.0), (2, 0.5)]
    assert not undelivered(folder / SPOOL)


# --- the driver's heartbeat -----------------------------------------------------------------------------------

def test_a_trial_notices_a_still_heartbeat_and_not_a_beating_one(tmp_path: Path) -> None:
    import time

    from orchestrator.heartbeat import Heartbeat, driver_gone

    path = tmp_path / "driver.heartbeat"
    gone = driver_gone(path, stale_s=0.3)
    assert not gone()  # no driver to watch: a trial on its own
    with Heartbeat(path, interval_s=0.05):
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            assert not gone()
            time.sleep(0.05)
        killed = driver_gone(path, stale_s=0.3)
        assert not killed()
    assert gone() and killed()  # the driver ended: its heartbeat removed
    path.touch()  # a killed driver's, left behind
    still = driver_gone(path, stale_s=0.3)
    assert not still()
    time.sleep(0.1)
    assert not still()
    time.sleep(0.4)
    assert still()  # the driver stopped beating


def test_status_tells_a_beating_heartbeat_from_a_still_or_missing_one(tmp_path: Path) -> None:
    from orchestrator.heartbeat import Heartbeat, beating

    path = tmp_path / "driver.heartbeat"
    assert not beating(path, wait_s=0.3)
    with Heartbeat(path, interval_s=0.05):
        assert beating(path, wait_s=0.3)
    assert not path.exists()  # an ended driver removes it
    path.touch()  # a killed driver's, left behind
    assert not beating(path, wait_s=0.3)


# --- params first ---------------------------------------------------------------------------------------------

def test_a_trial_that_fails_before_training_has_its_params(tmp_path: Path) -> None:
    from workers.errors import ConfigError
    from workers.job import run_trial
    from workers.spec import parse_trial_spec
    from workers.tracking import MemoryTracker, TrialStatus

    spec = parse_trial_spec({"model": str(tmp_path / "no-such-model"), "tokenizer": "byte",
                             "adapter": {"type": "lora", "placement": ["q", "v"], "rank": 4},
                             "data": {"train": str(tmp_path / "missing.json")}, "seed": 3})
    tracker = MemoryTracker()
    with pytest.raises(ConfigError):
        run_trial(spec, tracker, tmp_path / "ckpt")
    assert tracker.status == TrialStatus.FAILED
    assert tracker.params["adapter.type"] == "lora" and tracker.params["seed"] == "3"
    assert "adaptune.error" in tracker.tags


def test_a_resume_under_another_code_version_keeps_the_first_params_and_tags_the_new(store: str) -> None:
    from mlflow import MlflowClient

    from workers.tracking import MlflowTracker, TrialStatus

    parent = _parent(store, "upgraded")
    first = MlflowTracker(store, "faults", "t", trial_id="upgraded", parent_run_id=parent, system_metrics=False)
    first.log_params({"provenance": {"git_sha": "aaa"}, "seed": 0})
    again = MlflowTracker(store, "faults", "t", trial_id="upgraded", parent_run_id=parent, system_metrics=False)
    again.log_params({"provenance": {"git_sha": "bbb"}, "seed": 0, "trainable_params": 8})
    again.finish(TrialStatus.SUCCEEDED)
    run = MlflowClient(store).get_run(again.run_id)
    assert run.data.params == {"provenance.git_sha": "aaa", "seed": "0", "trainable_params": "8"}
    assert run.data.tags["adaptune.resumed_with.provenance.git_sha"] == "bbb"
