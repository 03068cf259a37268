"""Bad inputs through the CLI, as a new user would make them: each is one line naming the file and
the field, exit code 2, nothing written, and Ray never imported (the pre-flight needs no Ray, no
weights). Every case starts from a workspace whose sweep and trial pass, and breaks one thing."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from clirunner import run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = json.loads((REPO / "sweeps" / "models" / "tiny-llama" / "config.json").read_text())
SMALL = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 300}
FAMILY_CONFIGS = {
    "llama": TINY,
    "opt": {"model_type": "opt", **SMALL, "ffn_dim": 128},
    "bloom": {"model_type": "bloom", "hidden_size": 64, "n_head": 4, "n_layer": 2, "vocab_size": 300},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 300},
    "neox": {"model_type": "gpt_neox", **SMALL, "intermediate_size": 128},
    "falcon": {"model_type": "falcon", **SMALL},
    "huge": {**TINY, "hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 400,
             "head_dim": 1024, "num_attention_heads": 64, "num_key_value_heads": 64},
}


def _records(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"instruction": f"Is thing {i} an animal?", "input": "", "output": "true", "answer": "true", **extra}
            for i in range(n)]


@pytest.fixture(scope="module", autouse=True)
def _imported() -> None:
    """The modules a failing command reads, imported once: a case's time is its own checks."""
    import orchestrator.cluster
    import orchestrator.preflight  # noqa: F401
    import workers.tracking  # noqa: F401


