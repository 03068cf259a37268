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

from workers.adapters.base import takes_static_cache
from workers.compile import compile_backend, compile_enabled
from workers.data import custom_task, load_records
from workers.names import ACCURACY_PREFIX, MACRO_ACCURACY
from workers.prompts import Template, evaluation_prompt
from workers.scoring import extract, is_correct
from workers.tasks import Task, is_custom, task, task_file

if TYPE_CHECKING:
    import datasets

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


@dataclass
class _GreedyDecoder:
    """What stays fixed over the batches of one `generate_greedy` call.

    `kv` is the model's preallocated `StaticCache` of (batch_size, total) slots, reset for every batch, or
    None for the dynamic protocol (a fresh `DynamicCache` per batch, finished rows dropped from it).
    `synced`: every rank of the process group decodes in step with the others and stops when all are done
    (ZeRO-3 across ranks: each forward gathers the parameters from every rank).
    """

    model: PreTrainedModel
    step_call: Callable  # the model, or its compiled call for the one-token decoding steps
    kv: StaticCache | None
    total: int  # the static cache's length: longest prompt + max_new_tokens, bucketed
    batch_size: int
    max_new_tokens: int
    eos: int | None
    pad: int | None
    stop_at_eos: bool
    with_positions: bool
    last_only: dict[str, int]
    device: torch.device
    synced: bool

    @property
    def static(self) -> bool:
        return self.kv is not None

    def batch(self, encoded: Sequence[list[int]], rows: list[int]) -> list[list[int]]:
        """The continuations of `encoded[i]` for `i` in `rows`, EOS and what follows it cut off.

        A static batch is filled up to `batch_size` with copies of its last row, so every batch has one shape.
        """
        filled = rows + [rows[-1]] * (self.batch_size - len(rows)) if self.static else rows
        width = max(len(encoded[i]) for i in rows)
        ids, mask = _left_pad(encoded, filled, width, self.total if self.static else width, self.pad)
        if self.static:
            self.kv.reset()
        steps, n_steps = self._decode(ids.to(self.device), mask.to(self.device))
        return [self._until_eos(seq) for seq in steps[: len(rows), :n_steps].tolist()]

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Greedy steps on one left-padded batch: the (B, max_new_tokens) token table and the steps taken.

        Step t feeds the last chosen token at position p_t = p_{t-1} + 1 (the prompt's own positions
        count real tokens only: p = cumsum(mask) - 1) and takes x_{t+1} = argmax_v logits_t[v].
        """
        n, width = ids.shape
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        past = self.kv if self.static else DynamicCache(config=self.model.config)
        active = torch.arange(n, device=self.device)  # the batch's rows still decoding
        steps = torch.full((n, self.max_new_tokens), self.pad, dtype=torch.long, device=self.device)
        step_ids, call, n_steps = ids, self.model, 0
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        for step in range(self.max_new_tokens):
            nxt = self._last_logits(call, step_ids, mask, past, positions, end=width + step).argmax(-1)
            steps[active, step] = nxt
            n_steps = step + 1
            finished = nxt == self.eos if self.stop_at_eos else torch.zeros_like(nxt, dtype=torch.bool)
            if self.static or self.synced:  # a finished row decodes on (its tokens after EOS are dropped)
                done |= finished
                if self._all_done(done):
                    break
            else:
                n_finished = int(finished.sum())
                if n_finished == len(active):
                    break
                if n_finished:
                    active, nxt, mask, positions = _drop_finished(past, finished, active, nxt, mask, positions)
            step_ids, call = nxt[:, None], self.step_call
            if not self.static:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            positions = positions[:, -1:] + 1
        return steps, n_steps

    def _all_done(self, done: torch.Tensor) -> bool:
        """Whether every row is done: this rank's, or every rank's when `synced` (one all-reduce a step; a rank
        that stopped alone would leave the others waiting in their next forward's gather for good)."""
        if not self.synced:
            return bool(done.all())
        flag = done.all().to(torch.int32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _last_logits(
        self, call: Callable, step_ids: torch.Tensor, mask: torch.Tensor, past: DynamicCache | StaticCache,
        positions: torch.Tensor, *, end: int,
    ) -> torch.Tensor:
        """Logits (B, vocab) at the last position of `step_ids` (B, T), which fills cache slots [end - T, end)."""
        kwargs = {"position_ids": positions, **self.last_only} if self.with_positions else dict(self.last_only)
        if self.static:
            kwargs["cache_position"] = torch.arange(end - step_ids.shape[1], end, device=self.device)
        return call(
            input_ids=step_ids, attention_mask=mask, past_key_values=past, use_cache=True, **kwargs
        ).logits[:, -1]

    def _until_eos(self, seq: list[int]) -> list[int]:
        return seq[: seq.index(self.eos)] if self.stop_at_eos and self.eos in seq else seq


def _left_pad(
    encoded: Sequence[list[int]], rows: Sequence[int], width: int, mask_width: int, pad: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, width), each row's tokens right-aligned after `pad`; mask (B, mask_width), 1 from its first token on."""
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), mask_width), dtype=torch.long)
    for r, i in enumerate(rows):
        ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
        mask[r, width - len(encoded[i]):] = 1  # static: the free slots too (causality hides them)
    return ids, mask


