"""The worker: DeepSpeed fine-tuning on CPU, resume after SIGKILL, MLflow records, errors."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from clirunner import run_cli
from safetensors.torch import load_file
from tiny_models import TINY_CONFIGS

from workers.errors import ConfigError
from workers.job import run_trial
from workers.spec import parse_trial_spec
from workers.tracking import MemoryTracker, MlflowTracker, TrialStatus, flatten_params

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = {
    "series": {"type": "series", "placement": ["mlp"], "bottleneck": 16},
    "parallel": {"type": "parallel", "placement": ["attn"], "bottleneck": 16},
    "prefix": {"type": "prefix", "virtual_tokens": 4},
    "lora": {"type": "lora", "placement": ["q", "k", "v", "up", "down"], "rank": 8, "dropout": 0.0},
    "mosa": {"type": "mosa", "placement": ["mlp"], "bottleneck": 16, "consistency_weight": 0.1},
}
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("job")
    for family in ("llama", "bloom", "gptj"):
        config = copy.deepcopy(TINY_CONFIGS[family])
        # Wider random weights give the output layer logits an adapter can move: with the default
        # 0.02 the frozen head caps them near uniform and every loss curve looks flat.
        config.initializer_range = 0.2
        config.save_pretrained(root / family)
    records = [
        {"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}", "answer": w}
        for _ in range(6) for w in WORDS
    ]
    (root / "train.json").write_text(json.dumps(records))
    return root


def spec_for(workdir: Path, family: str = "llama", adapter: dict | None = None, **train) -> dict:
    return {
        "model": str(workdir / family), "random_init": True, "tokenizer": "byte",
        "adapter": adapter or ADAPTERS["lora"],
        "data": {"train": str(workdir / "train.json"), "template": "alpaca", "cutoff_len": 96, "val_set_size": 8},
        "train": {"epochs": 3, "micro_batch_size": 4, "batch_size": 8, "lr": 3e-2, "warmup_steps": 2,
                  "log_every": 1, "eval_every": 5, "save_every": 5, **train},
        "seed": 0,
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "bloom"])
@pytest.mark.parametrize("method", list(ADAPTERS))
def test_training_lowers_the_loss(method: str, family: str, workdir: Path, tmp_path: Path) -> None:
    spec = parse_trial_spec(spec_for(workdir, family, ADAPTERS[method]))
    tracker = MemoryTracker()
    result = run_trial(spec, tracker, tmp_path / "ckpt")
    assert result.status == TrialStatus.SUCCEEDED, result.error
    losses = [v for _, v in tracker.metrics["train_loss"]]
    assert len(losses) == 15  # 40 examples / batch 8 = 5 steps per epoch, 3 epochs
    # A frozen random base leaves adapters little to work with: the drop is small but must be there.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02
    assert losses[-1] < losses[0]
    assert "val_loss" in tracker.metrics
    assert (result.adapter_dir / "adapter.safetensors").is_file()
    assert tracker.status == TrialStatus.SUCCEEDED


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_packed_training_learns_with_less_padding(family: str, workdir: Path, tmp_path: Path) -> None:
    # Answers of 1 to 32 words: examples of 150-350 tokens, so rows of one example carry padding.
    records = [{"instruction": f"Say {w} {k} times.", "input": "", "output": " ".join([w] * k)}
               for k in (1, 2, 4, 8, 16, 32) for w in WORDS]
    (tmp_path / "train.json").write_text(json.dumps(records))
    runs = {}
    for packing in (False, True):
        spec = spec_for(workdir, family, epochs=2)
        spec["data"].update(train=str(tmp_path / "train.json"), packing=packing, cutoff_len=512)
        tracker = MemoryTracker()
        result = run_trial(parse_trial_spec(spec), tracker, tmp_path / f"packing-{packing}")
        assert result.status == TrialStatus.SUCCEEDED, result.error
        runs[packing] = tracker.metrics
    packed, plain = runs[True], runs[False]
    mean = lambda values: sum(v for _, v in values) / len(values)  # noqa: E731
    # Measured: 0.12 packed (rows of 2-3 examples fill 400-510 of 512 positions) vs 0.25 unpacked.
    assert mean(packed["padding_share"]) < 0.6 * mean(plain["padding_share"])
    losses = [v for _, v in packed["train_loss"]]
    assert len(losses) < len(plain["train_loss"])  # the same examples in fewer, fuller rows: fewer steps
    assert losses[-1] < losses[0] - 0.05


def test_packing_on_a_family_that_cannot_take_it_is_refused(workdir: Path, tmp_path: Path) -> None:
    spec = spec_for(workdir, "bloom")
    spec["data"]["packing"] = True
    with pytest.raises(ConfigError, match=r"data\.packing.*bloom"):
        run_trial(parse_trial_spec(spec), MemoryTracker(), tmp_path / "ckpt")


def _curve(workdir: Path, tmp_path: Path, stage: int) -> list[float]:
    tracker = MemoryTracker()
    spec = parse_trial_spec(spec_for(workdir, adapter=ADAPTERS["parallel"], zero_stage=stage, epochs=1))
    assert run_trial(spec, tracker, tmp_path / f"zero{stage}").status == TrialStatus.SUCCEEDED
    return [v for _, v in tracker.metrics["train_loss"]]


@pytest.mark.slow
def test_zero_stages_give_the_same_loss_curve(workdir: Path, tmp_path: Path) -> None:
    reference = _curve(workdir, tmp_path, 0)
    for stage in (2, 3):
        assert _curve(workdir, tmp_path, stage) == pytest.approx(reference, rel=1e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_stopped_trial_resumes_to_the_uninterrupted_run_at_every_zero_stage(stage: int, workdir: Path,
                                                                              tmp_path: Path) -> None:
    """Stopped after step 3 (with its checkpoint), then run again: the same losses and adapter as a run never
    stopped. ZeRO-1 and 2 checkpoints hold DeepSpeed's loss scaler, which the safe loader refused: every
    resume of such a trial failed."""
    spec = parse_trial_spec(spec_for(workdir, zero_stage=stage, epochs=1, save_every=100))
    straight = MemoryTracker()
    reference = run_trial(spec, straight, tmp_path / "straight")
    steps = iter(range(1, 100))
    stopped = run_trial(spec, MemoryTracker(), tmp_path / "ckpt", should_stop=lambda: next(steps) >= 3)
    assert stopped.status == TrialStatus.CANCELLED and stopped.metrics == {"step": 3}
    resumed = MemoryTracker()
    result = run_trial(spec, resumed, tmp_path / "ckpt")
    assert result.status == TrialStatus.SUCCEEDED, result.error
    after_the_stop = [(step, loss) for step, loss in straight.metrics["train_loss"] if step > 3]
    assert [step for step, _ in resumed.metrics["train_loss"]] == [step for step, _ in after_the_stop] == [4, 5]
    assert [loss for _, loss in resumed.metrics["train_loss"]] == pytest.approx([loss for _, loss in after_the_stop],
                                                                               abs=1e-6)
    a = load_file(str(result.adapter_dir / "adapter.safetensors"))
    b = load_file(str(reference.adapter_dir / "adapter.safetensors"))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["prefix", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_curve(method: str, workdir: Path, tmp_path: Path) -> None:
    """`train.gradient_checkpointing` on every method: prefix tuning its own way (transformers' drops the
    cache that carries the prefix), the others transformers'. Packed rows, so 4-D masks go through too."""
    curves = []
    for checkpointing in (False, True):
        spec = spec_for(workdir, adapter=ADAPTERS[method], gradient_checkpointing=checkpointing, max_steps=3)
        spec["data"]["packing"] = True
        tracker = MemoryTracker()
        result = run_trial(parse_trial_spec(spec), tracker, tmp_path / f"checkpointing-{checkpointing}")
        assert result.status == TrialStatus.SUCCEEDED, result.error
        curves.append([v for _, v in tracker.metrics["train_loss"]])
    assert len(curves[0]) == 3
    assert curves[1] == pytest.approx(curves[0], rel=1e-4, abs=1e-5)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return env


