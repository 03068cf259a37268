"""Tracking: flattening and redaction, the in-memory tracker, and MLflow runs in a real sqlite store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from workers.names import EXPERIMENT_KIND_TAG, MODEL_TRAINING, TRIAL_ID_TAG
from workers.redaction import REDACTED, redact
from workers.run_inputs import DatasetRecord
from workers.tracking import MemoryTracker, MlflowTracker, TrialStatus, flatten_params


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/ml.db"


REPO = Path(__file__).resolve().parents[1]


# --- flattening and redaction ---------------------------------------------------------------------------------

def test_flatten_params_dots_keys_and_writes_lists_as_json() -> None:
    flat = flatten_params({
        "adapter": {"type": "lora", "rank": 32, "placement": ["q", "v"], "dropout": 0.05},
        "train": {"lr": 3e-4, "max_steps": None, "gradient_checkpointing": False},
        "model_overrides": {},
        "seed": 42,
    })
    assert flat == {
        "adapter.type": "lora", "adapter.rank": "32", "adapter.placement": '["q", "v"]', "adapter.dropout": "0.05",
        "train.lr": "0.0003", "train.max_steps": "null", "train.gradient_checkpointing": "false",
        "model_overrides": "{}", "seed": "42",
    }


def test_flatten_params_cuts_long_values_at_mlflows_limit() -> None:
    assert len(flatten_params({"note": "x" * 10_000})["note"]) == 6000


@pytest.mark.parametrize(
    "key", ["token", "hf_token", "hub.token", "password", "db_passwd", "secret", "client_secret", "api_key",
            "apikey", "access_key", "private-key", "key", "credentials", "auth"],
)
def test_secret_keys_are_redacted_whatever_their_value(key: str) -> None:
    for value in ("plain", 123, ["a", "b"]):
        leaf = key.rsplit(".", 1)[-1]
        tree = {"hub": {leaf: value}} if "." in key else {key: value}
        flat = flatten_params(tree)
        assert flat == {key: REDACTED}


@pytest.mark.parametrize(
    "key", ["eval.max_new_tokens", "tokenizer", "train.keep_checkpoints", "adapter.mask_seed", "monkey",
            "data.train_on_inputs", "keys_total"],
)
def test_ordinary_keys_that_mention_tokens_or_keys_stay(key: str) -> None:
    assert flatten_params({key: 7}) == {key: "7"}


@pytest.mark.parametrize(
    "value",
    ["hf_abcdefghijklmnopqrstuvwx", "sk-abcdefghijklmnopqrstuvwxyz", "ghp_abcdefghijklmnopqrstuvwxyz0123",
     "AKIAABCDEFGHIJKLMNOP", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"],
)
def test_token_shaped_values_are_redacted_under_any_key(value: str) -> None:
    assert flatten_params({"note": value, "list": ["x", value]}) == {"note": REDACTED, "list": f'["x", "{REDACTED}"]'}


def test_credentials_in_urls_are_cut_out_but_the_rest_stays() -> None:
    flat = flatten_params({"uri": "postgresql://bob:s3cret@db:5432/ml", "model": "https://host/org/model"})
    assert flat == {"uri": f"postgresql://{REDACTED}@db:5432/ml", "model": "https://host/org/model"}


def test_redact_keeps_the_shape_of_a_tree() -> None:
    tree = {"a": [{"token": "t", "n": 1}], "b": None, "password": None}
    assert redact(tree) == {"a": [{"token": REDACTED, "n": 1}], "b": None, "password": None}


# --- the in-memory tracker ------------------------------------------------------------------------------------

def test_memory_tracker_records_everything(tmp_path: Path) -> None:
    tracker = MemoryTracker()
    tracker.log_params({"adapter": {"rank": 8}, "hf_token": "x"})
    tracker.log_metrics({"train_loss": 2.0, "lr": 1e-3}, step=1)
    tracker.log_metrics({"train_loss": 1.5}, step=2)
    tracker.log_artifact(tmp_path, "adapter")
    tracker.set_tags({"k": 1})
    tracker.finish(TrialStatus.SUCCEEDED)
    assert tracker.params == {"adapter.rank": "8", "hf_token": REDACTED}
    assert tracker.metrics == {"train_loss": [(1, 2.0), (2, 1.5)], "lr": [(1, 1e-3)]}
    assert tracker.artifacts == {"adapter": tmp_path} and tracker.tags == {"k": "1"}
    assert tracker.status == TrialStatus.SUCCEEDED


# --- MLflow ---------------------------------------------------------------------------------------------------

def test_a_run_holds_params_metric_histories_tags_and_artifacts(store: str, tmp_path: Path, monkeypatch) -> None:
    tracker = MlflowTracker(store, "tracking", "lora-r8", trial_id="t-basic", tags={"adaptune.sweep": "s"})
    client = MlflowClient(store)
    batches: list[int] = []
    log_batch = tracker.client.log_batch

    def counting(run_id, metrics=(), **kw):
        batches.append(len(metrics))
        return log_batch(run_id, metrics=metrics, **kw)

    monkeypatch.setattr(tracker.client, "log_batch", counting)
    tracker.log_params({"adapter": {"type": "lora", "rank": 8}, "train": {"lr": 3e-4}, "api_key": "k"})
    for step in (1, 2, 3):
        tracker.log_metrics({"train_loss": 3.0 - step, "lr": step * 1e-4, "tokens_per_s": 100.0 * step}, step)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter.safetensors").write_bytes(b"weights")
    (adapter / "adapter_config.json").write_text("{}")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"ok": True}))
    tracker.log_artifact(adapter)
    tracker.log_artifact(summary)
    tracker.log_artifact(summary, "extra/renamed.json")
    tracker.set_tags({"provenance.torch": "2.x", "mirror": "https://u:pw@host/x"})
    tracker.finish(TrialStatus.SUCCEEDED)

    assert batches == [0, 3, 3, 3, 0]  # params, one request per log point, tags
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "lora-r8"
    assert run.data.params == {"adapter.type": "lora", "adapter.rank": "8", "train.lr": "0.0003", "api_key": REDACTED}
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "train_loss")] == [
        (1, 2.0), (2, 1.0), (3, 0.0)]
    assert run.data.tags[TRIAL_ID_TAG] == "t-basic" and run.data.tags["adaptune.sweep"] == "s"
    assert run.data.tags["mirror"] == f"https://{REDACTED}@host/x"
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"adapter", "summary.json", "extra"}
    assert {a.path for a in client.list_artifacts(tracker.run_id, "adapter")} == {
        "adapter/adapter.safetensors", "adapter/adapter_config.json"}
    assert [a.path for a in client.list_artifacts(tracker.run_id, "extra")] == ["extra/renamed.json"]
    # A sqlite store keeps artifacts next to its database, never in the working directory.
    db_folder = Path(store.removeprefix("sqlite:///")).parent
    assert run.info.artifact_uri.startswith((db_folder / "mlartifacts").as_uri())
    assert (db_folder / "mlartifacts").is_dir()


def test_a_resumed_trial_reattaches_to_its_run_with_one_continuous_history(store: str) -> None:
    first = MlflowTracker(store, "tracking", "r", trial_id="t-resume")
    first.log_params({"train": {"lr": 0.1}})
    for step in range(1, 6):
        first.log_metrics({"train_loss": 1.0 / step}, step)
    # SIGKILL: the run is left RUNNING. The resumed trial restarts from its checkpoint at step 3.
    second = MlflowTracker(store, "tracking", "r", trial_id="t-resume")
    assert second.resumed and second.run_id == first.run_id
    second.log_params({"train": {"lr": 0.1}})
    for step in range(4, 9):
        second.log_metrics({"train_loss": 1.0 / step, "val_loss": 2.0}, step)
    second.finish(TrialStatus.SUCCEEDED)

    client = MlflowClient(store)
    runs = client.search_runs([first.experiment_id], filter_string=f"tags.`{TRIAL_ID_TAG}` = 't-resume'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(first.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(first.run_id, "val_loss")] == list(range(4, 9))


def test_a_trial_run_nests_under_its_sweep(store: str) -> None:
    client = MlflowClient(store)
    parent = client.create_run(client.get_experiment_by_name("tracking").experiment_id, run_name="sweep")
    child = MlflowTracker(store, "tracking", "trial-0", trial_id="t-child", parent_run_id=parent.info.run_id)
    child.finish(TrialStatus.SUCCEEDED)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id


@pytest.mark.parametrize(
    ("status", "mlflow_status"),
    [(TrialStatus.OOM, "FAILED"), (TrialStatus.FAILED, "FAILED"), (TrialStatus.CANCELLED, "KILLED")],
)
def test_trial_status_maps_to_the_run_status(status: TrialStatus, mlflow_status: str, store: str) -> None:
    tracker = MlflowTracker(store, "tracking", "r", trial_id=f"t-{status}")
    tracker.finish(status)
    assert MlflowClient(store).get_run(tracker.run_id).info.status == mlflow_status


def test_system_metrics_are_sampled_into_every_run(store: str, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = MlflowTracker(store, "tracking", "r", trial_id="t-system")  # on by default, CPU or GPU
    deadline = time.monotonic() + 20
    client = MlflowClient(store)
    while "system/cpu_utilization_percentage" not in client.get_run(tracker.run_id).data.metrics:
        assert time.monotonic() < deadline, "no system metrics logged"
        time.sleep(0.2)
    tracker.finish(TrialStatus.SUCCEEDED)


@pytest.mark.parametrize(("visible", "handles"), [
    (None, ["gpu0", "gpu1", "gpu2", "gpu3"]),  # unset: every GPU, as NVML counts them
    ("2,3", ["gpu2", "gpu3"]),                 # Ray's choice for a trial: its gpu_0 is the machine's GPU 2
    ("GPU-c0ffee,1", ["uuid:GPU-c0ffee", "gpu1"]),
    ("1,x,2", ["gpu1"]),                       # CUDA reads up to the first entry it cannot parse
    ("", None),                                # no GPU: no GPU metrics
])
def test_system_metrics_cover_the_trials_own_gpus(visible: str | None, handles: list[str] | None, store: str,
                                                  monkeypatch) -> None:
    """NVML numbers the machine's GPUs and ignores CUDA_VISIBLE_DEVICES: a trial's `system/gpu_0_*` was the
    machine's first GPU, whoever held it. A stand-in NVML of four GPUs."""
    import sys
    import types

    from mlflow.system_metrics.metrics import gpu_monitor

    from workers.system_metrics import SpooledSystemMetrics

    nvml = types.SimpleNamespace(NVMLError=RuntimeError, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 4,
                                 nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
                                 nvmlDeviceGetHandleByUUID=lambda uuid: f"uuid:{uuid}")
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(gpu_monitor, "pynvml", nvml, raising=False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monitor = SpooledSystemMetrics(lambda metrics, step: None, "0" * 32, store, interval_s=1.0, resumed=False)
    gpus = [m for m in monitor.monitors if isinstance(m, gpu_monitor.GPUMonitor)]
    assert (gpus[0].gpu_handles if gpus else None) == handles
    assert not gpus or gpus[0].num_gpus == len(handles)


# --- what MLflow's UI shows of a run --------------------------------------------------------------------------

def test_experiments_are_created_as_model_training(store: str) -> None:
    tracker = MlflowTracker(store, "kind", "r", trial_id="t-kind", system_metrics=False)
    tags = MlflowClient(store).get_experiment(tracker.experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING == "custom_model_development"
    tracker.finish(TrialStatus.SUCCEEDED)


def test_datasets_are_run_inputs_with_context_digest_and_size(store: str) -> None:
    tracker = MlflowTracker(store, "tracking", "r", trial_id="t-inputs", system_metrics=False)
    records = [DatasetRecord("animals-train", "training", "sweeps/data/animals-train.json", "0123456789ab", 24,
                             {"validation_rows": 16}),
               DatasetRecord("animals-test", "evaluation", "sweeps/data/animals-test.json", "ba9876543210", 40)]
    tracker.log_datasets(records)
    tracker.log_datasets(records)  # a resumed trial logs them again: still one input each
    inputs = MlflowClient(store).get_run(tracker.run_id).inputs.dataset_inputs
    seen = {(i.dataset.name, i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"],
             json.loads(i.dataset.source)["uri"], json.loads(i.dataset.profile)["num_rows"]) for i in inputs}
    assert len(inputs) == 2 and seen == {
        ("animals-train", "0123456789ab", "training", "sweeps/data/animals-train.json", 24),
        ("animals-test", "ba9876543210", "evaluation", "sweeps/data/animals-test.json", 40)}
    tracker.finish(TrialStatus.SUCCEEDED)


def test_a_trials_datasets_are_its_training_file_and_evaluation_sets(tmp_path: Path) -> None:
    from workers.run_inputs import file_digest, trial_datasets
    from workers.spec import parse_trial_spec

    data = REPO / "sweeps" / "data"
    spec = parse_trial_spec({"model": "m", "adapter": {"type": "prefix", "virtual_tokens": 4},
                             "data": {"train": str(data / "animals-train.json"),
                                      "eval": [str(data / "animals-test.json")]}, "eval": {"limit": 8}})
    stats = {"train_file": str(data / "animals-train.json"), "train_examples": 24, "val_examples": 16,
             "dropped_after_cutoff": 0, "train_tokens": 900}
    train, test = trial_datasets(spec, stats)
    assert (train.name, train.context, train.path, train.rows) == (
        "animals-train", "training", "sweeps/data/animals-train.json", 24)
    assert train.digest == file_digest(data / "animals-train.json") and len(train.digest) == 12
    assert (test.name, test.context, test.path, test.rows) == ("animals-test", "evaluation",
                                                                "sweeps/data/animals-test.json", 8)


def test_paths_in_the_checkout_are_recorded_relative_to_it(tmp_path: Path) -> None:
    from workers.repo_paths import relative_paths, repo_relative

    assert repo_relative(str(REPO / "sweeps" / "models" / "tiny-llama")) == "sweeps/models/tiny-llama"
    assert repo_relative(str(tmp_path / "model")) == str(tmp_path / "model")  # outside: unchanged
    assert repo_relative("huggyllama/llama-7b") == "huggyllama/llama-7b"  # a hub id
    spec = {"model": str(REPO / "m"), "seed": 0, "name": str(REPO / "not-a-path-field"),
            "data": {"train": str(REPO / "t.json"), "eval": [str(REPO / "e.json"), "gsm8k"]}}
    assert relative_paths(spec) == {"model": "m", "seed": 0, "name": str(REPO / "not-a-path-field"),
                                    "data": {"train": "t.json", "eval": ["e.json", "gsm8k"]}}
