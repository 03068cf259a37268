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
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from workers.data import custom_task, load_records
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
        out = {f"accuracy/{name}": t.accuracy for name, t in self.tasks.items()}
        out["accuracy/macro"] = self.macro_accuracy
        return out


def _accepts(model: PreTrainedModel, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    *,
    stop_at_eos: bool = True,
) -> tuple[list[list[int]], int]:
    """Greedy continuations of `prompts` (token ids, EOS excluded) and the number generated.

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
    outputs: list[list[int]] = [[] for _ in prompts]
    generated = 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        step_ids = ids
        tokens: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            kwargs = {"position_ids": positions, **last_only} if with_positions else last_only
            logits = model(
                input_ids=step_ids, attention_mask=mask, past_key_values=cache, use_cache=True, **kwargs
            ).logits[:, -1]
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            if stop_at_eos:
                done |= nxt == eos
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            positions = positions[:, -1:] + 1
        steps = torch.stack(tokens, dim=1).tolist()
        for r, i in enumerate(rows):
            seq = steps[r]
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