@pytest.fixture
def ws(tmp_path: Path, monkeypatch) -> Path:
    """A workspace (the cwd): model folders of every family, a training and a test set."""
    for name, config in FAMILY_CONFIGS.items():
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text(json.dumps(_records(24)))
    (tmp_path / "data" / "test.json").write_text(json.dumps(_records(8)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ADAPTUNE_DATA", str(tmp_path / "data"))
    return tmp_path


def base_trial(ws: Path) -> dict[str, Any]:
    return {
        "model": str(ws / "models" / "llama"), "random_init": True, "tokenizer": "byte",
        "adapter": {"type": "lora", "placement": ["q", "v"], "rank": 4},
        "data": {"train": str(ws / "data" / "train.json"), "eval": [str(ws / "data" / "test.json")],
                 "val_set_size": 4, "allow_leakage": True},
        "train": {"epochs": 1, "micro_batch_size": 4, "batch_size": 8},
    }


def base_sweep(ws: Path) -> dict[str, Any]:
    trial = base_trial(ws)
    return {
        "name": "pf", "base": {k: v for k, v in trial.items() if k not in ("adapter", "train")},
        "train": trial["train"], "space": [dict(trial["adapter"])],
        "tracking": {"uri": f"sqlite:///{ws}/mlflow.db"}, "storage": str(ws / "runs"),
    }


def put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    for key in head:
        tree = tree.setdefault(key, {})
    tree[last] = value


def write(ws: Path, name: str, content: str | bytes) -> str:
    path = ws / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def garbage_store(ws: Path) -> None:
    (ws / "mlflow.db").write_bytes(b"this is not a database\n" * 40)


def foreign_store(ws: Path) -> None:
    with sqlite3.connect(ws / "mlflow.db") as con:
        con.execute("CREATE TABLE notes (x TEXT)")
    con.close()


def saved(ws: Path, raw: dict[str, Any]) -> None:
    """A sweep `pf` as `adaptune run` leaves it in runs/ (for resume, status, report)."""
    (ws / "runs" / "pf").mkdir(parents=True)
    (ws / "runs" / "pf" / "sweep.yaml").write_text(yaml.safe_dump(raw))


@dataclass(frozen=True)
class Case:
    """`edit(raw, ws)` breaks the sweep (or trial) dict and may add files; `command` says how it is run:
    run, dry, plan-sweep (the sweep file) or plan, trial (the trial file), or resume, status, report, eval."""

    id: str
    command: str
    field: str
    edit: Callable[[dict[str, Any], Path], Any]
    args: tuple[str, ...] = ()
    file: str | None = None  # the file the line names, when not the edited one


def _set(dotted: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    return lambda raw, ws: put(raw, dotted, value)


def _file(dotted: str, name: str, content: str | bytes) -> Callable[[dict[str, Any], Path], None]:
    return lambda raw, ws: put(raw, dotted, write(ws, name, content))


def _branch(**fields: Any) -> Callable[[dict[str, Any], Path], None]:
    return lambda raw, ws: raw["space"].__setitem__(0, fields)


def _model(name: str) -> Callable[[dict[str, Any], Path], None]:
    return lambda raw, ws: put(raw, "base.model", str(ws / "models" / name))


def _both(*edits: Callable[[dict[str, Any], Path], Any]) -> Callable[[dict[str, Any], Path], None]:
    return lambda raw, ws: [e(raw, ws) for e in edits] and None


NON_UTF8 = b'[{"instruction": "caf\xe9", "output": "x"}]'
NO_OUTPUT = json.dumps([{"instruction": "a question", "answer": "true"}])
NO_ANSWER = json.dumps([{"instruction": "a question", "output": "true"}])

SWEEP_CASES = [
    Case("train-missing", "run", "base.data.train", _set("base.data.train", "/nonexistent/train.json")),
    Case("train-empty", "run", "base.data.train", _file("base.data.train", "d/empty.json", "")),
    Case("train-not-json", "run", "base.data.train", _file("base.data.train", "d/bad.json", "{not json")),
    Case("train-not-utf8", "run", "base.data.train", _file("base.data.train", "d/latin1.json", NON_UTF8)),
    Case("train-no-output", "run", "base.data.train", _file("base.data.train", "d/fieldless.json", NO_OUTPUT)),
    Case("train-a-mapping", "run", "base.data.train", _file("base.data.train", "d/map.json", '{"a": 1}')),
    Case("train-empty-list", "run", "base.data.train", _file("base.data.train", "d/none.json", "[]")),
    Case("train-not-objects", "run", "base.data.train", _file("base.data.train", "d/ints.json", "[1, 2]")),
    Case("train-unknown-name", "run", "base.data.train", _set("base.data.train", "math_11k")),
    Case("train-named-set-absent", "run", "base.data.train", _set("base.data.train", "math_10k")),
    Case("train-not-given", "run", "base.data.train", lambda raw, ws: raw["base"]["data"].pop("train")),
    Case("eval-unknown-task", "run", "base.data.eval[0]", _set("base.data.eval", ["gsm9k"])),
    Case("eval-file-missing", "run", "base.data.eval[0]", _set("base.data.eval", ["/nonexistent/test.json"])),
    Case("eval-task-absent", "run", "base.data.eval[1]", lambda raw, ws: put(
        raw, "base.data.eval", [str(ws / "data" / "test.json"), "gsm8k"])),
    Case("eval-no-answer", "run", "base.data.eval[0]", lambda raw, ws: put(
        raw, "base.data.eval", [write(ws, "d/noanswer.json", NO_ANSWER)])),
    Case("eval-unscorable", "run", "base.data.eval[0]", lambda raw, ws: put(
        raw, "base.data.eval", [write(ws, "d/maybe.json", json.dumps(_records(3, answer="maybe")))])),
    Case("eval-not-json", "run", "base.data.eval[0]", lambda raw, ws: put(
        raw, "base.data.eval", [write(ws, "d/evalbad.json", "[{")])),
    Case("val-set-too-large", "run", "base.data.val_set_size", _set("base.data.val_set_size", 500)),
    Case("val-set-above-limit", "run", "base.data.val_set_size",
         _both(_set("base.data.limit_train", 4), _set("base.data.val_set_size", 4))),
    Case("batch-unfillable", "run", "train.batch_size", _set("train.batch_size", 64)),
    Case("leakage", "run", "base.data.allow_leakage", _set("base.data.allow_leakage", False)),
    Case("gpus-per-worker-above-one", "run", "resources.gpus_per_trial", _set("resources.gpus_per_trial", 2)),
    Case("gpu-share-for-several-workers", "run", "resources.workers_per_trial",
         _both(_set("resources.gpus_per_trial", 0.5), _set("resources.workers_per_trial", 2))),
    Case("model-folder-missing", "run", "base.model", _set("base.model", "/nonexistent/model")),
    Case("model-no-config", "run", "base.model", lambda raw, ws: put(
        raw, "base.model", str((ws / "models" / "empty").mkdir() or ws / "models" / "empty"))),
    Case("model-config-not-json", "run", "base.model", lambda raw, ws: (
        write(ws, "models/broken/config.json", "{oops"), put(raw, "base.model", str(ws / "models" / "broken")))),
    Case("model-config-a-list", "run", "base.model", lambda raw, ws: (
        write(ws, "models/list/config.json", "[1]"), put(raw, "base.model", str(ws / "models" / "list")))),
    Case("model-config-not-utf8", "run", "base.model", lambda raw, ws: (
        write(ws, "models/latin/config.json", b'{"model_type": "ll\xe1ma"}'),
        put(raw, "base.model", str(ws / "models" / "latin")))),
    Case("model-no-model-type", "run", "base.model", lambda raw, ws: (
        write(ws, "models/untyped/config.json", json.dumps(SMALL)),
        put(raw, "base.model", str(ws / "models" / "untyped")))),
    Case("model-no-hidden-size", "run", "base.model", lambda raw, ws: (
        write(ws, "models/shapeless/config.json", '{"model_type": "llama"}'),
        put(raw, "base.model", str(ws / "models" / "shapeless")))),
    Case("family-falcon", "run", "base.model", _model("falcon")),
    Case("family-override-unknown", "run", "base.model", _set("base.model_overrides", {"model_type": "mamba"})),
    Case("hub-id-offline", "run", "base.model", _set("base.model", "nobody/no-such-model-xyz")),
    Case("too-big-for-memory", "run", "base.model", _model("huge")),
    Case("gate-on-opt", "run", "space[0].placement",
         _both(_model("opt"), _branch(type="lora", placement=["gate"], rank=4))),
    Case("qv-on-bloom", "run", "space[0].placement", _both(_model("bloom"), _branch(type="lora", placement=["q", "v"],
                                                                                     rank=4))),
    Case("q-on-neox", "run", "space[0].placement",
         _both(_model("neox"), _branch(type="lora", placement=["q"], rank=4))),
    Case("series-gate-on-gpt2", "run", "space[0].placement",
         _both(_model("gpt2"), _branch(type="series", placement=["gate"], bottleneck=8))),
    Case("rank-1e9", "run", "space[0].rank", _branch(type="lora", placement=["q", "v"], rank=10**9)),
    Case("rank-above-kv", "run", "space[0].rank", _branch(type="lora", placement=["k"], rank=65)),
    Case("bottleneck-too-wide", "run", "space[0].bottleneck", _branch(type="series", placement=["mlp"],
                                                                      bottleneck=64)),
    Case("parallel-too-wide", "run", "space[0].bottleneck", _branch(type="parallel", placement=["attn"],
                                                                    bottleneck=100)),
    Case("second-branch", "run", "space[1].rank", lambda raw, ws: raw["space"].append(
        {"type": "lora", "placement": ["up"], "rank": [4, 500]})),
    Case("remote-code-unasked", "run", "base.trust_remote_code", _set("base.trust_remote_code", True)),
    Case("packing-on-bloom", "run", "base.data.packing", _both(_model("bloom"), _set("base.data.packing", True),
                                                               _branch(type="lora", placement=["o"], rank=4))),
    Case("bf16-on-cpu", "run", "train.precision", _set("train.precision", "bf16")),
    Case("tokenizer-missing", "run", "base.tokenizer", lambda raw, ws: raw["base"].pop("tokenizer")),
    Case("tokenizer-folder-missing", "run", "base.tokenizer", _set("base.tokenizer", "/nonexistent/tok")),
    Case("base-not-a-mapping", "run", "base", _set("base", "tiny")),
    Case("seed-not-int", "run", "seed", _set("seed", "abc")),
    Case("trial-name-escapes", "run", "base.name", _set("base.name", "../../x")),
    Case("trial-name-absolute", "run", "base.name", _set("base.name", "/tmp/x")),
    Case("sweep-name-escapes", "run", "name", _set("name", "../x")),
    Case("store-garbage", "run", "tracking.uri", lambda raw, ws: garbage_store(ws)),
    Case("store-not-mlflow", "run", "tracking.uri", lambda raw, ws: foreign_store(ws)),
    Case("store-unreachable", "run", "tracking.uri", _set("tracking.uri", "http://127.0.0.1:9")),
    Case("store-folder-missing", "run", "tracking.uri", _set("tracking.uri", "sqlite:////nonexistent/x/mlflow.db")),
    Case("storage-is-a-file", "run", "storage", lambda raw, ws: put(raw, "storage", write(ws, "afile", "x"))),
    Case("sweep-exists", "run", "name", lambda raw, ws: (ws / "runs" / "pf").mkdir(parents=True)),
    Case("dry-run-model-missing", "dry", "base.model", _set("base.model", "/nonexistent/model")),
    Case("dry-run-family", "dry", "base.model", _model("falcon")),
    Case("dry-run-remote-code", "dry", "base.trust_remote_code", _set("base.trust_remote_code", True)),
    Case("plan-sweep-train-missing", "plan-sweep", "base.data.train", _set("base.data.train", "/nonexistent/t.json")),
    Case("plan-sweep-eval-unknown", "plan-sweep", "base.data.eval[0]", _set("base.data.eval", ["gsm9k"])),
    Case("resume-model-missing", "resume", "base.model", lambda raw, ws: (
        put(raw, "base.model", "/nonexistent/model"), saved(ws, raw)), file="runs/pf/sweep.yaml"),
    Case("resume-unsafe-name", "resume", "NAME", lambda raw, ws: None, args=("../pf",), file=""),
    Case("status-store-garbage", "status", "tracking.uri", lambda raw, ws: (saved(ws, raw), garbage_store(ws)),
         file="runs/pf/sweep.yaml"),
    Case("status-store-unreachable", "status", "tracking.uri", lambda raw, ws: (
        put(raw, "tracking.uri", "http://127.0.0.1:9"), saved(ws, raw)), file="runs/pf/sweep.yaml"),
    Case("report-store-garbage", "report", "tracking.uri", lambda raw, ws: (saved(ws, raw), garbage_store(ws)),
         file="runs/pf/sweep.yaml"),
    Case("report-unsafe-name", "report", "NAME", lambda raw, ws: None, args=("/etc",), file=""),
]

TRIAL_CASES = [
    Case("plan-train-missing", "plan", "data.train", _set("data.train", "/nonexistent/t.json")),
    Case("plan-hub-offline", "plan", "model", _set("model", "nobody/no-such-model-xyz")),
    Case("plan-eval-unknown", "plan", "data.eval[0]", _set("data.eval", ["gsm9k"])),
    Case("plan-family", "plan", "model", _set("model", "MODELS/falcon")),
    Case("trial-train-missing", "trial", "data.train", _set("data.train", "/nonexistent/t.json")),
    Case("trial-spec-name-escapes", "trial", "name", _set("name", "../../x")),
    Case("trial-remote-code", "trial", "trust_remote_code", _set("trust_remote_code", True)),
    Case("trial-gate-on-opt", "trial", "adapter.placement", _both(
        _set("model", "MODELS/opt"), _set("adapter", {"type": "lora", "placement": ["gate"], "rank": 4}))),
    Case("trial-checkpoint-dir-a-file", "trial", "", lambda raw, ws: write(ws, "ckpt", "x"),
         args=("--checkpoint-dir", "ckpt"), file="--checkpoint-dir"),
    Case("trial-store-garbage", "trial", "", lambda raw, ws: garbage_store(ws),
         args=("--tracking-uri", "sqlite:///mlflow.db"), file="--tracking-uri"),
    Case("eval-model-without-weights", "eval", "", lambda raw, ws: None,
         args=("--model", "models/llama", "--tasks", "data/test.json"), file="--model"),
    Case("eval-command-unknown-task", "eval", "", lambda raw, ws: None,
         args=("--model", "models/llama", "--tasks", "gsm9k", "--random-init"), file="--tasks"),
]

CASES = SWEEP_CASES + TRIAL_CASES


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def prepare(case: Case, ws: Path) -> tuple[list[str], str]:
    """The command line of `case` and the file its error line must name."""
    trial = case in TRIAL_CASES
    raw = base_trial(ws) if trial else base_sweep(ws)
    case.edit(raw, ws)
    if trial and isinstance(raw.get("model"), str):
        raw["model"] = raw["model"].replace("MODELS", str(ws / "models"))
    path = ws / ("trial.yaml" if trial else "sweep.yaml")
    path.write_text(yaml.safe_dump(raw))
    command = {
        "run": ["run", str(path)], "dry": ["run", str(path), "--dry-run"], "plan-sweep": ["plan", str(path)],
        "plan": ["plan", str(path)], "trial": ["trial", str(path)], "eval": ["eval"],
        "resume": ["resume", "pf"], "status": ["status", "pf"], "report": ["report", "pf"],
    }[case.command]
    if case.args and case.command in ("resume", "report"):
        command = [case.command]
    file = case.file if case.file is not None else str(path)
    if case.file and case.file.startswith("runs/"):
        file = str(Path(case.file))
    return [*command, *case.args], file


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_one_line_exit_2_nothing_written_no_ray(case: Case, ws: Path, monkeypatch, capsys) -> None:
    args, file = prepare(case, ws)
    before = tree(ws)
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` fails the case: Ray never starts
    started = time.monotonic()
    code, out, err = run_cli(args, monkeypatch, capsys)
    elapsed = time.monotonic() - started
    line = err.strip()
    assert code == 2, f"exit {code}: {err[-1500:]}"
    assert out == ""
    assert "\n" not in line and "Traceback" not in line, line
    where = ": ".join(part for part in (file, case.field) if part) + ":"
    assert line.startswith(f"error: {where}"), line
    assert tree(ws) == before, "the command wrote files"
    assert elapsed < 3, f"{elapsed:.1f} s"


def test_the_unbroken_workspace_passes(ws: Path, monkeypatch, capsys) -> None:
    """The cases fail for what each breaks: the sweep and the trial they start from pass the pre-flight."""
    from orchestrator.preflight import check_trial, memory_bytes
    from workers.spec import parse_trial_spec

    sweep = ws / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(base_sweep(ws)))
    monkeypatch.setitem(sys.modules, "ray", None)
    code, out, err = run_cli(["run", str(sweep), "--dry-run"], monkeypatch, capsys)
    assert code == 0 and "1 trials" in out, err
    check_trial(parse_trial_spec(base_trial(ws)), "trial.yaml", training=True, trust_remote_code=False,
                memory=memory_bytes())
    assert not (ws / "runs").exists() and not (ws / "mlflow.db").exists()