def _drop_finished(
    past: DynamicCache, finished: torch.Tensor, *rows: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The rows not `finished` of each tensor in `rows` (indexed on dim 0), the cache cut down to them too."""
    keep = (~finished).nonzero()[:, 0]
    past.batch_select_indices(keep)
    return tuple(t[keep] for t in rows)


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
    synced: bool = False,
) -> tuple[list[list[int]], int]:
    """Greedy continuations of `prompts` (token ids, EOS excluded) and the number generated.

    Prompts run longest first, `batch_size` at a time, left-padded. `cache="dynamic"` drops the rows
    that reached EOS from the batch and its cache, so finished rows cost nothing. `cache="static"`
    keeps one preallocated cache of (batch_size, L) for every batch, L the longest prompt plus
    `max_new_tokens` rounded up to a multiple of `CACHE_BUCKET`, the last batch filled up with
    repeated rows: every decoding step has the same shapes, so `compile_config` (a transformers
    `CompileConfig`) compiles the step once and every batch reuses it; finished rows stay until
    the whole batch is done. Both give the same tokens in float32 (tests/test_evaluate.py). In bf16 they
    can differ where two tokens' logits nearly tie: the two attend over different lengths, in different
    batch shapes and kernels, and bf16 rounds them differently (measured on a random 4-layer LLaMA on
    CPU: 10 of 48 rows; 0 in float32; a trained model's margins are wider). So do batch sizes. A model
    whose adapter takes no static cache (`AdapterLayer.static_cache`: prefix tuning) decodes with the
    dynamic one.
    `stop_at_eos=False` generates exactly `max_new_tokens` per prompt (benchmarks on random weights).
    `synced=True` (every rank calls it, with as many prompts): each batch stops when every rank's is done, and
    finished rows stay, as in the static protocol; the same tokens.
    """
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    decoder = _greedy_decoder(model, tokenizer, encoded, max_new_tokens, batch_size, stop_at_eos, cache, compile_config,
                              synced)
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for i, seq in zip(rows, decoder.batch(encoded, rows), strict=True):
            outputs[i] = seq
    return outputs, sum(len(seq) for seq in outputs)


def _static_cache(model: PreTrainedModel, batch_size: int, total: int) -> StaticCache:
    """The model's one static cache, of (batch_size, total) slots: kept on the model and reused by every later call
    of that shape, replaced by one of another. Its tensors are marked as fixed addresses, so a compiled step's CUDA
    graphs recorded over them stay valid from one call (one task) to the next; a new cache per call had them
    recorded again. One at a time: at 7B and batch 128 a cache of 512 slots is 34 GB."""
    held = getattr(model, "_adaptune_static_cache", None)
    if held is None or held[0] != (batch_size, total):
        held = ((batch_size, total), StaticCache(config=model.config, max_cache_len=total))
        model._adaptune_static_cache = held
    return held[1]


def _greedy_decoder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, encoded: Sequence[list[int]], max_new_tokens: int,
    batch_size: int, stop_at_eos: bool, cache: Literal["dynamic", "static"], compile_config: CompileConfig | None,
    synced: bool,
) -> _GreedyDecoder:
    """The decoder `generate_greedy`'s arguments ask for, its static cache sized for the longest of `encoded`;
    the dynamic one for a model whose adapter does not take a static cache (prefix tuning)."""
    static = cache == "static" and takes_static_cache(model)
    total = _bucket(max((len(e) for e in encoded), default=0) + max_new_tokens)
    eos = tokenizer.eos_token_id
    return _GreedyDecoder(
        model=model,
        kv=_static_cache(model, batch_size, total) if static else None,
        step_call=model.get_compiled_call(compile_config) if static and compile_config is not None else model,
        total=total, batch_size=batch_size, max_new_tokens=max_new_tokens, eos=eos,
        # Padded positions are masked out, so any id serves where the tokenizer has no pad token.
        pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        stop_at_eos=stop_at_eos,
        with_positions=_accepts(model, "position_ids"),
        # Only the last position's logits are needed; the full prefill logits would cost batch x width x vocab.
        last_only={"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {},
        device=next(model.parameters()).device,
        synced=synced,
    )


@torch.no_grad()
def generate_paper(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int,
    synced: bool = False,
) -> tuple[list[list[int]], int]:
    """The paper's protocol: one prompt at a time, beam search with 4 beams (`synced`: with every rank, as
    `generate_greedy`'s)."""
    device = next(model.parameters()).device
    outputs, generated = [], 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        seq = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=4, do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced or None,  # None: transformers decides, as before
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
    synced: bool = False,
) -> EvalResult:
    """Accuracy of `model` on each task; predictions as JSON lines in `out_dir/<task>.jsonl`.

    `synced`: every rank evaluates, in step with the others (ZeRO-3 across ranks; see `generate_greedy`).

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
        res, n = _evaluate_task(model, tokenizer, info, records[name], spec, template, out_dir, synced)
        result.generated_tokens += n
        result.tasks[info.name] = res
        if on_progress is not None:
            on_progress(info.name, res)
    result.seconds = time.perf_counter() - started
    model.train(was_training)
    return result


def _evaluate_task(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, info: Task, rows: datasets.Dataset,
    spec: EvalSpec, template: Template, out_dir: Path | None, synced: bool,
) -> tuple[TaskResult, int]:
    """One task's result (its predictions written to `out_dir/<task>.jsonl` when given) and the tokens generated."""
    if spec.limit is not None:
        rows = rows.select(range(min(spec.limit, len(rows))))
    prompts = [evaluation_prompt(r["instruction"], r.get("input"), template) for r in rows]
    ids, n = _generate(model, tokenizer, prompts, new_tokens(spec, info), spec, synced)
    predictions = _predictions(tokenizer, info, spec, rows, prompts, ids)
    correct = sum(p["correct"] for p in predictions)
    path = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{info.name}.jsonl"
        _write_jsonl_atomically(path, predictions)
    return TaskResult(info.name, correct / len(predictions), correct, len(predictions), path), n


def _generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], budget: int, spec: EvalSpec,
    synced: bool,
) -> tuple[list[list[int]], int]:
    """The continuations of `prompts` under the spec's protocol (`paper`: beam search 4, one at a time)."""
    if spec.protocol == "paper":
        return generate_paper(model, tokenizer, prompts, budget, synced)
    on_gpu = model.device.type == "cuda"
    cache = spec.cache or ("static" if on_gpu else "dynamic")
    compiled = cache == "static" and compile_enabled(spec.compile, on_gpu, field="eval.compile")
    return generate_greedy(model, tokenizer, prompts, budget, spec.batch_size, cache=cache,
                           compile_config=CompileConfig(backend=compile_backend()) if compiled else None, synced=synced)


def _predictions(
    tokenizer: PreTrainedTokenizerBase, info: Task, spec: EvalSpec, rows: datasets.Dataset, prompts: list[str],
    ids: list[list[int]],
) -> list[dict]:
    """One prediction line per record: the decoded generation, gold, correctness, the extracted answer."""
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
    return predictions
