"""Training throughput of our worker's step against a plain PEFT + torch loop, on the same shapes.

Prints one JSON object: tokens/s, peak memory and MFU of each variant, and ratios between variants
measured in the same run. Every variant runs in its own process, so that its peak memory is its own.

    python bench/train_throughput.py                      # a small LLaMA shape, CPU-friendly
    python bench/train_throughput.py --shape 7b           # GPU: LLaMA-7B shape, bf16, seq 256, batch 16
    python bench/train_throughput.py --shape 1b --dropout 0

Variants:
    peft-eager, peft-compiled   peft.get_peft_model(LoRA) + torch.optim.AdamW, gradient accumulation,
                                gradient clipping; `torch.compile` on the whole model for the second
                                (`--peft-compile regional`: on each decoder layer, as ours)
    ours-lora                   workers.job.run_trial: DeepSpeed engine, our LoRA, no evaluation
    ours-lora-compiled          the same with `train.compile: true`
    ours-series, ours-parallel  our bottleneck adapters on the MLP, against ours-lora; their size gives LoRA's
                                trainable parameters (`matched_bottleneck`; tiny: 32)
    ours-prefix                 prefix tuning, 10 virtual tokens
    ours-*-compiled             any of ours with `train.compile: true` (regional: each decoder layer)

Both sides see full rows of `seq` tokens (no padding) and the paper's LoRA (r 32, alpha 64, dropout
0.05 on q, k, v, up, down). Tokens/s is the median over steps after `--warmup` steps. MFU is the base
model's FLOPs per trained token (`flops_per_token`) times tokens/s over `--peak-tflops` (H100 SXM bf16
dense: 989); the adapters' own few FLOPs are left out, so it compares variants by speed alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# LLaMA shapes: `tiny` for a CPU, `1b` (TinyLlama's) and `7b` (LLaMA-7B's) for a GPU.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 259},
    "small": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 12, "vocab_size": 32000},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
}
LORA_SLOTS = ["q", "k", "v", "up", "down"]
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
VARIANTS = ("peft-eager", "peft-compiled", "ours-lora", "ours-lora-compiled", "ours-series", "ours-parallel",
            "ours-prefix", "ours-series-compiled", "ours-parallel-compiled", "ours-prefix-compiled")
RATIOS = (
    ("ours-lora", "peft-eager"), ("ours-lora", "peft-compiled"), ("ours-lora-compiled", "peft-compiled"),
    ("peft-compiled", "peft-eager"), ("ours-lora-compiled", "ours-lora"),
    ("ours-series", "ours-lora"), ("ours-parallel", "ours-lora"),
    ("ours-series-compiled", "ours-lora-compiled"), ("ours-parallel-compiled", "ours-lora-compiled"),
)


def llama_config(shape: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False)


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- the PEFT baseline ----------------------------------------------------------------------------------------

def run_peft(args: argparse.Namespace, compiled: bool) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(llama_config(args.shape), dtype=dtype)
    base_params = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, LoraConfig(r=32, lora_alpha=64, lora_dropout=args.dropout,
                                            target_modules=LORA_MODULES, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, fused=device == "cuda")
    forward = model
    if compiled and args.peft_compile == "regional":
        from workers.compile import compile_decoder_layers

        compile_decoder_layers(model.base_model.model, backend=args.compile_backend)
    elif compiled:
        forward = torch.compile(model, backend=args.compile_backend)
    accumulation = args.batch_size // args.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (accumulation, args.micro_batch_size, args.seq), generator=gen).to(device)
    times = []
    for _ in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        for micro in ids:
            loss = forward(input_ids=micro, labels=micro).loss / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times[args.warmup:])
    return {"tokens_per_s": args.batch_size * args.seq / step_time, "peak_memory_bytes": peak_memory_bytes(),
            "trainable_params": sum(p.numel() for p in params), "base_params": base_params,
            "flops_per_token": flops_per_token(args.shape, args.seq),
            "first_step_s": times[0]}


# --- our worker -----------------------------------------------------------------------------------------------

def matched_bottleneck(shape: str) -> int:
    """The bottleneck b at which a series or parallel adapter on the MLP (d -> b -> d per layer) trains as
    many parameters as the paper's LoRA: b = Σ_linears r (d_in + d_out) / 2d, r = 32 (7b: 214, 1b: 188)."""
    s = SHAPES[shape]
    d, kv = s["hidden_size"], s["hidden_size"] * s["num_key_value_heads"] // s["num_attention_heads"]
    lora = 32 * ((d + d) + 2 * (d + kv) + 2 * (d + s["intermediate_size"]))
    return round(lora / (2 * d))


