"""The sweep driver on a local Ray: expansion, a CPU sweep end to end, kill and resume, ASHA, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from clirunner import run_cli
from mlflow import MlflowClient

from orchestrator.mlflow_sweep import child_runs, find_parent
from orchestrator.sweep import load_sweep
from workers.names import INTERRUPTED_TAG, SWEEP_TAG

REPO = Path(__file__).resolve().parents[1]

EXAMPLE = """
name: placement-llama7b
base: {model: MODEL, data: {train: math_10k, eval: [gsm8k, svamp, aqua]}}
train: {epochs: 3, lr: 3e-4, zero_stage: 2}
space:
  - {type: series,   placement: [[attn], [mlp], [attn, mlp]], bottleneck: [64, 128, 256, 512]}
  - {type: parallel, placement: [[attn], [mlp], [attn, mlp]], bottleneck: [256]}
  - {type: lora,     placement: [[q, k, v], [up, down], [q, k, v, up, down]], rank: [4, 8, 16, 32, 64]}
  - {type: prefix,   virtual_tokens: [10, 30]}
search: {algorithm: grid}
scheduler: {type: fifo}
resources: {gpus_per_trial: 1, workers_per_trial: 1, cpus_per_worker: 4}
tracking: {uri: sqlite:///mlflow.db, experiment: placement-llama7b}
storage: ./runs
"""


def test_the_issue_example_expands_per_branch(tmp_path: Path, model_configs: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(EXAMPLE.replace("MODEL", str(model_configs / "llama-7b")))
    _, points = load_sweep(path)
    assert len(points) == 32
    assert Counter(p.branch for p in points) == {0: 12, 1: 3, 2: 15, 3: 2}
    assert len({p.name for p in points}) == 32
    assert {p.spec.train.zero_stage for p in points} == {2}
    assert points[0].name == "series-b64-attn" and points[-1].name == "prefix-v30"


def test_seeds_and_train_fields_are_axes(tmp_path: Path) -> None:
    raw = {"name": "s", "base": {"model": "m"}, "train": {"lr": [1e-3, 1e-4]}, "seed": [1, 2, 3],
           "space": [{"type": "lora", "placement": ["q", "v"], "rank": [4, 8]}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    _, points = load_sweep(tmp_path / "s.yaml")
    assert len(points) == 12
    assert "lora-r4-qv-lr0.001-s2" in {p.name for p in points}


def test_random_search_samples_distributions(tmp_path: Path) -> None:
    branch = {"type": "lora", "placement": ["q", "v"], "rank": [4, 8], "train": {"lr": {"loguniform": [1e-5, 1e-2]}}}
    raw = {"name": "s", "base": {"model": "m"}, "search": {"algorithm": "random", "num_samples": 5, "seed": 3},
           "space": [branch]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    _, points = load_sweep(tmp_path / "s.yaml")
    lrs = [p.spec.train.lr for p in points]
    assert len(points) == 5 and all(1e-5 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 5


def tiny_sweep(tmp_path: Path, name: str, space: list[dict], **extra) -> Path:
    """A sweep of seconds-long trials on the tiny LLaMA and the demo task, all paths absolute."""
    raw = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text())
    raw["name"] = name
    raw["base"]["model"] = str(REPO / "sweeps" / "models" / "tiny-llama")
    raw["base"]["data"]["train"] = str(REPO / "sweeps" / "data" / "animals-train.json")
    raw["base"]["data"]["eval"] = [str(REPO / "sweeps" / "data" / "animals-test.json")]
    raw["base"]["eval"] = {"max_new_tokens": 4, "limit": 8}
    raw["train"] = {"epochs": 1, "micro_batch_size": 8, "batch_size": 16, "lr": 1e-2, "warmup_steps": 2,
                    "log_every": 3, "eval_every": 3, "save_every": 3, **extra.pop("train", {})}
    raw["space"] = space
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": name}
    raw["storage"] = str(tmp_path / "runs")
    raw.update(extra)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


FOUR = [
    {"type": "lora", "placement": [["q", "v"], ["up", "down"]], "rank": 4},
    {"type": "series", "placement": ["mlp"], "bottleneck": 8},
    {"type": "prefix", "virtual_tokens": 4},
]




def _runs(tmp_path: Path, name: str):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = find_parent(client, name, name)
    return client, parent, child_runs(client, parent)


@pytest.mark.slow
def test_a_cpu_sweep_end_to_end(ray_local, tmp_path: Path, monkeypatch, capsys) -> None:
    sweep = tiny_sweep(tmp_path, "e2e", FOUR)
    code, out, err = run_cli(["run", str(sweep)], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    client, parent, children = _runs(tmp_path, "e2e")
    assert parent.info.status == "FINISHED" and parent.data.tags[SWEEP_TAG] == "e2e"
    assert sorted(r.info.run_name for r in children) == sorted(
        ["lora-r4-qv", "lora-r4-ud", "series-b8-mlp", "prefix-v4"])
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.params["adapter.type"] in ("lora", "series", "prefix")
        assert "accuracy/animals-test" in run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2
        assert {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} >= {
            "adapter/adapter_config.json", "adapter/adapter.safetensors"}
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/summary.csv" in report
    assert parent.data.metrics["total_cpu_hours"] > 0
    assert "adaptune ui" in out


@pytest.mark.slow
def test_kill_the_driver_then_resume_runs_every_trial_once(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path, "crash", FOUR, train={"epochs": 3})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "orchestrator.cli"]
    driver = subprocess.Popen([*cmd, "run", str(sweep)], cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = tmp_path / "runs" / "crash" / "trials"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(trials.glob("*/result/summary.json"))) < 1:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, as in a crash
    driver.wait()
    finished_before = {p: p.stat().st_mtime for p in trials.glob("*/result/summary.json")}
    assert 1 <= len(finished_before) < 4
    status = subprocess.run([*cmd, "status", "crash", "--storage", str(tmp_path / "runs")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert "crash: RUNNING in MLflow, its driver gone, " in status.stdout, status.stdout + status.stderr
    assert status.stdout.splitlines()[0].endswith("(adaptune resume crash)")
    resumed = subprocess.run([*cmd, "resume", "crash", "--storage", str(tmp_path / "runs")], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(list(trials.glob("*/result/summary.json"))) == 4
    assert all(p.stat().st_mtime == t for p, t in finished_before.items())  # never re-run
    _, parent, children = _runs(tmp_path, "crash")
    assert Counter(r.info.run_name for r in children) == Counter(
        ["lora-r4-qv", "lora-r4-ud", "series-b8-mlp", "prefix-v4"])
    assert all(r.info.status == "FINISHED" for r in children)
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stopped_run_exits_130_its_parent_killed_and_names_the_command_that_resumes(stop: str,
                                                                                       tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) makes Tune stop early and return. It used to end as a finished
    sweep: exit 0, "done" and the parent FINISHED with the trials that had started (2 of the demo's 8). SIGTERM to
    the driver (a job scheduler's limit) ended it at once, the parent left RUNNING. Now both close the parent
    KILLED with the count of unfinished trials and exit 130 naming them and `resume`, which finishes the sweep."""
    sweep = tiny_sweep(tmp_path, "ctrlc", FOUR, train={"epochs": 3})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "orchestrator.cli"]
    driver = subprocess.Popen([*cmd, "run", str(sweep)], cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trials = tmp_path / "runs" / "ctrlc" / "trials"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(trials.glob("*/result/summary.json")):
        time.sleep(0.2)
    if stop == "ctrl-c":
        os.killpg(driver.pid, signal.SIGINT)  # a terminal's Ctrl-C: the driver's whole process group
    else:
        driver.terminate()
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 130, err[-3000:]
    _, parent, _ = _runs(tmp_path, "ctrlc")
    assert parent.info.status == "KILLED"
    unfinished = int(parent.data.metrics["trials_unfinished"])
    assert 1 <= unfinished <= 4  # what Tune had not seen end when the signal came, never started ones included
    assert parent.data.tags[INTERRUPTED_TAG] == f"{unfinished} trials did not finish: adaptune resume ctrlc"
    assert "done:" not in out and "adaptune ui" not in out
    assert f"unfinished: {unfinished} trials; continue them: adaptune resume ctrlc --storage {tmp_path / 'runs'}" in err
    status = subprocess.run([*cmd, "status", "ctrlc", "--storage", str(tmp_path / "runs")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert status.stdout.startswith("ctrlc: KILLED, ") and status.stdout.splitlines()[0].endswith(
        f"trials ({unfinished} trials did not finish: adaptune resume ctrlc)"), status.stdout + status.stderr

    if stop == "sigterm":
        return  # what resume meets is the same
    resumed = subprocess.run([*cmd, "resume", "ctrlc", "--storage", str(tmp_path / "runs")], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, parent, children = _runs(tmp_path, "ctrlc")
    assert parent.info.status == "FINISHED" and INTERRUPTED_TAG not in parent.data.tags
    assert parent.data.metrics["trials_unfinished"] == 0 and parent.data.metrics["trials_finished"] == 4
    assert sorted(r.info.run_name for r in children if r.info.status == "FINISHED") == sorted(
        ["lora-r4-qv", "lora-r4-ud", "series-b8-mlp", "prefix-v4"])


@pytest.mark.slow
def test_asha_stops_a_planted_bad_trial(ray_local, tmp_path: Path, monkeypatch, capsys) -> None:
    space = [{"type": "lora", "placement": ["q", "k", "v", "o", "up", "down"], "rank": 8,
              "train": {"lr": [3e-2, 1e-9]}}]
    sweep = tiny_sweep(tmp_path, "asha", space, train={"epochs": 4, "log_every": 2, "eval_every": 2},
                       scheduler={"type": "asha", "metric": "val_loss", "grace_period": 1, "reduction_factor": 2},
                       resources={"cpus_per_worker": 2})
    code, _, err = run_cli(["run", str(sweep)], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    client, _, children = _runs(tmp_path, "asha")
    by_name = {r.info.run_name: r for r in children}
    bad, good = by_name["lora-r8-qkvoud-lr1e-09"], by_name["lora-r8-qkvoud-lr0.03"]
    assert good.info.status == "FINISHED"
    assert bad.info.status == "KILLED" and bad.data.tags["adaptune.status"] == "STOPPED"
    assert len(client.get_metric_history(bad.info.run_id, "train_loss")) < len(
        client.get_metric_history(good.info.run_id, "train_loss"))


BAD = [
    ({"space": [{"type": "dora", "placement": ["q"], "rank": 4}]}, "space[0]", "unknown adapter type"),
    ({"space": [{"type": "lora", "placement": [["qq"]], "rank": 4}]}, "space[0].placement", "qq"),
    ({"space": [{"type": "series", "placement": ["mlp"], "bottleneck": 8, "rank": [4]}]}, "space[0].rank",
     "does not take"),
    ({"space": [{"type": "lora", "placement": ["q", "v"], "rank": []}]}, "space[0].rank", "empty axis"),
    ({"space": [{"type": "lora", "placement": ["q", "v"], "rank": ["big"]}]}, "space[0].rank", "integer"),
    ({"resources": {"gpus_per_trial": 1, "workers_per_trial": 4}}, "resources.gpus_per_trial", "this machine has"),
    ({"search": {"algorithm": "hyperband"}}, "search.algorithm", "hyperband"),
    ({"scheduler": {"type": "asha", "metric": "accuracy"}}, "scheduler.metric", "accuracy"),
    ({"storage": "/proc/adaptune-runs"}, "storage", ""),
    ({"tracking": {"uri": "http://127.0.0.1:9"}}, "tracking.uri", ""),
]


@pytest.mark.parametrize(("override", "field", "needle"), BAD)
def test_bad_sweeps_fail_before_ray_with_one_line(override, field, needle, tmp_path, monkeypatch, capsys) -> None:
    raw = yaml.safe_load(tiny_sweep(tmp_path, "bad", FOUR).read_text())
    raw.update(override)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    started = time.monotonic()
    code, _, err = run_cli(["run", str(path)], monkeypatch, capsys)
    assert code == 2, err
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"error: {path}: {field}"), line
    assert needle in line
    assert time.monotonic() - started < 30
    assert not (tmp_path / "runs" / "bad").exists()


def test_a_second_sweep_of_the_same_name_needs_resume_or_new(tmp_path, monkeypatch, capsys) -> None:
    path = tiny_sweep(tmp_path, "dup", FOUR)
    (tmp_path / "runs" / "dup").mkdir(parents=True)
    code, _, err = run_cli(["run", str(path)], monkeypatch, capsys)
    assert code == 2 and "adaptune resume dup" in err and "--new" in err


@pytest.mark.parametrize("command", [["resume", "live", "--storage", "{runs}"],
                                     ["run", "{file}", "--new", "--dry-run"]])
def test_a_sweep_whose_driver_beats_is_not_resumed_or_restarted_beside_it(command, tmp_path, monkeypatch,
                                                                          capsys) -> None:
    """A second driver on a running sweep (resume in another terminal, run --new moving its folder away) would run
    its trials twice into one record: refused in one line while the driver's heartbeat changes."""
    from orchestrator.heartbeat import Heartbeat
    from orchestrator.sweep import redacted_text

    path = tiny_sweep(tmp_path, "live", FOUR)
    root = tmp_path / "runs" / "live"
    root.mkdir(parents=True)
    (root / "sweep.yaml").write_text(redacted_text(path))
    args = [a.format(runs=tmp_path / "runs", file=path) for a in command]
    with Heartbeat(root / "driver.heartbeat", interval_s=0.1):
        code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "sweep 'live' is running: its driver beats in" in err, err
    assert root.exists() and not list(tmp_path.glob("runs/live.old-*"))
    assert not (root / "driver.heartbeat").exists()  # an ended driver removes its heartbeat
    if command[0] == "run":
        assert run_cli(args, monkeypatch, capsys)[0] == 0


def test_dry_run_lists_the_trials(tmp_path, monkeypatch, capsys) -> None:
    code, out, _ = run_cli(["run", str(tiny_sweep(tmp_path, "dry", FOUR)), "--dry-run"], monkeypatch, capsys)
    assert code == 0 and "4 trials" in out and "prefix-v4" in out
    assert not (tmp_path / "runs").exists()


def test_status_of_an_unknown_sweep_exits_2_naming_it(tmp_path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(["status", "nope", "--storage", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and "no sweep named 'nope'" in err


@pytest.mark.slow
def test_a_multi_worker_trial_runs_through_ray_train(ray_local, tmp_path: Path, monkeypatch, capsys) -> None:
    space = [{"type": "lora", "placement": ["q", "v"], "rank": 4}]
    sweep = tiny_sweep(tmp_path, "ddp", space, resources={"workers_per_trial": 2, "cpus_per_worker": 0.5})
    code, _, err = run_cli(["run", str(sweep)], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    client, parent, children = _runs(tmp_path, "ddp")
    assert [r.info.run_name for r in children] == ["lora-r4-qv"]
    run = children[0]
    assert run.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert "accuracy/animals-test" in run.data.metrics
    summary = next((tmp_path / "runs" / "ddp" / "trials").glob("*/result/summary.json"))
    assert "adapter" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert summary.is_file()


@pytest.mark.slow
def test_failed_trials_make_run_exit_1_with_their_names_and_causes(ray_local, tmp_path, monkeypatch, capsys) -> None:
    path = tiny_sweep(tmp_path, "fails", [{"type": "lora", "placement": [["q", "v"], ["up", "down"]], "rank": 4}])
    raw = yaml.safe_load(path.read_text())
    raw["base"]["data"]["cutoff_len"] = 8  # every prompt is longer: no response token is left to train on
    path.write_text(yaml.safe_dump(raw))
    code, out, err = run_cli(["run", str(path)], monkeypatch, capsys)
    assert code == 1, err[-2000:]
    table = err.rstrip().splitlines()[-3:]  # the closing lines: the failed trials by name, with their causes
    assert table[0] == "failed: 2 trials"
    assert [line.split()[0] for line in table[1:]] == ["lora-r4-qv", "lora-r4-ud"]
    assert all("data.cutoff_len" in line for line in table[1:])  # a ConfigError crossed Ray whole
    assert "done: 2 trials" in out


def test_a_trials_errors_cross_ray_whole(tmp_path: Path) -> None:
    """A ConfigError raised in a trial reaches the driver with its file, field and message (it once
    arrived as `TypeError: ConfigError.__init__() missing 2 required positional arguments`)."""
    import pickle

    from ray import cloudpickle
    from ray.exceptions import RayTaskError

    from orchestrator.tune_driver import failures
    from workers.errors import ConfigError, TrialFailed

    error = RayTaskError("trial_function", "Traceback ...", ConfigError("/d/x.json", "data.cutoff_len", "too short"))
    crossed = cloudpickle.loads(cloudpickle.dumps(error.as_instanceof_cause()))
    assert isinstance(crossed.cause, ConfigError) and crossed.cause.field == "data.cutoff_len"

    class Result:
        def __init__(self, err, point) -> None:
            self.error, self.config, self.path = err, {"point": point}, "/r/trial_function_0001"

    _, points = load_sweep(tiny_sweep(tmp_path, "x", FOUR))
    rows = failures([Result(crossed, points[0].model_dump(mode="json")),
                     Result(pickle.loads(pickle.dumps(TrialFailed("StopIteration (no message) at p.py:3"))),
                            points[1].model_dump(mode="json")),
                     Result(None, points[2].model_dump(mode="json"))])
    assert rows == sorted([(points[0].name, "/d/x.json: data.cutoff_len: too short"),
                           (points[1].name, "StopIteration (no message) at p.py:3")])


def test_a_trial_holds_the_gpus_it_is_given_and_sees_none_when_given_none(monkeypatch) -> None:
    """Ray Train gives each worker one whole GPU unless told, and leaves CUDA_VISIBLE_DEVICES as it is for a task of
    no GPU (on a GPU node such a trial trained on the first GPU)."""
    import dataclasses

    from orchestrator.tune_driver import Context, hide_gpus_unless_given, worker_resources

    ctx = Context(sweep={}, root="/r", tracking_uri="sqlite:///m.db", experiment="e", parent_run_id="p", workers=2,
                  gpus_per_worker=1.0, cpus_per_worker=4.0, max_outage_s=1.0)
    assert worker_resources(ctx) == {"CPU": 4.0, "GPU": 1.0}
    cpu = dataclasses.replace(ctx, gpus_per_worker=0.0)
    assert worker_resources(cpu) == {"CPU": 4.0}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    hide_gpus_unless_given(ctx)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # Ray's choice for a trial given GPUs stands
    hide_gpus_unless_given(cpu)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
