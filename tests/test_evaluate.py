"""Evaluation: batched greedy decoding equals one-at-a-time decoding, predictions files, the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from clirunner import run_cli
from tiny_models import tiny_model

from workers.evaluate import evaluate, generate_greedy
from workers.model_loading import byte_tokenizer
from workers.spec import EvalSpec

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 2 + 3?", "Hi", "Tell me about alpacas and llamas please", "x", "12 * 7 =", "Why?"]


def _tokenizer_whose_eos_occurs(model) -> tuple:
    """A byte tokenizer whose EOS is a token the model emits mid-sequence for some prompts only."""
    tok = byte_tokenizer()
    free, _ = generate_greedy(model, tok, PROMPTS, 12, batch_size=len(PROMPTS))
    inner = Counter(t for seq in free for t in set(seq[1:]))
    eos = next(t for t, n in inner.most_common() if 0 < n < len(PROMPTS))
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    return tok, eos


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2"])
def test_batched_greedy_equals_one_at_a_time_and_stops_at_eos(family: str) -> None:
    model = tiny_model(family)
    tok, eos = _tokenizer_whose_eos_occurs(model)
    batched, n = generate_greedy(model, tok, PROMPTS, 12, batch_size=4)
    single = [generate_greedy(model, tok, [p], 12, batch_size=1)[0][0] for p in PROMPTS]
    assert batched == single
    assert n == sum(len(s) for s in batched)
    assert any(len(s) < 12 for s in batched), "some row must have stopped at EOS"
    assert all(eos not in s for s in batched)
    reference = [
        model.generate(torch.tensor([tok(p)["input_ids"]]), max_new_tokens=12, do_sample=False,
                       eos_token_id=eos, pad_token_id=0)[0, len(tok(p)["input_ids"]):].tolist()
        for p in PROMPTS
    ]
    assert single == [r[: r.index(eos)] if eos in r else r for r in reference]
    budget, n_budget = generate_greedy(model, tok, PROMPTS, 12, batch_size=4, stop_at_eos=False)
    assert n_budget == 12 * len(PROMPTS) and all(s[: len(b)] == b for s, b in zip(budget, batched, strict=True))


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_batched_greedy_with_a_prefix_adapter_equals_generate(family: str) -> None:
    """The prefix hook fills our empty cache and extends our mask: rows of different padding still agree."""
    from workers.adapters.registry import inject
    from workers.spec import parse_trial_spec

    model = tiny_model(family)
    spec = parse_trial_spec({"model": "unused", "adapter": {"type": "prefix", "virtual_tokens": 3}})
    inject(model, spec.adapter)
    with torch.no_grad():  # a prefix large enough to move the argmax of a random model
        for weight in model.get_submodule("prefix_encoder").parameters():
            weight.normal_(0.0, 20.0, generator=torch.Generator().manual_seed(1))
    tok = byte_tokenizer()
    batched, _ = generate_greedy(model, tok, PROMPTS, 8, batch_size=len(PROMPTS), stop_at_eos=False)
    reference = [
        model.generate(torch.tensor([tok(p)["input_ids"]]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                       pad_token_id=0)[0, len(tok(p)["input_ids"]):].tolist()
        for p in PROMPTS
    ]
    assert batched == reference
    plain, _ = generate_greedy(tiny_model(family), tok, PROMPTS, 8, batch_size=len(PROMPTS), stop_at_eos=False)
    assert plain != batched, "the prefix must change what the model generates"


def test_evaluate_writes_predictions_and_accuracies(shared_data: Path, tmp_path: Path) -> None:
    model = tiny_model("llama")
    result = evaluate(model, byte_tokenizer(), ["gsm8k", "aqua", "piqa"], EvalSpec(limit=5, max_new_tokens=8),
                      root=shared_data, out_dir=tmp_path)
    assert set(result.tasks) == {"gsm8k", "aqua", "piqa"}
    for name, res in result.tasks.items():
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == res.total == 5
        # What a reader compares first, the prompt last: the artifact viewer shows the start of each line.
        assert list(rows[0]) == ["generation", "gold", "correct", "extracted", "id", "prompt"]
        assert res.correct == sum(r["correct"] for r in rows)
        assert rows[0]["prompt"].endswith("### Response:\n                ")
    assert result.macro_accuracy == pytest.approx(sum(r.accuracy for r in result.tasks.values()) / 3)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_compiled_static_cache_evaluates_to_the_same_predictions(shared_data: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import workers.compile

    monkeypatch.setattr(workers.compile, "BACKEND", "eager")  # inductor's C++ build is for GPUs, not the suite
    model = tiny_model("llama")
    fast = EvalSpec(limit=5, max_new_tokens=8, batch_size=2, cache="static", compile=True)
    plain = EvalSpec(limit=5, max_new_tokens=8, batch_size=2)  # on a CPU: dynamic, not compiled
    for spec, out in ((fast, tmp_path / "fast"), (plain, tmp_path / "plain")):
        evaluate(model, byte_tokenizer(), ["gsm8k", "piqa"], spec, root=shared_data, out_dir=out)
    assert model._compiled_call is not None  # the static run did compile its decoding step
    for name in ("gsm8k.jsonl", "piqa.jsonl"):
        assert (tmp_path / "fast" / name).read_text() == (tmp_path / "plain" / name).read_text()


def test_paper_protocol_runs_beam_search(shared_data: Path) -> None:
    model = tiny_model("llama")
    spec = EvalSpec(protocol="paper", limit=2, max_new_tokens=4)
    result = evaluate(model, byte_tokenizer(), ["boolq"], spec, root=shared_data)
    assert result.tasks["boolq"].total == 2 and result.generated_tokens == 8




def test_eval_cli_with_an_adapter(shared_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from workers.adapters.io import save_adapter
    from workers.adapters.registry import inject
    from workers.model_loading import build_model
    from workers.spec import parse_trial_spec

    folder = str(REPO / "sweeps" / "models" / "tiny-llama")
    spec = parse_trial_spec({"model": folder, "adapter": {"type": "lora", "placement": ["q", "v"], "rank": 2}})
    model = build_model(folder, random_init=True)
    inject(model, spec.adapter)
    save_adapter(model, spec.adapter, tmp_path / "adapter")
    code, out, err = run_cli([
        "eval", "--model", folder, "--random-init", "--tokenizer", "byte", "--adapter", str(tmp_path / "adapter"),
        "--tasks", "gsm8k,boolq", "--limit", "3", "--max-new-tokens", "4", "--data-root", str(shared_data),
        "--out", str(tmp_path / "out"),
    ], monkeypatch, capsys)
    assert code == 0, err
    assert "gsm8k" in out and "macro" in out
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(summary) >= {"accuracy/gsm8k", "accuracy/boolq", "accuracy/macro", "generated_tokens"}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--tasks", "gsm9k"], "unknown task 'gsm9k'"),
        (["--tasks", "hellaswag"], "no test file for task 'hellaswag'"),
        (["--tasks", "gsm8k", "--adapter", "/nonexistent/adapter"], "no adapter config here"),
        (["--tasks", "gsm8k", "--protocol", "fast"], "eval.protocol"),
    ],
)
def test_eval_cli_bad_input(extra, needle, shared_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    folder = str(REPO / "sweeps" / "models" / "tiny-llama")
    args = ["eval", "--model", folder, "--random-init", "--tokenizer", "byte", "--data-root", str(shared_data),
            "--out", str(tmp_path / "out"), *extra]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("extra", "budget"), [([], {"gsm8k": 256, "boolq": 32}),
                                               (["--max-new-tokens", "8"], {"gsm8k": 8, "boolq": 8})])
def test_eval_cli_budget_is_the_trials(extra, budget, shared_data: Path, monkeypatch, capsys) -> None:
    """`adaptune eval` without --max-new-tokens generates what a trial would: 256 math, 32 commonsense."""
    from workers.evaluate import new_tokens
    from workers.tasks import task

    class Reached(Exception):
        pass

    seen: dict[str, int] = {}

    def record(net, tok, names, spec, **_):
        seen.update({name: new_tokens(spec, task(name)) for name in names})
        raise Reached

    monkeypatch.setattr("workers.evaluate.evaluate", record)
    folder = str(REPO / "sweeps" / "models" / "tiny-llama")
    with pytest.raises(Reached):
        run_cli(["eval", "--model", folder, "--random-init", "--tokenizer", "byte", "--tasks", "gsm8k,boolq",
                 "--data-root", str(shared_data), *extra], monkeypatch, capsys)
    assert seen == budget


def test_generation_budget_is_the_references_per_kind_of_set() -> None:
    """evaluate.py generates 256 new tokens (math), commonsense_evaluate.py 32; a spec's number wins."""
    from workers.evaluate import new_tokens
    from workers.tasks import task

    assert [new_tokens(EvalSpec(), task(t)) for t in ("gsm8k", "aqua", "mawps", "boolq", "piqa", "obqa")] == [
        256, 256, 256, 32, 32, 32]
    assert new_tokens(EvalSpec(protocol="paper"), task("hellaswag")) == 32
    assert new_tokens(EvalSpec(max_new_tokens=8), task("gsm8k")) == 8


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_static_cache_and_dropping_finished_rows_give_the_same_tokens(family: str) -> None:
    model = tiny_model(family)
    tok, _ = _tokenizer_whose_eos_occurs(model)
    dynamic, n = generate_greedy(model, tok, PROMPTS, 12, batch_size=4)  # finished rows leave the batch
    single = [generate_greedy(model, tok, [p], 12, batch_size=1)[0][0] for p in PROMPTS]
    static, n_static = generate_greedy(model, tok, PROMPTS, 12, batch_size=4, cache="static")  # last batch filled
    assert dynamic == single == static and n == n_static
    assert any(len(s) < 12 for s in dynamic), "some row must have stopped at EOS"


