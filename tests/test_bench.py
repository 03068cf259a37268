"""The GPU suite's code paths run on a CPU (`--tiny`): a GPU run cannot fail on a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def test_overlap_rates_count_only_the_shared_window() -> None:
    from gpu_suite import overlap_rates

    a = {"step_ends": [0.0, 1.0, 2.0, 3.0, 4.0], "tokens_per_step": 10}
    b = {"step_ends": [1.5, 2.5, 3.5, 4.5, 5.5], "tokens_per_step": 20}
    # After one warm-up step each, the window is (1.5, 4.0]: a's steps end at 2, 3, 4 in it, b's at 2.5, 3.5.
    total, window = overlap_rates([a, b], warmup=1)
    assert window == 2.5
    assert total == pytest.approx((3 * 10 + 2 * 20) / 2.5)
    with pytest.raises(ValueError):
        overlap_rates([a, {"step_ends": [5.0, 6.0], "tokens_per_step": 1}], warmup=1)


def test_matched_bottleneck_gives_loras_trainable_parameters() -> None:
    from train_throughput import matched_bottleneck

    # LLaMA-7B: LoRA r32 on q, k, v, up, down trains 56,098,816 (README); a d -> b -> d adapter per layer 2·d·b.
    assert abs(32 * 2 * 4096 * matched_bottleneck("7b") - 56_098_816) < 2 * 4096 * 32


@pytest.mark.slow
def test_gpu_suite_tiny_runs_every_part(tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    # Budgets scaled up: a loaded CI machine must not turn a slow unit into a failure; the timings are in the JSON.
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--tiny", "--out", str(out),
                           "--budget-scale", "8"], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    train = report["parts"]["train-7b"]
    assert {k: v.get("error") for k, v in train["variants"].items() if "error" in v} == {}
    assert all(v["tokens_per_s"] > 0 for v in train["variants"].values())
    assert {"ours-lora-compiled/peft-compiled", "ours-series/ours-lora"} <= set(train["ratios"])
    ev = report["parts"]["eval"]
    assert "error" not in ev
    assert ev["gsm8k"]["prompts"] == 16 and ev["gsm8k"]["generated_tokens"] > 0
    for batch in ("b1", "b8"):
        assert set(ev["methods"][batch]) == {"ours_static", "ours", "generate_batched", "generate_static"}
        # Ours and generate's static calls share one compiled function: its warm-ups leave nothing to compile.
        assert [row.get("invalid") for row in ev["methods"][batch].values()] == [None] * 4
    share = report["parts"]["share"]
    assert "error" not in share, share
    assert share["aggregate_tokens_per_s"] > 0 and share["aggregate_over_one"] > 0
    values = {g["goal"]: g["value"] for g in report["goals"]}
    assert values["eval 7b: GSM8K-sized wall s"] > 0 and values["share: aggregate / one tok/s"] > 0
    assert values["train 7b: ours-lora-compiled / peft-compiled tok/s"] > 0
    assert all(g["met"] is None for g in report["goals"])  # a CPU run claims nothing
    assert "no claim (--tiny)" in proc.stdout


def test_compile_counts_see_a_recompile_and_an_eager_fallback() -> None:
    import torch

    from workers.compile import compile_counts

    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    double(torch.ones(2))
    before = compile_counts()
    double(torch.ones(2))
    assert compile_counts() == before  # the same shape: the compiled graph, nothing new
    double(torch.ones(3))
    assert compile_counts() == (before[0] + 1, before[1])  # a new shape: compiled again
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 2
    try:
        double(torch.ones(4))
    finally:
        torch._dynamo.config.recompile_limit = limit
    assert compile_counts() == (before[0] + 1, before[1] + 1)  # past the limit: run eagerly, and counted


def test_a_goal_takes_no_verdict_from_a_timed_call_that_compiled() -> None:
    from gpu_suite import GOALS, goals

    row = {"tokens_per_s": 12_000.0}
    report = {"tiny": False, "parts": {"eval": {"methods": {"b128": {"ours_static": row}}}}}
    name = next(g[0] for g in GOALS if g[2] == ("methods", "b128", "ours_static", "tokens_per_s"))
    assert {g["goal"]: g["met"] for g in goals(report)}[name] is True
    row["invalid"] = "its timed call compiled 1 graphs and left 0 frames eager"
    verdict = {g["goal"]: g for g in goals(report)}[name]
    assert verdict["met"] is None and verdict["invalid"] == row["invalid"] and verdict["value"] == 12_000.0


def test_mfu_counts_the_matmuls_and_attention_of_llama_7b_but_not_its_embedding_lookup() -> None:
    from train_throughput import describe, flops_per_token

    d, ffn, layers, vocab, seq = 4096, 11008, 32, 32000, 256
    linear = layers * (4 * d * d + 3 * d * ffn) + vocab * d  # q, k, v, o; gate, up, down; the LM head
    assert flops_per_token("7b", seq) == 4 * linear + 12 * layers * d * seq
    raw = {"tokens_per_s": 10_000.0, "peak_memory_bytes": 2**30, "flops_per_token": flops_per_token("7b", seq)}
    assert describe(raw, 989.0, on_gpu=True)["mfu"] == round(26_830_962_688 * 10_000 / 989e12, 4)


@pytest.mark.slow
def test_the_gpu_bundle_carries_what_the_suite_imports_at_the_locks_versions_but_the_machines_own_stack() -> None:
    import gpu_bundle
    from packaging.utils import canonicalize_name

    lock = gpu_bundle.locked()
    carry, image = gpu_bundle.needed(gpu_bundle.owners(gpu_bundle.imported_files()), lock)
    names = {canonicalize_name(d) for d in carry}
    # What a lent GPU machine lacks (DeepSpeed, MLflow's client, datasets) or holds at other versions.
    assert {"deepspeed", "transformers", "huggingface-hub", "peft", "datasets", "mlflow-skinny", "pydantic",
            "pydantic-core", "tokenizers"} <= names
    assert all(version == lock[canonicalize_name(d)] for d, version in carry.items())
    # Its own CUDA build of torch and what is compiled against it; MLflow's server and what accelerate only
    # imports because it is installed here are not carried.
    assert {"torch", "numpy"} <= set(image)
    assert not names & {"torch", "numpy", "boto3", "botocore", "mlflow", "ray"}
    assert not any(n.startswith(("nvidia-", "cuda-")) for n in names)


def test_the_gpu_bundle_refuses_a_venv_that_is_not_the_locks() -> None:
    import gpu_bundle

    with pytest.raises(SystemExit, match=r"transformers 5\.0\.0 \(lock: 5\.1\.0\)"):
        gpu_bundle.needed({"transformers": "5.0.0", "torch": "2.11.0"}, {"transformers": "5.1.0"})
    assert gpu_bundle.needed({"transformers": "5.1.0", "torch": "2.11.0"}, {"transformers": "5.1.0"}) == (
        {"transformers": "5.1.0"}, ["torch"])


def test_the_gpu_run_refuses_a_bundle_built_for_another_python(tmp_path: Path) -> None:
    (tmp_path / "bundle.json").write_text(json.dumps({"python_version": "2.7"}))
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "BUNDLE": str(tmp_path),
                               "OUT": str(tmp_path / "out")})
    have = "{}.{}".format(*sys.version_info[:2])
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {tmp_path}/bundle.json: python_version: built for 2.7; {sys.executable} "
                                   f"is {have} (bench/gpu_bundle.py --python-version {have})")
    assert not (tmp_path / "out").exists()


def test_the_gpu_run_without_a_bundle_says_so_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh")], capture_output=True, text=True,
                          env={**os.environ, "BUNDLE": str(tmp_path / "none"), "OUT": str(tmp_path / "out")})
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {tmp_path}/none/bundle.json: no bundle here (make gpu-bundle where PyPI "
                                   f"is reachable, then carry {tmp_path}/none)")
    assert not (tmp_path / "out").exists()