def _adapter(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    kind = variant.removeprefix("ours-").removesuffix("-compiled")
    if kind == "lora":
        return {"type": "lora", "placement": LORA_SLOTS, "rank": 32, "alpha": 64, "dropout": args.dropout}
    if kind == "prefix":
        return {"type": "prefix", "virtual_tokens": 10}
    return {"type": kind, "placement": ["mlp"], "bottleneck": args.bottleneck}


def run_ours(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Our worker's tokens/s and peak memory, and the wall-clock end of every optimizer step (`step_ends`)."""
    import workers.compile
    from workers.job import run_trial
    from workers.names import PEAK_MEMORY_GB, TRAINABLE_PARAMS
    from workers.spec import parse_trial_spec
    from workers.tracking import MemoryTracker, TrialStatus

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        llama_config(args.shape).save_pretrained(folder)
        # Every record is longer than `seq` bytes: the byte tokenizer cuts each row at exactly `seq` tokens.
        records = [{"instruction": f"{i} " + "abcdefghij" * (args.seq // 5), "input": "", "output": "x"}
                   for i in range(args.batch_size * 4)]
        train_file = Path(tmp) / "train.json"
        train_file.write_text(json.dumps(records))
        spec = parse_trial_spec({
            "model": str(folder), "random_init": True, "tokenizer": "byte",
            "adapter": _adapter(variant, args),
            "data": {"train": str(train_file), "cutoff_len": args.seq, "val_set_size": 0, "template": "alpaca"},
            "train": {"max_steps": args.warmup + args.steps, "micro_batch_size": args.micro_batch_size,
                      "batch_size": args.batch_size, "warmup_steps": 1, "log_every": 1,
                      "eval_every": 10**9, "save_every": 10**9, "compile": variant.endswith("-compiled"),
                      "zero_stage": args.zero_stage},
            "seed": 0,
        })
        workers.compile.BACKEND = args.compile_backend
        windows: list[dict[str, float]] = []
        barrier = getattr(args, "barrier", None)

        def on_step(metrics: dict[str, float], _: Path | None) -> None:
            if "tokens_per_s" in metrics:
                if barrier and not windows:
                    wait_for_all(*barrier)
                windows.append({**metrics, "end": time.time()})

        result = run_trial(spec, MemoryTracker(), Path(tmp) / "trial", report=on_step)
        if result.status != TrialStatus.SUCCEEDED:
            raise RuntimeError(f"{variant}: {result.status}: {result.error}")
    rates = [w["tokens_per_s"] for w in windows[args.warmup:]]
    return {"tokens_per_s": statistics.median(rates), "peak_memory_bytes": int(windows[-1][PEAK_MEMORY_GB] * 2**30),
            "trainable_params": int(result.metrics[TRAINABLE_PARAMS]),
            "base_params": sum(p.numel() for p in _meta_model(args.shape).parameters()),
            "flops_per_token": flops_per_token(args.shape, args.seq),
            "first_step_s": args.batch_size * args.seq / windows[0]["tokens_per_s"],
            "step_ends": [w["end"] for w in windows], "tokens_per_step": args.batch_size * args.seq}


def wait_for_all(folder: str, n: int, timeout_s: float = 600.0) -> None:
    """A start line for `n` processes: say this one is ready in `folder`, wait until all `n` are.

    Trials that share a device are measured where they overlap; their start-up (imports, model build,
    the first step's compilation) takes different times, so each waits here after its first step.
    """
    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + timeout_s
    while len(list(Path(folder).iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def _meta_model(shape: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(llama_config(shape))


def flops_per_token(shape: str, seq: int) -> int:
    """The base model's FLOPs for one trained token, its weights frozen (forward and input gradients only):

        matmuls    4 · N_lin           2 · N_lin forward, 2 · N_lin for the inputs' gradients; N_lin the
                                       weights of every Linear, LM head included (the input embedding is
                                       a lookup: no FLOPs)
        attention  12 · L · d · seq    Q·Kᵀ and A·V, 2 · seq · d each per layer forward, twice that
                                       backward (PaLM's count; the causal mask is not discounted)

    LLaMA-7B at seq 256: 26.43 + 0.40 GFLOPs (4 · all parameters would be 26.95).
    """
    model = _meta_model(shape)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 4 * linear + 12 * model.config.num_hidden_layers * model.config.hidden_size * seq


# --- the driver -----------------------------------------------------------------------------------------------

def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    if args.variant.startswith("peft-"):
        return run_peft(args, compiled=args.variant == "peft-compiled")
    return run_ours(args, args.variant)


def measure(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """One variant in a fresh process; its JSON result, or the error it ended with."""
    cmd = [sys.executable, __file__, "--variant", variant, *_shared_flags(args)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return ["--shape", args.shape, "--seq", str(args.seq), "--micro-batch-size", str(args.micro_batch_size),
            "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--dropout", str(args.dropout), "--bottleneck", str(args.bottleneck), "--zero-stage", str(args.zero_stage),
            "--compile-backend", args.compile_backend, "--peft-compile", args.peft_compile]


def describe(res: dict[str, Any], peak_tflops: float, on_gpu: bool) -> dict[str, Any]:
    """A variant's raw result in reported units: GiB, rounded tokens/s, and MFU on a GPU."""
    out = {k: v for k, v in res.items() if k not in ("peak_memory_bytes", "step_ends")}
    out["peak_memory_gib"] = round(res["peak_memory_bytes"] / 2**30, 3)
    if on_gpu:
        out["mfu"] = round(res["flops_per_token"] * res["tokens_per_s"] / (peak_tflops * 1e12), 4)
    out["tokens_per_s"] = round(res["tokens_per_s"], 1)
    return out


def ratios(ok: dict[str, dict[str, Any]], key: str) -> dict[str, float]:
    """`key` of a over b for every pair (a, b) of RATIOS measured in `ok`."""
    return {f"{a}/{b}": round(ok[a][key] / ok[b][key], 3) for a, b in RATIOS if a in ok and b in ok}


def summarise(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    on_gpu = torch.cuda.is_available()
    results = {name: describe(r, args.peak_tflops, on_gpu) if "tokens_per_s" in r else r
               for name, r in results.items()}
    ok = {name: r for name, r in results.items() if "tokens_per_s" in r}
    return {
        "bench": "train_throughput",
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "dtype": "bf16" if on_gpu else "fp32",
        "shape": args.shape, "seq": args.seq, "micro_batch_size": args.micro_batch_size,
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "lora_dropout": args.dropout,
        "bottleneck": args.bottleneck, "zero_stage": args.zero_stage,
        "variants": results,
        "throughput_ratios": ratios(ok, "tokens_per_s"),
        "memory_ratios": ratios(ok, "peak_memory_gib"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (tiny: 128, else 256)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per optimizer step (tiny: 8, else 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (tiny: 6, else 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation happens here)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (the paper: 0.05)")
    parser.add_argument("--bottleneck", type=int, default=None,
                        help="series/parallel size (tiny: 32, else LoRA's trainable parameters: matched_bottleneck)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of compiled variants")
    parser.add_argument("--peft-compile", choices=["whole", "regional"], default="whole",
                        help="peft-compiled: torch.compile of the whole model, or of each decoder layer")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + " ".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiny = args.shape == "tiny"
    args.seq = args.seq or (128 if tiny else 256)
    args.batch_size = args.batch_size or (8 if tiny else 16)
    args.steps = args.steps or (6 if tiny else 10)
    args.bottleneck = args.bottleneck or (32 if tiny else matched_bottleneck(args.shape))
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {name: measure(args, name) for name in args.variants.split(",")}
    print(json.dumps(summarise(args, results), indent=2))


if __name__ == "__main__":
    main()