def _write_spec(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec))
    return path


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 <args>` from the repository, on a free port; asserts it exits 0."""
    from services import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_processes_equal_one_with_doubled_accumulation(workdir: Path, tmp_path: Path) -> None:
    spec = spec_for(workdir, epochs=1, batch_size=8, save_every=100)
    spec_file = _write_spec(tmp_path / "trial.yaml", spec)
    single = run_trial(parse_trial_spec(spec), MemoryTracker(), tmp_path / "one")
    _torchrun("-m", "orchestrator.cli", "trial", str(spec_file), "--tracking-uri", f"sqlite:///{tmp_path}/ml.db",
              "--checkpoint-dir", str(tmp_path / "two"))
    two = json.loads((tmp_path / "two" / "result" / "summary.json").read_text())
    assert two["metrics"]["final_train_loss"] == pytest.approx(single.metrics["final_train_loss"], rel=1e-5)
    a = load_file(str(single.adapter_dir / "adapter.safetensors"))
    b = load_file(str(tmp_path / "two" / "result" / "adapter" / "adapter.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


# Under torchrun: each rank runs this; only rank 1 is told to stop (at its third optimizer step).
def test_every_rank_runs_as_many_validation_forwards_and_the_mean_is_the_rows(monkeypatch) -> None:
    """9 validation rows on 2 ranks, 4 a forward: rank 0 has 5 rows (two forwards), rank 1 has 4 (one). Under ZeRO-3
    every forward gathers the parameters from all ranks, so rank 0's second forward waited for good (on a real
    model: a tiny one's parameters are below ZeRO-3's persistence threshold and never gathered)."""
    from types import SimpleNamespace

    from workers import train

    losses = {i: float(i) for i in range(9)}  # row i's loss is i

    class Rows(dict):  # a dataset's columns, as long as its rows
        def __len__(self) -> int:
            return len(self["input_ids"])

    class Engine:  # the mean loss of the rows it is given, noting each forward
        def __init__(self) -> None:
            self.calls: list[list[int]] = []

        def eval(self) -> None: ...

        def train(self) -> None: ...

        def __call__(self, rows: list[int]) -> float:
            self.calls.append(rows)
            return sum(losses[r] for r in rows) / len(rows)

    monkeypatch.setattr(train, "to_device", lambda batch, device, dtype: batch)
    monkeypatch.setattr(train, "collate", lambda examples, pad: [e[0]["input_ids"] for e in examples])
    monkeypatch.setattr(train, "lm_loss", lambda engine, rows: engine(rows))
    sums = []
    for rank in (0, 1):
        engine = Engine()
        trainer = SimpleNamespace(data=SimpleNamespace(val=Rows(input_ids=list(range(9)), labels=list(range(9)))),
                                  engine=engine, spec=SimpleNamespace(train=SimpleNamespace(micro_batch_size=4)),
                                  rank=rank, world=2, pad_id=0, device="cpu", dtype=None,
                                  _mean_over_ranks=lambda total, count: (total, count))
        sums.append(train.Trainer.validation_loss(trainer))
        assert len(engine.calls) == 2, (rank, engine.calls)  # the most any rank needs
    total, count = (sum(x) for x in zip(*sums, strict=True))
    assert (total, count) == (sum(losses.values()), 9)  # the rank out of rows counted nothing


ONE_RANK_STOPS = """
import json, os, sys
from pathlib import Path
from workers.job import run_trial
from workers.spec import parse_trial_spec
from workers.tracking import MemoryTracker

rank, calls = int(os.environ["RANK"]), iter(range(1, 10**6))
tracker = MemoryTracker()
result = run_trial(parse_trial_spec(json.loads(Path(sys.argv[1]).read_text())), tracker, Path(sys.argv[2]),
                   should_stop=lambda: rank == 1 and next(calls) >= 3)
steps = [step for step, _ in tracker.metrics.get("train_loss", [])]
Path(sys.argv[2], f"rank-{rank}.json").write_text(json.dumps({"status": result.status, "steps": steps}))
"""


@pytest.mark.slow
def test_a_stop_seen_by_one_rank_stops_every_rank_at_the_same_step(workdir: Path, tmp_path: Path) -> None:
    """A multi-worker trial whose driver is gone: the rank that notices stops them all (no rank left
    waiting in a collective), with one checkpoint of that step."""
    from workers import checkpoints

    spec_file = _write_spec(tmp_path / "trial.json", spec_for(workdir, epochs=2, batch_size=8, save_every=100))
    script = tmp_path / "one_rank_stops.py"
    script.write_text(ONE_RANK_STOPS)
    _torchrun(str(script), str(spec_file), str(tmp_path / "ckpt"))
    ranks = [json.loads((tmp_path / "ckpt" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["status"] for r in ranks] == [TrialStatus.CANCELLED] * 2
    assert ranks[0]["steps"] == [1, 2, 3]  # rank 0 logs: it stopped at rank 1's step
    newest, skipped = checkpoints.newest_valid(tmp_path / "ckpt")
    assert not skipped and newest == checkpoints.candidates(tmp_path / "ckpt")[0]
    assert newest.name == checkpoints.tag(3)


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(workdir: Path, tmp_path: Path) -> None:
    spec = spec_for(workdir, adapter=ADAPTERS["series"], epochs=12, save_every=4, log_every=4, eval_every=1000)
    spec_file = _write_spec(tmp_path / "trial.yaml", spec)
    ckpt = tmp_path / "killed"
    cmd = [sys.executable, "-m", "orchestrator.cli", "trial", str(spec_file), "--tracking-uri",
           f"sqlite:///{tmp_path}/ml.db", "--checkpoint-dir", str(ckpt)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(ckpt.glob("step-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (ckpt / "result").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    reference = run_trial(parse_trial_spec(spec), MemoryTracker(), tmp_path / "straight")
    summary = json.loads((ckpt / "result" / "summary.json").read_text())
    assert summary["metrics"]["final_train_loss"] == pytest.approx(reference.metrics["final_train_loss"], abs=1e-6)
    a = load_file(str(ckpt / "result" / "adapter" / "adapter.safetensors"))
    b = load_file(str(reference.adapter_dir / "adapter.safetensors"))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    # One MLflow run, re-attached on resume, with one continuous history.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/ml.db")
    runs = client.search_runs([client.get_experiment_by_name("adaptune-trials").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    # Steps logged after the last checkpoint and before the kill are replayed, so they may appear twice.
    assert sorted(set(steps)) == list(range(4, 61, 4))


@pytest.mark.slow
def test_mlflow_run_has_params_metrics_and_artifacts(workdir: Path, tmp_path: Path, shared_data: Path) -> None:
    from mlflow import MlflowClient

    raw = spec_for(workdir, epochs=1)
    raw["data"].update(eval=["boolq"], data_root=str(shared_data))
    raw["eval"] = {"limit": 4, "max_new_tokens": 8}
    spec = parse_trial_spec(raw)
    uri = f"sqlite:///{tmp_path}/ml.db"
    tracker = MlflowTracker(uri, "exp", "lora-run", trial_id="t1")
    result = run_trial(spec, tracker, tmp_path / "ckpt")
    assert result.status == TrialStatus.SUCCEEDED
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["adapter.rank"] == "8" and params["train.lr"] == "0.03" and params["adapter.type"] == "lora"
    assert params["provenance.torch"] == version("torch") and params["provenance.adaptune"] == "0.1.0"
    assert int(params["trainable_params"]) == result.metrics["trainable_params"]
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    assert "accuracy/boolq" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "predictions", "summary.json", "spec.yaml"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} == {
        "adapter/adapter_config.json", "adapter/adapter.safetensors"}


def test_out_of_memory_is_classified(workdir: Path, tmp_path: Path, monkeypatch) -> None:
    from workers import train

    def boom(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train.Trainer, "_loss", boom)
    tracker = MemoryTracker()
    result = run_trial(parse_trial_spec(spec_for(workdir)), tracker, tmp_path / "ckpt")
    assert result.status == TrialStatus.OOM and tracker.status == TrialStatus.OOM
    assert "Tried to allocate 2.00 GiB" in result.error and "no CUDA device" in result.error


def test_a_model_the_host_cannot_hold_is_recorded_as_oom(workdir: Path, tmp_path: Path) -> None:
    # A real allocation failure, not a planted one: a 10^11-word embedding of width 64 is 25.6 TB.
    spec = spec_for(workdir)
    spec["model_overrides"] = {"vocab_size": 10**11}
    tracker = MemoryTracker()
    result = run_trial(parse_trial_spec(spec), tracker, tmp_path / "ckpt")
    assert result.status == TrialStatus.OOM and tracker.status == TrialStatus.OOM
    assert result.error.startswith("out of memory: ") and "can't allocate memory" in result.error


def test_secrets_never_reach_params(tmp_path: Path) -> None:
    flat = flatten_params({"model": "org/m", "hub": {"token": "hf_abcdefghijklmnopqrstuvwx", "user": "ann"},
                           "tracking": {"uri": "postgresql://bob:s3cret@db:5432/ml"},
                           "note": "sk-abcdefghijklmnopqrstuvwxyz", "api_key": 123})
    assert flat["hub.token"] == "***" and flat["api_key"] == "***" and flat["note"] == "***"
    assert "s3cret" not in flat["tracking.uri"] and flat["hub.user"] == "ann"
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/ml.db", "exp", "r", trial_id="t")
    tracker.log_params({"password": "pw", "model": "m"})
    from mlflow import MlflowClient

    params = MlflowClient(f"sqlite:///{tmp_path}/ml.db").get_run(tracker.run_id).data.params
    assert params == {"password": "***", "model": "m"}




@pytest.mark.parametrize(
    ("train", "needle"),
    [
        ({"zero_stage": 5}, "train.zero_stage"),
        ({"batch_size": 10, "micro_batch_size": 4}, "not a multiple of micro_batch_size"),
        ({"precision": "bf16"}, "train.precision: bf16 needs a GPU"),
    ],
)
def test_trial_cli_bad_input(train, needle, workdir, tmp_path, monkeypatch, capsys) -> None:
    spec_file = _write_spec(tmp_path / "t.yaml", spec_for(workdir, **train))
    code, _, err = run_cli(["trial", str(spec_file), "--tracking-uri", f"sqlite:///{tmp_path}/ml.db",
                         "--checkpoint-dir", str(tmp_path / "c")], monkeypatch, capsys)
    assert code == 2 and needle in err and "Traceback" not in err


def test_unreachable_tracking_uri_fails_before_the_model_loads(workdir, tmp_path, monkeypatch, capsys) -> None:
    spec_file = _write_spec(tmp_path / "t.yaml", spec_for(workdir))
    started = time.monotonic()
    code, _, err = run_cli(["trial", str(spec_file), "--tracking-uri", "http://127.0.0.1:9"], monkeypatch, capsys)
    assert code == 2 and "does not answer" in err and time.monotonic() - started < 30
    code, _, err = run_cli(["trial", str(spec_file), "--tracking-uri", "sqlite:////nonexistent/dir/ml.db"],
                        monkeypatch, capsys)
    assert code == 2 and "does not exist" in err


@pytest.mark.slow
def test_resuming_with_another_spec_is_refused(workdir, tmp_path, monkeypatch, capsys) -> None:
    ckpt = tmp_path / "c"
    run_trial(parse_trial_spec(spec_for(workdir, epochs=1)), MemoryTracker(), ckpt)
    changed = spec_for(workdir, epochs=1, lr=5e-3)
    changed["adapter"] = {**ADAPTERS["lora"], "rank": 4}
    spec_file = _write_spec(tmp_path / "t.yaml", changed)
    code, _, err = run_cli(["trial", str(spec_file), "--tracking-uri", f"sqlite:///{tmp_path}/ml.db",
                         "--checkpoint-dir", str(ckpt)], monkeypatch, capsys)
    assert code == 2 and "adapter.rank" in err and "train.lr" in err


# Validation losses by step, scripted so that the lowest (2.0) comes at step 5, in the middle of the
# run, and step 7 ties it: the earlier adapter must stay (the reference's Trainer keeps the first best).
SCRIPTED_VAL_LOSS = {1: 5.0, 2: 4.0, 3: 2.5, 4: 3.0, 5: 2.0, 6: 2.2, 7: 2.0, 8: 3.0, 9: 4.0, 10: 5.0}


def _scripted_validation(monkeypatch) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """Give every validation its scripted loss; record (step, adapter weights) at each."""
    from workers import train
    from workers.adapters.base import adapter_parameters

    seen: list[tuple[int, dict[str, torch.Tensor]]] = []
    original = train.Trainer.validation_loss

    def scripted(self):
        assert original(self) > 0  # the real pass still runs
        seen.append((self.global_step, {n: p.detach().clone() for n, p in adapter_parameters(self.engine.module)}))
        return SCRIPTED_VAL_LOSS[self.global_step]

    monkeypatch.setattr(train.Trainer, "validation_loss", scripted)
    return seen


@pytest.mark.slow
def test_load_best_saves_the_adapter_of_the_lowest_validation_loss(workdir, tmp_path, monkeypatch) -> None:
    spec = parse_trial_spec(spec_for(workdir, adapter=ADAPTERS["series"], epochs=2, eval_every=1, save_every=3,
                                     load_best=True))
    seen = _scripted_validation(monkeypatch)
    result = run_trial(spec, MemoryTracker(), tmp_path / "straight")
    assert result.status == TrialStatus.SUCCEEDED, result.error
    assert [step for step, _ in seen] == list(range(1, 11))  # 40 examples / batch 8 = 5 steps, 2 epochs
    assert result.metrics["val_loss"] == 2.0
    best, last = dict(seen)[5], dict(seen)[10]
    saved = load_file(str(result.adapter_dir / "adapter.safetensors"))
    assert set(best) <= set(saved)
    for name, tensor in best.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)
    assert any(not torch.equal(saved[n], t) for n, t in last.items())  # training moved on after step 5
    assert any(not torch.equal(dict(seen)[7][n], t) for n, t in best.items())  # the tie is another adapter

    # Stopped after step 6 (a checkpoint there; the best, step 5, on disk), then resumed: steps 7-10
    # bring no lower loss, and the resumed run ends on the first run's best.
    seen.clear()
    calls = iter(range(1, 100))
    stopped = run_trial(spec, MemoryTracker(), tmp_path / "resumed", should_stop=lambda: next(calls) == 6)
    assert stopped.status == TrialStatus.CANCELLED and [step for step, _ in seen] == list(range(1, 7))
    resumed = run_trial(spec, MemoryTracker(), tmp_path / "resumed")
    assert resumed.status == TrialStatus.SUCCEEDED, resumed.error
    assert [step for step, _ in seen] == list(range(1, 11)) and resumed.metrics["val_loss"] == 2.0
    again = load_file(str(resumed.adapter_dir / "adapter.safetensors"))
    for name in saved:
        torch.testing.assert_close(again[name], saved[name], rtol=0, atol=1e-6)


def test_the_peak_memory_counts_from_the_trials_start() -> None:
    """Tune runs trial after trial in one actor process: each trial's peak is its own, not the process's."""
    from workers.train import peak_memory_bytes, rank_device, reset_peak_memory

    device = rank_device()
    big = torch.ones(128 * 2**20)  # 512 MiB, held and freed, as an earlier trial's model
    del big
    before = peak_memory_bytes(device)
    reset_peak_memory(device)
    after = peak_memory_bytes(device)
    assert after < before - 400 * 2**20
    torch.ones(64 * 2**20)  # 256 MiB held by this "trial"
    assert peak_memory_bytes(device) > after + 200 * 2**20


def test_gpu_hours_count_the_share_of_a_gpu_each_rank_holds() -> None:
    """Four trials sharing one GPU for an hour (`gpus_per_trial: 0.25`) hold one GPU hour between them."""
    from workers.job import compute_hours
    from workers.names import CPU_HOURS, GPU_HOURS

    assert compute_hours(3600, 1, True, 0.25) == {GPU_HOURS: 0.25}
    assert compute_hours(3600, 2, True, 1.0) == {GPU_HOURS: 2.0}
    assert compute_hours(1800, 2, False, 1.0) == {CPU_HOURS: 1.0}


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_training_starts_from_the_initial_weights_and_a_fresh_adamw(stage: int) -> None:
    """DeepSpeed's unfused bf16 optimizer (no ZeRO, bf16: a GPU's default) takes an AdamW step on zero gradients as
    it starts: its masters decayed once, AdamW's step count at 1. Undone, its first real step is AdamW's first."""
    import deepspeed
    from transformers import get_linear_schedule_with_warmup

    from workers.train import init_distributed, undo_state_allocation_step

    init_distributed("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.bfloat16)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    copy = [p.detach().clone().requires_grad_() for p in model.parameters()]  # the same bf16 forward, by hand
    grads = torch.autograd.grad(torch.nn.functional.linear(x, *copy).float().pow(2).sum(), copy)
    adam = {"lr": 1e-2, "weight_decay": 0.5}
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {**adam, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config,
                                      lr_scheduler=lambda opt: get_linear_schedule_with_warmup(opt, 0, 10))
    undo_state_allocation_step(engine.optimizer)
    engine.backward(engine(x).float().pow(2).sum())
    engine.step()
    # AdamW's first step from the initial weights, in float32 as the masters: w - lr·wd·w - lr · g / (|g| + eps).
    reference = [torch.nn.Parameter(w.detach().float()) for w in copy]
    for ref, grad in zip(reference, grads, strict=True):
        ref.grad = grad.float()
    torch.optim.AdamW(reference, **adam).step()
    for p, ref in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.detach(), ref.detach().to(torch.bfloat16), rtol=0, atol=0)
