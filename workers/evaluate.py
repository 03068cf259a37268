"""Evaluation on the paper's tasks: batched greedy generation, answer extraction, accuracy.

The paper's script generates one question at a time with beam search 4 (`protocol: paper`, kept
for faithful reproductions). The default `batched` protocol decodes greedily many prompts at once:
prompts sorted by length to cut padding, left padding with an attention mask and explicit
position ids, a KV cache, and each row stopping at EOS.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from transformers import CompileConfig, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase, StaticCache

from workers.data import custom_task, load_records
from workers.names import ACCURACY_PREFIX, MACRO_ACCURACY
from workers.prompts import Template, evaluation_prompt
from workers.scoring import extract, is_correct
from workers.tasks import Task, is_custom, task, task_file

if TYPE_CHECKING:
    from workers.spec import EvalSpec


@dataclass
class TaskResult:
    task: str
    accuracy: float
    correct: int
    total: int
    predictions_path: Path | None = None


@dataclass
class EvalResult:
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def macro_accuracy(self) -> float:
        """The unweighted mean of the per-set accuracies, as the paper averages its tables."""
        return sum(t.accuracy for t in self.tasks.values()) / len(self.tasks) if self.tasks else 0.0

    def metrics(self) -> dict[str, float]:
        out = {f"{ACCURACY_PREFIX}{name}": t.accuracy for name, t in self.tasks.items()}
        out[MACRO_ACCURACY] = self.macro_accuracy
        return out


def _accepts(model: PreTrainedModel, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


CACHE_BUCKET = 256  # static caches are sized in multiples of this, so that calls of similar lengths share one shape


def _bucket(length: int) -> int:
    return -(-length // CACHE_BUCKET) * CACHE_BUCKET


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    *,
    stop_at_eos: bool = True,
    cache: Literal["dynamic", "static"] = "dynamic",
    compile_config: CompileConfig | None = None,
) -> tuple[list[list[int]], int]:
    """Greedy continuations of `prompts` (token ids, EOS excluded) and the number generated.

    Prompts run longest first, `batch_size` at a time, left-padded. `cache="dynamic"` drops the rows
    that reached EOS from the batch and its cache, so finished rows cost nothing. `cache="static"`
    keeps one preallocated cache of (batch_size, L) for every batch, L the longest prompt plus
    `max_new_tokens` rounded up to a multiple of `CACHE_BUCKET`, the last batch filled up with
    repeated rows: every decoding step has the same shapes, so `compile_config` (a transformers
    `CompileConfig`) compiles the step once and every batch reuses it; finished rows stay until
    the whole batch is done. Both give the same tokens (tests/test_evaluate.py).
    `stop_at_eos=False` generates exactly `max_new_tokens` per prompt (benchmarks on random weights).
    """
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    eos = tokenizer.eos_token_id
    # Padded positions are masked out, so any id serves where the tokenizer has no pad token.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with_positions = _accepts(model, "position_ids")
    # Only the last position's logits are needed; the full prefill logits would cost batch x width x vocab.
    last_only = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    static = cache == "static"
    total = _bucket(max((len(e) for e in encoded), default=0) + max_new_tokens)
    kv = StaticCache(config=model.config, max_cache_len=total) if static else None
    step_call = model.get_compiled_call(compile_config) if static and compile_config is not None else model
    outputs: list[list[int]] = [[] for _ in prompts]
    generated = 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        filled = rows + [rows[-1]] * (batch_size - len(rows)) if static else rows
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(filled), width), pad, dtype=torch.long)
        mask = torch.zeros((len(filled), total if static else width), dtype=torch.long)
        for r, i in enumerate(filled):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1  # static: the free slots too (causality hides them)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        if static:
            kv.reset()
        past = kv if static else DynamicCache(config=model.config)
        active = torch.arange(len(filled), device=device)  # the batch's rows still decoding
        steps = torch.full((len(filled), max_new_tokens), pad, dtype=torch.long, device=device)
        step_ids, call, n_steps = ids, model, 0
        done = torch.zeros(len(filled), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            kwargs = {"position_ids": positions, **last_only} if with_positions else dict(last_only)
            if static:
                kwargs["cache_position"] = torch.arange(width + step - step_ids.shape[1], width + step, device=device)
            logits = call(
                input_ids=step_ids, attention_mask=mask, past_key_values=past, use_cache=True, **kwargs
            ).logits[:, -1]
            nxt = logits.argmax(-1)
            steps[active, step] = nxt
            n_steps = step + 1
            finished = nxt == eos if stop_at_eos else torch.zeros_like(nxt, dtype=torch.bool)
            if static:  # fixed shapes: a finished row decodes on (its tokens after EOS are dropped)
                done |= finished
                if bool(done.all()):
                    break
            else:
                n_finished = int(finished.sum())
                if n_finished == len(active):
                    break
                if n_finished:  # drop finished rows from the batch and the cache
                    keep = (~finished).nonzero()[:, 0]
                    past.batch_select_indices(keep)
                    active, nxt, mask, positions = active[keep], nxt[keep], mask[keep], positions[keep]
            step_ids, call = nxt[:, None], step_call
            if not static:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            positions = positions[:, -1:] + 1
        table = steps[: len(rows), :n_steps].tolist()
        for r, i in enumerate(rows):
            seq = table[r]
            if stop_at_eos and eos in seq:
                seq = seq[: seq.index(eos)]
            outputs[i] = seq
            generated += len(seq)
    return outputs, generated


@torch.no_grad()
def generate_paper(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int
) -> tuple[list[list[int]], int]:
    """The paper's protocol: one prompt at a time, beam search with 4 beams."""
    device = next(model.parameters()).device
    outputs, generated = [], 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        seq = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=4, do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in seq:
            seq = seq[: seq.index(tokenizer.eos_token_id)]
        outputs.append(seq)
        generated += len(seq)
    return outputs, generated


