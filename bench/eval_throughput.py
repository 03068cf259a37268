"""Evaluation throughput: our batched greedy decoding against the paper's protocol and `generate`.

One model with random weights, the GSM8K test prompts in the paper's template (byte tokenizer: one
token per byte, so no download), the same number of new tokens for every prompt. Random weights
rarely emit EOS, so every method runs a fixed budget: ours with `stop_at_eos=False`, `generate`
with `min_new_tokens` equal to `max_new_tokens`. Methods, each timed in this run:

- `ours`: `workers.evaluate.generate_greedy` at `--batch-size` (length-sorted, left-padded, DynamicCache);
- `ours_prefill`: the same with one new token, to split our time into prefill and decode;
- `ours_static`: ours with a static cache, its decoding step compiled (`--compile`), timed after a warm-up call;
- `paper`: `generate`, batch 1, beam search 4 (the paper's evaluate.py; the best beam's tokens count);
- `generate_b1`: `generate`, batch 1, greedy;
- `generate_batched`: `generate` at `--batch-size`, greedy, its default dynamic cache;
- `generate_static`: the same with the static cache, compiled (`--compile`), timed after a warm-up call.

Prints one JSON object with tokens/s per method (the fastest of `--repeats` calls, taken round robin:
shared machines are noisy) and the ratios of ours to each. Batch-1 methods run on the first `--n-slow` prompts only:
their tokens/s does not depend on how many prompts run.

    python bench/eval_throughput.py --model-shape tiny                      # CPU, seconds
    python bench/eval_throughput.py --model-shape 7b --device cuda --dtype bfloat16 --batch-size 128 \\
        --n-prompts 256 --prompt-chars 128                                   # the issue's 128 + 128 tokens
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, CompileConfig, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from workers.compile import compile_counts
from workers.data import load_records
from workers.errors import ConfigError
from workers.evaluate import generate_greedy
from workers.model_loading import build_model, byte_tokenizer
from workers.prompts import evaluation_prompt
from workers.tasks import data_root, task_file

# LLaMA shapes with random weights; `7b` is the shape of /work/shared/model-configs/llama-7b,
# `1b` that of TinyLlama-1.1B, `tiny` the test model of sweeps/models/tiny-llama.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=259),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}


def build(args: argparse.Namespace) -> PreTrainedModel:
    dtype = getattr(torch, args.dtype)
    if args.config:
        return build_model(args.config, random_init=True, dtype=dtype, device=args.device).eval()
    config = LlamaConfig(**SHAPES[args.model_shape], max_position_embeddings=2048, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(args.device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


# Deciles of the GSM8K test questions' lengths in characters (min, 10%, ..., 90%, max; mean 240).
GSM8K_CHARS = (73, 136, 157, 179, 203, 222, 245, 272, 309, 366, 848)
FILLER = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May? ")


def gsm8k_like_questions(n: int) -> list[str]:
    """`n` stand-in questions whose lengths follow GSM8K's deciles, for machines without the data."""
    lengths = []
    for i in range(n):
        pos = 10 * ((i * 0.618034) % 1.0)  # spread over the deciles, in no order
        lo, frac = int(pos), pos - int(pos)
        lengths.append(round(GSM8K_CHARS[lo] + frac * (GSM8K_CHARS[lo + 1] - GSM8K_CHARS[lo])))
    return [(FILLER * (1 + length // len(FILLER)))[:length] for length in lengths]


def gsm8k_prompts(n: int, root: Path, chars: int | None) -> list[str]:
    """The first `n` GSM8K test prompts (cycled when n exceeds the set), the last `chars` of each if given;
    without the data set at `root`, stand-ins of the same lengths (`gsm8k_like_questions`)."""
    try:
        instructions = load_records(task_file("gsm8k", root))["instruction"]
    except ConfigError:
        instructions = gsm8k_like_questions(n)
    prompts = [evaluation_prompt(instructions[i % len(instructions)]) for i in range(n)]
    return [p[-chars:] for p in prompts] if chars else prompts


def timed(fn: Callable[[], int], device: str) -> tuple[int, float]:
    """(generated tokens, seconds) of one call, device work included."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    tokens = fn()
    sync()
    return tokens, time.perf_counter() - start


def cudagraph_skips() -> int:
    """Compiled graphs inductor has run without CUDA graphs in this process so far (a warning each, no error):
    their figures are of the compiled kernels launched one by one."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def ours_compile_config(backend: str = "inductor") -> CompileConfig:
    """How ours compiles its static-cache step: transformers' settings (CUDA graphs), but a graph break
    splits the graph instead of failing the run."""
    return CompileConfig(backend=backend, fullgraph=False)


def make_methods(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], slow: list[str], new: int,
    batch_size: int, compile_static: bool, compile_backend: str = "inductor",
) -> dict[str, tuple[int, Callable[[], int]]]:
    """name -> (prompts it runs, a call that generates `new` tokens for each and returns how many it made)."""
    device = next(model.parameters()).device
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    fixed = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id,
                 eos_token_id=tok.eos_token_id)

    def encode(batch: list[str]) -> dict[str, torch.Tensor]:
        return tok(batch, return_tensors="pt", padding=True).to(device)

    def generate_each(**extra: object) -> int:
        done = 0
        for p in slow:
            enc = encode([p])
            out = model.generate(**enc, **fixed, **extra)
            done += out.shape[1] - enc["input_ids"].shape[1]
        return done

    def generate_batches(**extra: object) -> int:
        done = 0
        for start in range(0, len(prompts), batch_size):
            enc = encode(prompts[start:start + batch_size])
            out = model.generate(**enc, **fixed, **extra)
            done += out[:, enc["input_ids"].shape[1]:].numel()
        return done

    static: dict[str, object] = dict(cache_implementation="static", max_cache_len=max(lengths) + new)
    if compile_static:
        compile_config = CompileConfig(backend=compile_backend)
        compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
        static["compile_config"] = compile_config
    else:
        static["disable_compile"] = True

    def ours(n_new: int, **extra: object) -> Callable[[], int]:
        return lambda: generate_greedy(model, tok, prompts, n_new, batch_size, stop_at_eos=False, **extra)[1]

    ours_compile = ours_compile_config(compile_backend) if compile_static else None

    return {
        "ours": (len(prompts), ours(new)),
        "ours_prefill": (len(prompts), ours(1)),
        "ours_static": (len(prompts), ours(new, cache="static", compile_config=ours_compile)),
        "paper": (len(slow), lambda: generate_each(num_beams=4)),
        "generate_b1": (len(slow), lambda: generate_each()),
        "generate_batched": (len(prompts), lambda: generate_batches()),
        "generate_static": (len(prompts), lambda: generate_batches(**static)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--config", help="a folder with config.json instead of --model-shape")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--n-slow", type=int, default=4, help="prompts for the batch-1 methods")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompt-chars", type=int, default=None, help="keep the last N characters of each prompt")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile generate_static (default: on CUDA only)")
    parser.add_argument("--skip", default="", help="comma-separated methods not to run")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on busy hosts)")
    args = parser.parse_args()
    compile_static = args.device.startswith("cuda") if args.compile is None else args.compile
    skip = set(filter(None, args.skip.split(",")))
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args)
    tok = byte_tokenizer()
    tok.padding_side = "left"
    prompts = gsm8k_prompts(args.n_prompts, data_root(args.data_root), args.prompt_chars)
    slow = prompts[: args.n_slow]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    new = args.max_new_tokens
    methods = make_methods(model, tok, prompts, slow, new, args.batch_size, compile_static)
    methods = {name: run for name, run in methods.items() if name not in skip}
    results: dict[str, dict[str, float]] = {name: {"prompts": n} for name, (n, _) in methods.items()}
    runs: dict[str, list[tuple[int, float]]] = {name: [] for name in methods}
    with torch.no_grad():
        generate_greedy(model, tok, prompts[:2], 2, 2)  # allocator and kernel warm-up, untimed
        for name in ("generate_static", "ours_static"):
            if name in methods:
                _, results[name]["warmup_seconds"] = timed(methods[name][1], args.device)
        # Round robin, so that a change of load on a shared machine hits every method alike.
        before = compile_counts()
        for _ in range(args.repeats):
            for name, (_, fn) in methods.items():
                runs[name].append(timed(fn, args.device))
        compiled, eager = (after - b for after, b in zip(compile_counts(), before, strict=True))
    for name, row in results.items():
        row["generated_tokens"], row["seconds"] = min(runs[name], key=lambda run: run[1])
        row["tokens_per_s"] = row["generated_tokens"] / row["seconds"]

    report: dict[str, object] = {
        "model_shape": args.config or args.model_shape,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "max_new_tokens": new,
        "prompt_tokens_mean": sum(lengths) / len(lengths),
        "prompt_tokens_max": max(lengths),
        "static_compiled": compile_static,
        "threads": torch.get_num_threads(),
        "budget": "fixed: every prompt gets max_new_tokens (random weights rarely emit EOS)",
        "timed_calls": {"graphs_compiled": compiled, "frames_left_eager": eager},
        "methods": results,
    }
    if "ours" in results:
        mine = results["ours"]
        report["ratios"] = {f"ours_vs_{k}": mine["tokens_per_s"] / v["tokens_per_s"]
                            for k, v in results.items() if k not in ("ours", "ours_prefill")}
        if "ours_static" in results:
            report["ratios"]["ours_static_vs_generate_static"] = (
                results["ours_static"]["tokens_per_s"] / results["generate_static"]["tokens_per_s"]
                if "generate_static" in results else None)
        if "ours_prefill" in results:
            report["ours_prefill_share"] = results["ours_prefill"]["seconds"] / mine["seconds"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