def test_a_compiled_static_step_is_reused_across_batches_and_gives_the_same_tokens() -> None:
    from transformers import CompileConfig

    model = tiny_model("llama")
    tok, _ = _tokenizer_whose_eos_occurs(model)
    plain, _ = generate_greedy(model, tok, PROMPTS, 12, batch_size=4)
    compiled, _ = generate_greedy(model, tok, PROMPTS, 12, batch_size=4, cache="static",
                                  compile_config=CompileConfig(backend="eager", fullgraph=False))
    assert compiled == plain
    assert model._compiled_call is not None  # one compiled step, kept on the model for the next call


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora-attn", "series-attn-mlp", "parallel-up-down", "mosa-series-mlp", "prefix"])
def test_every_adapter_decodes_the_same_tokens_with_either_cache(method: str, family: str) -> None:
    from test_adapters import METHODS, adapter

    from workers.adapters.base import adapter_parameters
    from workers.adapters.registry import inject

    model = tiny_model(family)
    inject(model, adapter(**METHODS[method]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: not the identity of its initialisation
        for _, p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    model.eval()
    tok = byte_tokenizer()
    single = [generate_greedy(model, tok, [p], 10, batch_size=1, stop_at_eos=False)[0][0] for p in PROMPTS]
    for cache in ("dynamic", "static"):
        batched, _ = generate_greedy(model, tok, PROMPTS, 10, batch_size=4, stop_at_eos=False, cache=cache)
        assert batched == single, cache


def test_calls_of_one_shape_share_the_models_static_cache_and_another_shape_replaces_it() -> None:
    model = tiny_model("llama")
    tok = byte_tokenizer()
    first, _ = generate_greedy(model, tok, PROMPTS, 10, batch_size=4, stop_at_eos=False, cache="static")
    shape, held = model._adaptune_static_cache
    assert shape == (4, 256)
    again, _ = generate_greedy(model, tok, PROMPTS[::-1], 10, batch_size=4, stop_at_eos=False, cache="static")
    assert again == first[::-1] and model._adaptune_static_cache[1] is held  # reset between calls, not rebuilt
    longer, _ = generate_greedy(model, tok, PROMPTS, 300, batch_size=4, stop_at_eos=False, cache="static")
    assert model._adaptune_static_cache[0] == (4, 512) and [s[:10] for s in longer] == first


@pytest.mark.parametrize("trained_compiled", [False, True])
def test_the_static_caches_tensors_are_fixed_addresses_for_cuda_graphs(trained_compiled: bool) -> None:
    """A compiled step's CUDA graphs need the cache it writes in place marked as fixed addresses; else inductor
    skips CUDA graphs for it, without an error. transformers marks them as the cache fills at the prefill, but not
    inside a traced region: after a trial's training through compiled decoder layers (two row lengths, as
    batches have), the prefill ran through those layers and left the first layers' tensors unmarked."""
    from transformers import CompileConfig

    from workers.compile import compile_decoder_layers, uncompile_decoder_layers
    from workers.loss import lm_loss

    torch._dynamo.reset()
    model = tiny_model("llama", layers=4)
    tok = byte_tokenizer()
    plain, _ = generate_greedy(model, tok, PROMPTS, 6, batch_size=4, stop_at_eos=False)
    if trained_compiled:
        compile_decoder_layers(model, backend="eager")
        model.train()
        for length in (9, 12):
            ids = torch.randint(3, 259, (2, length), generator=torch.Generator().manual_seed(length))
            lm_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}).backward()
        model.eval()
        uncompile_decoder_layers(model)  # as the trial does before it evaluates
    compiled, _ = generate_greedy(model, tok, PROMPTS, 6, batch_size=4, stop_at_eos=False, cache="static",
                                  compile_config=CompileConfig(backend="eager", fullgraph=False))
    assert compiled == plain
    kv = model._adaptune_static_cache[1]
    tensors = [t for layer in kv.layers for t in (layer.keys, layer.values, layer.cumulative_length)]
    assert len(tensors) == 12 and all(getattr(t, "_dynamo_static_input_type", None) for t in tensors)