def new_tokens(spec: EvalSpec, info: Task) -> int:
    """The generation budget: the spec's, else the reference's, 256 for numbers and letters (math,
    evaluate.py) and 32 for answer words (commonsense, commonsense_evaluate.py)."""
    if spec.max_new_tokens is not None:
        return spec.max_new_tokens
    return 32 if info.kind == "choice" else 256


def _write_jsonl_atomically(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    spec: EvalSpec,
    *,
    root: Path,
    out_dir: Path | None = None,
    template: Template = "paper",
    on_progress: Callable[[str, TaskResult], None] | None = None,
) -> EvalResult:
    """Accuracy of `model` on each task; predictions as JSON lines in `out_dir/<task>.jsonl`.

    Questions are asked with the evaluation template (`workers.prompts.evaluation_prompt`), as the
    paper's evaluate.py and commonsense_evaluate.py ask them.
    Every task file is read and checked before the first generation, so a bad file fails fast.
    """
    files = {name: task_file(name, root) for name in tasks}
    records = {name: load_records(path) for name, path in files.items()}
    was_training = model.training
    model.eval()
    result = EvalResult()
    started = time.perf_counter()
    for name in tasks:
        info = custom_task(files[name]) if is_custom(name) else task(name)
        rows = records[name]
        if spec.limit is not None:
            rows = rows.select(range(min(spec.limit, len(rows))))
        prompts = [evaluation_prompt(r["instruction"], r.get("input"), template) for r in rows]
        budget = new_tokens(spec, info)
        if spec.protocol == "paper":
            ids, n = generate_paper(model, tokenizer, prompts, budget)
        else:
            ids, n = generate_greedy(model, tokenizer, prompts, budget, spec.batch_size)
        result.generated_tokens += n
        predictions = []
        for index, (record, prompt, gen_ids) in enumerate(zip(rows, prompts, ids, strict=True)):
            # The paper decodes prompt + generation and keeps what follows the first "### Response:".
            generation = tokenizer.decode(gen_ids, skip_special_tokens=True)
            if spec.scoring == "paper":
                generation = generation.split("### Response:")[0].strip()
            answer = extract(info, generation, spec.scoring)
            gold = str(record["answer"])
            # What a reader compares first, the long prompt last (the artifact viewer shows lines' starts).
            predictions.append({
                "generation": generation, "gold": gold, "correct": is_correct(info, answer, gold),
                "extracted": answer, "id": index, "prompt": prompt,
            })
        correct = sum(p["correct"] for p in predictions)
        path = None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{info.name}.jsonl"
            _write_jsonl_atomically(path, predictions)
        res = TaskResult(info.name, correct / len(predictions), correct, len(predictions), path)
        result.tasks[info.name] = res
        if on_progress is not None:
            on_progress(info.name, res)
    result.seconds = time.perf_counter() - started
    model.train(was_training)
    return result
