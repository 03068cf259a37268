"""Every performance claim in one command: training, evaluation and GPU sharing, each part within its budget.

The prepared GPU run (one H100/H200, about 8 minutes), on a machine with the lock's environment:

    python bench/gpu_suite.py --out bench/results/gpu-<name>.json

and on a lent one that reaches no network and has its own Python and CUDA torch: `make gpu-bundle` here, then
`bash bench/gpu_run.sh` there with `.gpu-run/` carried (bench/gpu_bundle.py says what it holds). The JSON
records the versions it ran with.

    python bench/gpu_suite.py --tiny --out /tmp/tiny.json     # the same code paths on a CPU, <= 90 s

Parts, in this order, each with a time budget in seconds (`--budget part=seconds`; `--parts` to choose):

  train-7b, train-1b  tokens/s, peak memory and MFU at the LLaMA-7B and TinyLlama-1.1B shapes (random
            init, bf16, seq 256, micro-batch 16): PEFT LoRA eager and `torch.compile`d (whole model)
            against ours (DeepSpeed ZeRO-2): LoRA, series, parallel (sized to LoRA's trainable
            parameters), prefix, eager and compiled (regional: each decoder layer; the PEFT baseline too
            unless `--peft-compile whole`; prefix eager only, as trials run it). bench/train_throughput.py's
            variants.
  eval      generated tokens/s at the 7B shape, 128 prompt + 128 new tokens: ours (workers.evaluate) against
            `generate` with its dynamic and its static, compiled cache, at batch 1, 64 and 128; and the
            GSM8K-sized run: 1,319 test prompts (each cut to a quarter of its characters, about its
            LLaMA token count), up to 256 new tokens, stop at EOS, wall time from a cold start
            (random weights rarely emit EOS: an upper bound). bench/eval_throughput.py's methods. Every
            compiled call shares one dynamo cache and its recompile limit: a timed call that compiled, or
            that dynamo left eager, marks its row `invalid`, and no goal takes a verdict from it; a row
            whose compiled graphs ran without CUDA graphs says `cuda_graphs_skipped`.
  share     N trials of a small LLaMA (110M) training at once on one device, as `gpus_per_trial: 1/N`
            places them, against one alone: aggregate tokens/s over the window in which all N ran.

Every measurement runs in its own process, forked from a server that imported torch, transformers,
DeepSpeed and PEFT once (never CUDA), so a unit starts in a second, holds its own peak memory and is
killed when its part's budget runs out; the JSON at `--out` is rewritten after every unit, so a
later part's failure or time-out leaves the earlier results. It ends with the ratios the goals name,
each beside its target, and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO)]

PRELOAD = ["torch", "transformers", "deepspeed", "peft", "workers.job", "workers.evaluate", "train_throughput",
           "eval_throughput"]
# Their versions go into the JSON: a lent machine's own torch is not the lock's (bench/gpu_bundle.py).
VERSIONS_OF = ("torch", "triton", "transformers", "deepspeed", "peft")
PARTS = ("train-7b", "eval", "share", "train-1b")
BUDGETS = {"train-7b": 170, "eval": 180, "share": 50, "train-1b": 60}  # + about 20 s to start: <= 8 minutes
TINY_BUDGETS = {"train-7b": 35, "eval": 15, "share": 20, "train-1b": 0}  # + about 20 s to start
# In the order they run: when a budget ends, the most telling comparisons are in. Prefix tuning runs eager, as
# trials run it: compiled, each layer traces its own graph (workers/compile.py), minutes at 7B.
TRAIN_ORDER = {
    "train-7b": ("peft-compiled", "ours-lora-compiled", "peft-eager", "ours-series-compiled",
                 "ours-parallel-compiled", "ours-lora", "ours-series", "ours-parallel", "ours-prefix"),
    "train-1b": ("peft-eager", "peft-compiled", "ours-lora", "ours-lora-compiled", "ours-series-compiled",
                 "ours-parallel-compiled", "ours-series", "ours-parallel", "ours-prefix"),
}
# --tiny: every code path once; the compiled series, parallel and prefix layers are traced in tests/test_compile.py.
TINY_ORDER = ("peft-eager", "peft-compiled", "ours-lora", "ours-lora-compiled", "ours-series", "ours-parallel",
              "ours-prefix")
GOALS = (  # (name, part, value path, target, "min" | "max")
    ("train 7b: ours-lora-compiled / peft-compiled tok/s", "train-7b", ("ratios", "ours-lora-compiled/peft-compiled"),
     1.25, "min"),
    ("train 7b: ours-lora-compiled MFU", "train-7b", ("variants", "ours-lora-compiled", "mfu"), 0.50, "min"),
    ("train 7b: ours-lora-compiled / peft-compiled memory", "train-7b",
     ("memory_ratios", "ours-lora-compiled/peft-compiled"), 1.0, "max"),
    ("train 7b: series / lora (compiled) tok/s", "train-7b", ("ratios", "ours-series-compiled/ours-lora-compiled"),
     1.0, "min"),
    ("train 7b: parallel / lora (compiled) tok/s", "train-7b",
     ("ratios", "ours-parallel-compiled/ours-lora-compiled"), 1.0, "min"),
    ("eval 7b: ours (static) tok/s at batch 128", "eval", ("methods", "b128", "ours_static", "tokens_per_s"), 10_000,
     "min"),
    ("eval 7b: GSM8K-sized wall s", "eval", ("gsm8k", "wall_s"), 60, "max"),
    ("share: aggregate / one tok/s", "share", ("aggregate_over_one",), 3.0, "min"),
)


# --- units: each runs in its own forked process -----------------------------------------------------------------

def ready_unit() -> dict[str, Any]:
    """The first unit: it waits for the fork server's imports, outside every part's budget, checks that a
    forked process can use CUDA (the server must not have initialised it) and says what it runs on."""
    import importlib.metadata

    import torch

    versions: dict[str, str | None] = {}
    for dist in VERSIONS_OF:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # triton beside a CPU build of torch
            versions[dist] = None
    versions.update(python=sys.version.split()[0], cuda=torch.version.cuda)
    if not torch.cuda.is_available():
        return {"device": "cpu", "versions": versions}
    torch.ones(1, device="cuda").sum().item()
    return {"device": torch.cuda.get_device_name(0), "versions": versions}


def train_unit(shape: str, variant: str, opts: dict[str, Any]) -> dict[str, Any]:
    """One bench/train_throughput.py variant at `shape`, in reported units."""
    import torch
    import train_throughput

    args = argparse.Namespace(shape=shape, variant=variant, **opts)
    args.bottleneck = opts.get("bottleneck") or train_throughput.matched_bottleneck(shape)
    on_gpu = torch.cuda.is_available()
    raw = train_throughput.run_variant(args)
    out = train_throughput.describe(raw, args.peak_tflops, on_gpu)
    if "step_ends" in raw:
        out["step_ends"] = raw["step_ends"]
    out["device"] = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    return out


def eval_unit(opts: dict[str, Any], save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every eval method, most telling first; `save` gets the results so far after each."""
    import eval_throughput
    import torch

    from workers.compile import compile_counts
    from workers.data import data_root
    from workers.evaluate import generate_greedy
    from workers.model_loading import byte_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    model = eval_throughput.build(argparse.Namespace(config=None, model_shape=opts["shape"], device=device,
                                                     dtype="bfloat16" if device == "cuda" else "float32"))
    tok = byte_tokenizer()
    tok.padding_side = "left"
    root = data_root(opts.get("data_root"))
    report: dict[str, Any] = {"prompts": "gsm8k" if (root / "dataset" / "gsm8k").is_dir() else
                              "gsm8k-like stand-ins (no data set here: eval_throughput.gsm8k_like_questions)",
"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                              "shape": opts["shape"], "build_s": round(time.perf_counter() - started, 1),
                              "new_tokens": opts["new_tokens"], "prompt_tokens": opts["prompt_chars"],
                              "methods": {}}
    save(report)

    # The GSM8K-sized run first, from a cold start: its wall time includes every warm-up (the compilation).
    full = eval_throughput.gsm8k_prompts(opts["gsm8k_prompts"], root, None)
    gsm8k = [p[-max(1, len(p) // 4):] for p in full]
    compile_config = eval_throughput.ours_compile_config(opts["backend"]) if opts["compile"] else None
    with torch.no_grad():
        tokens, seconds = eval_throughput.timed(
            lambda: generate_greedy(model, tok, gsm8k, opts["gsm8k_new_tokens"], opts["gsm8k_batch"], cache="static",
                                    compile_config=compile_config)[1], device)
    report["gsm8k"] = {"prompts": len(gsm8k), "max_new_tokens": opts["gsm8k_new_tokens"], "cache": "static",
                       "compiled": opts["compile"], "batch_size": opts["gsm8k_batch"], "generated_tokens": tokens,
                       "wall_s": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
    save(report)

    prompts = eval_throughput.gsm8k_prompts(max(opts["batches"]), root, opts["prompt_chars"])
    order = [(b, name) for b in sorted(opts["batches"], reverse=True)
             for name in ("ours_static", "ours", "generate_batched")]
    order += [(b, "generate_static") for b in sorted(opts["batches"], reverse=True)]
    for batch, name in order:
        methods = eval_throughput.make_methods(model, tok, prompts[:batch], prompts[:1], opts["new_tokens"], batch,
                                               compile_static=opts["compile"], compile_backend=opts["backend"])
        _, fn = methods[name]
        row: dict[str, Any] = {}
        skips = eval_throughput.cudagraph_skips()
        with torch.no_grad():
            if name.endswith("static"):  # compiles for this batch's shapes
                _, row["warmup_s"] = eval_throughput.timed(fn, device)
            before = compile_counts()
            tokens, seconds = eval_throughput.timed(fn, device)
            compiled, eager = (a - b for a, b in zip(compile_counts(), before, strict=True))
        row.update(prompts=batch, generated_tokens=tokens, seconds=round(seconds, 3),
                   tokens_per_s=round(tokens / seconds, 1))
        if compiled or eager:  # not the steady state its name says: the goals take no value from it
            row["invalid"] = f"its timed call compiled {compiled} graphs and left {eager} frames eager"
        skipped = eval_throughput.cudagraph_skips() - skips
        if skipped:
            row["cuda_graphs_skipped"] = skipped
        report["methods"].setdefault(f"b{batch}", {})[name] = row
        save(report)
    return report


def _run_unit(target: str, args: tuple, result_path: str) -> None:
    """A forked process's body: the unit's result (or its error) as JSON at `result_path`."""
    def save(result: dict[str, Any]) -> None:
        tmp = f"{result_path}.tmp"
        Path(tmp).write_text(json.dumps(result))
        os.replace(tmp, result_path)

    os.environ.pop("LOCAL_RANK", None)
    try:
        fn = globals()[target]
        save(fn(*args, save) if target == "eval_unit" else fn(*args))
    except BaseException as exc:
        traceback.print_exc()
        partial = json.loads(Path(result_path).read_text()) if Path(result_path).is_file() else {}
        save({**partial, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
        raise SystemExit(1) from None


# --- the driver ---------------------------------------------------------------------------------------------------

class Suite:
    """Starts units in forked processes within the parts' deadlines and keeps the JSON at `out` current."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out)
        # CUDA's availability from NVML: DeepSpeed's import asks, and a CUDA-initialised server could not fork.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.work = Path(args.units or self.out.with_suffix(".units"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.report: dict[str, Any] = {"suite": "gpu_suite", "tiny": args.tiny, "command": " ".join(sys.argv),
                                       "budgets_s": args.budgets, "parts": {}, "timings_s": {}}
        self.started = time.monotonic()

    def save(self) -> None:
        self.report["timings_s"]["total"] = round(time.monotonic() - self.started, 1)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=2) + "\n")
        os.replace(tmp, self.out)

    def start(self, name: str, target: str, *args: Any) -> tuple[Any, Path]:
        path = self.work / f"{name}.json"
        path.unlink(missing_ok=True)
        proc = self.ctx.Process(target=_run_unit, args=(target, args, str(path)), name=name)
        proc.start()
        return proc, path

    @staticmethod
    def finish(proc: Any, path: Path, deadline: float) -> dict[str, Any]:
        """Wait for a unit until `deadline`; its result, what it saved before a time-out, or why it has none."""
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
            result = json.loads(path.read_text()) if path.is_file() else {}
            return {**result, "error": "timed out: its part's budget ran out"}
        if path.is_file():
            return json.loads(path.read_text())
        return {"error": f"exit code {proc.exitcode} before any result"}

    def run(self, name: str, target: str, *args: Any, deadline: float) -> dict[str, Any]:
        began = time.monotonic()
        proc, path = self.start(name, target, *args)
        result = self.finish(proc, path, deadline)
        self.report["timings_s"][name] = round(time.monotonic() - began, 1)
        return result


def train_part(suite: Suite, part: str, deadline: float) -> None:
    import train_throughput

    a = suite.args
    shape = "tiny" if a.tiny else part.removeprefix("train-")
    opts = train_opts(a, shape)
    variants: dict[str, Any] = {}
    suite.report["parts"][part] = record = {"shape": shape, **{k: v for k, v in opts.items() if k != "bottleneck"},
                                            "bottleneck": opts["bottleneck"] or
                                            train_throughput.matched_bottleneck(shape), "variants": variants}
    for variant in TINY_ORDER if a.tiny else TRAIN_ORDER[part]:
        if time.monotonic() >= deadline:
            variants[variant] = {"error": "not run: its part's budget ran out"}
            continue
        variants[variant] = suite.run(f"{part}-{variant}", "train_unit", shape, variant, opts, deadline=deadline)
        variants[variant].pop("step_ends", None)
        ok = {k: v for k, v in variants.items() if "tokens_per_s" in v}
        record["ratios"] = train_throughput.ratios(ok, "tokens_per_s")
        record["memory_ratios"] = train_throughput.ratios(ok, "peak_memory_gib")
        suite.save()


def train_opts(a: argparse.Namespace, shape: str) -> dict[str, Any]:
    if a.tiny:
        return dict(seq=32, micro_batch_size=2, batch_size=4, steps=2, warmup=1, dropout=0.05, bottleneck=32,
                    zero_stage=2, peak_tflops=a.peak_tflops, compile_backend="eager", peft_compile=a.peft_compile)
    return dict(seq=256, micro_batch_size=16, batch_size=16, steps=a.steps, warmup=a.warmup,
                dropout=0.0 if shape == "1b" else 0.05, bottleneck=None, zero_stage=2, peak_tflops=a.peak_tflops,
                compile_backend="inductor", peft_compile=a.peft_compile)


def eval_part(suite: Suite, part: str, deadline: float) -> None:
    a = suite.args
    opts = dict(shape="tiny", new_tokens=8, prompt_chars=16, batches=[1, 8], gsm8k_prompts=16,
                gsm8k_new_tokens=8, gsm8k_batch=8, compile=True, backend="eager") if a.tiny else \
        dict(shape="7b", new_tokens=128, prompt_chars=128, batches=[1, 64, 128], gsm8k_prompts=1319,
             gsm8k_new_tokens=256, gsm8k_batch=128, compile=True, backend="inductor")
    shared = REPO.parent / "shared" / "data" / "llm-adapters"
    opts["data_root"] = a.data_root or os.environ.get("ADAPTUNE_DATA") or (str(shared) if shared.is_dir() else None)
    result = suite.run(part, "eval_unit", opts, deadline=deadline)
    methods = result.get("methods", {})
    result["ratios"] = {f"{batch}: {mine}/{name}": round(rows[mine]["tokens_per_s"] / row["tokens_per_s"], 3)
                        for batch, rows in methods.items() for mine in ("ours_static", "ours") if mine in rows
                        for name, row in rows.items() if not name.startswith("ours")}
    suite.report["parts"][part] = result
    suite.save()


def overlap_rates(runs: list[dict[str, Any]], warmup: int) -> tuple[float, float]:
    """(aggregate tokens/s, seconds) over the window in which every run was past its warm-up steps.

    Run i's rate is tokens_per_step · (steps ending inside [start, end]) / (end − start), with start
    the latest end of a warm-up and end the earliest end of a last step.
    """
    start = max(r["step_ends"][warmup - 1] if warmup else r["step_ends"][0] for r in runs)
    end = min(r["step_ends"][-1] for r in runs)
    if end <= start:
        raise ValueError("the trials never ran at the same time (no overlap after their warm-up)")
    inside = [sum(start < t <= end for t in r["step_ends"]) * r["tokens_per_step"] for r in runs]
    return sum(inside) / (end - start), end - start


def share_part(suite: Suite, part: str, deadline: float) -> None:
    a = suite.args
    shape = "tiny" if a.tiny else "small"
    n = a.share_trials
    opts = {**train_opts(a, shape), "micro_batch_size": 4, "batch_size": 4, "steps": 6 if a.tiny else 40,
            "warmup": 2 if a.tiny else 5, "bottleneck": 32}
    record: dict[str, Any] = {"shape": shape, "trials": n, "variant": "ours-lora", "alone": {}, "together": []}
    suite.report["parts"][part] = record
    alone = suite.run(f"{part}-alone", "train_unit", shape, "ours-lora", opts, deadline=deadline)
    if "step_ends" not in alone:
        record["alone"] = alone
        suite.save()
        return
    one, _ = overlap_rates([alone], opts["warmup"])
    record["alone"] = {"tokens_per_s": round(one, 1), "peak_memory_gib": alone["peak_memory_gib"]}
    suite.save()
    barrier = tempfile.mkdtemp(prefix="share-start-")  # each trial's first step ends, then all go on together
    together = {**opts, "barrier": (barrier, n)}
    started = [suite.start(f"{part}-together-{i}", "train_unit", shape, "ours-lora", together) for i in range(n)]
    runs = [Suite.finish(proc, path, deadline) for proc, path in started]
    shutil.rmtree(barrier, ignore_errors=True)
    record["together"] = [{k: v for k, v in r.items() if k != "step_ends"} for r in runs]
    if all("step_ends" in r for r in runs):
        try:
            total, window = overlap_rates(runs, opts["warmup"])
            record.update(aggregate_tokens_per_s=round(total, 1), window_s=round(window, 2),
                          aggregate_over_one=round(total / one, 3))
        except ValueError as exc:
            record["error"] = str(exc)
    suite.save()


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal's value beside its target; `met` is None where unmeasured, where the row it comes from is
    `invalid` (its timed call compiled), and always after --tiny."""
    rows = []
    for name, part, path, target, sense in GOALS:
        value: Any = report["parts"].get(part, {})
        invalid = None
        for key in path:
            if isinstance(value, dict):
                invalid = value.get("invalid", invalid)
            value = value.get(key) if isinstance(value, dict) else None
        met = (None if value is None or invalid or report["tiny"]
               else (value >= target if sense == "min" else value <= target))
        row = {"goal": name, "value": value, "target": f"{'>=' if sense == 'min' else '<='} {target}", "met": met}
        rows.append({**row, "invalid": invalid} if invalid else row)
    return rows


def table(report: dict[str, Any]) -> str:
    lines = [f"{'part':9} {'what':34} {'tok/s':>10} {'GiB':>7} {'MFU':>6}  note"]
    for part, rec in report["parts"].items():
        for name, v in rec.get("variants", {}).items():
            lines.append(f"{part:9} {name:34} {v.get('tokens_per_s', ''):>10} {v.get('peak_memory_gib', ''):>7} "
                         f"{v.get('mfu', ''):>6}  {v.get('error', '')[:60]}")
        for batch, rows in rec.get("methods", {}).items():
            for name, v in rows.items():
                skipped = f"CUDA graphs skipped ({v['cuda_graphs_skipped']}) " if "cuda_graphs_skipped" in v else ""
                lines.append(f"{part:9} {batch + ' ' + name:34} {v['tokens_per_s']:>10} {'':>7} {'':>6}  "
                             f"{skipped}{v.get('invalid', '')}")
        if "gsm8k" in rec:
            lines.append(f"{part:9} {'gsm8k-sized':34} {rec['gsm8k']['tokens_per_s']:>10} {'':>7} {'':>6}  "
                         f"wall {rec['gsm8k']['wall_s']} s")
        if "aggregate_tokens_per_s" in rec:
            what = f"{rec['trials']} together (aggregate)"
            lines.append(f"{part:9} {what:34} {rec['aggregate_tokens_per_s']:>10} "
                         f"{'':>7} {'':>6}  alone {rec['alone']['tokens_per_s']}")
        if "error" in rec:
            lines.append(f"{part:9} {'error':34} {'':>10} {'':>7} {'':>6}  {rec['error'][:60]}")
    lines.append("")
    for g in report["goals"]:
        if report["tiny"]:
            unmet = "no claim (--tiny)"
        else:
            unmet = f"invalid: {g['invalid']}" if "invalid" in g else "not measured"
        mark = {True: "met", False: "NOT met", None: unmet}[g["met"]]
        lines.append(f"goal  {g['goal']:52} {g['value']!s:>10} {g['target']:>9}  {mark}")
    return "\n".join(lines)


RUNNERS = {"train-7b": train_part, "train-1b": train_part, "eval": eval_part, "share": share_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu-suite.json"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on a CPU: the code paths, no claims")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, of: " + " ".join(PARTS))
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every budget (slow machines)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation happens here)")
    parser.add_argument("--share-trials", type=int, default=None, help="trials sharing the device (tiny: 2, else 4)")
    parser.add_argument("--peft-compile", choices=["regional", "whole"], default="regional",
                        help="the PEFT baseline's compile: each decoder layer (fits the budget), or the whole model "
                             "(the issue's anchor: about 2 minutes at 7B; give train-7b a larger budget)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--units", default=None, help="each unit's own JSON (default: beside --out, .units)")
    args = parser.parse_args()
    budgets = dict(TINY_BUDGETS if args.tiny else BUDGETS)
    for item in args.budget:
        part, _, seconds = item.partition("=")
        budgets[part] = float(seconds)
    args.budgets = {k: v * args.budget_scale for k, v in budgets.items()}
    args.share_trials = args.share_trials or (2 if args.tiny else 4)
    parts = [p for p in args.parts.split(",") if p and args.budgets.get(p, 0) > 0]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    suite = Suite(args)
    begin = time.monotonic()
    ready = suite.run("ready", "ready_unit", deadline=begin + 600)
    suite.report["start_method"] = "forkserver"
    if "error" in ready:  # slower but sure: every unit a fresh interpreter
        suite.ctx = multiprocessing.get_context("spawn")
        suite.report["start_method"] = f"spawn (forked units failed: {ready['error']})"
        ready = suite.run("ready-spawn", "ready_unit", deadline=time.monotonic() + 600)
    suite.report["timings_s"]["start"] = round(time.monotonic() - begin, 1)
    suite.report["device"] = ready.get("device", ready.get("error"))
    suite.report["versions"] = ready.get("versions")
    suite.save()
    for part in parts:
        part_start = time.monotonic()
        try:
            RUNNERS[part](suite, part, part_start + args.budgets[part])
        except Exception as exc:  # a part's failure never takes the others' results with it
            suite.report["parts"].setdefault(part, {})["error"] = f"{type(exc).__name__}: {exc}"
        suite.report["timings_s"][part] = round(time.monotonic() - part_start, 1)
        suite.save()
    suite.report["goals"] = goals(suite.report)
    suite.save()
    print(table(suite.report))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