SYNCED = """
import json, sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, sys.argv[2])
from test_evaluate import _tokenizer_whose_eos_occurs
from tiny_models import tiny_model

from workers.evaluate import generate_greedy

dist.init_process_group("gloo")
rank = dist.get_rank()
model = tiny_model("llama")
tok, _ = _tokenizer_whose_eos_occurs(model)
forwards = []
model.register_forward_pre_hook(lambda *_: forwards.append(1))
# Rank 0's rows reach EOS at 7 and 8 tokens, rank 1's never within 12.
prompts = ["Tell me about alpacas and llamas please", "x"] if rank == 0 else ["Hi", "Why?"]
out = {}
for cache in ("dynamic", "static"):
    alone, _ = generate_greedy(model, tok, prompts, 12, batch_size=2, cache=cache)
    n_alone, forwards[:] = len(forwards), []
    synced, _ = generate_greedy(model, tok, prompts, 12, batch_size=2, cache=cache, synced=True)
    out[cache] = {"alone": alone, "synced": synced, "n_alone": n_alone, "n_synced": len(forwards)}
    forwards.clear()
Path(sys.argv[1], f"rank-{rank}.json").write_text(json.dumps(out))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_synced_ranks_decode_in_step_to_the_same_tokens(tmp_path: Path) -> None:
    """Under ZeRO-3 every rank evaluates and each forward gathers the parameters from all of them: a rank that stops
    decoding first (its rows reached EOS) would leave the others waiting in their next forward for good. Synced, all
    take as many forwards, each its own tokens."""
    import subprocess
    import sys

    from services import free_port

    script = tmp_path / "synced.py"
    script.write_text(SYNCED)
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(tmp_path), str(repo / "tests")]
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for cache in ("dynamic", "static"):
        alone = [r[cache]["n_alone"] for r in ranks]
        assert alone[0] < alone[1], alone  # rank 0 alone stops first
        assert ranks[0][cache]["n_synced"] == ranks[1][cache]["n_synced"] == alone[1]
        assert [r[cache]["synced"] for r in ranks] == [r[cache]["alone"] for r in ranks]
