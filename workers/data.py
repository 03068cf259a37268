"""Training and evaluation data in the LLM-Adapters format, tokenised, cached and batched.

Every data set is a JSON list of records with `instruction`, `input`, `output` and `answer`, the
layout of the paper's repository (`dataset/<Set>/test.json`, `ft-training_set/<name>.json`). Task
names resolve against a data root: the spec's `data_root`, else `$ADAPTUNE_DATA`, else `./data`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from workers.errors import ConfigError
from workers.prompts import Template, training_prompt
from workers.tasks import Task, data_root, normalise, task_file, task_of_answers, train_file

if TYPE_CHECKING:
    from workers.spec import DataSpec

datasets.disable_progress_bars()


def custom_task(path: Path) -> Task:
    """A custom set's scoring, read off the gold answers of its records."""
    return task_of_answers(path, load_records(path)["answer"])


# --- records ---------------------------------------------------------------------------------------------------

def load_records(path: Path, required: Sequence[str] = ("instruction", "answer")) -> datasets.Dataset:
    """The records of a paper-format JSON file, each checked to have non-empty `required` fields."""
    try:
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps JSON and arrow errors in several types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(str(path), None, f"cannot read the JSON records: {reason}") from None
    if len(ds) == 0:
        raise ConfigError(str(path), None, "the file holds no records")
    for key in required:
        if key not in ds.column_names:
            raise ConfigError(str(path), f"record 0.{key}", f"missing; every record needs {', '.join(required)}")
        for index, value in enumerate(ds[key]):
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ConfigError(str(path), f"record {index}.{key}", "missing or empty")
    return ds


def tokenize_example(
    record: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    cutoff_len: int,
    train_on_inputs: bool,
    template: Template = "paper",
) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels of one training record, as the paper's finetune.py tokenises it.

    The text is the training template (`workers.prompts.training_prompt`). The full prompt is truncated
    at `cutoff_len`, EOS appended when there is room; labels copy the ids, and with `train_on_inputs`
    false the prompt part (the same template with an empty output) is masked out (-100).
    """
    full = training_prompt(record["instruction"], record.get("input"), record.get("output"), template)
    ids = _tokenize(tokenizer, full, cutoff_len, add_eos=True)
    labels = list(ids)
    if not train_on_inputs:
        prompt = training_prompt(record["instruction"], record.get("input"), None, template)
        n_prompt = len(_tokenize(tokenizer, prompt, cutoff_len, add_eos=False))
        labels[:n_prompt] = [-100] * n_prompt
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "length": len(ids)}


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str, cutoff_len: int, add_eos: bool) -> list[int]:
    ids = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False)["input_ids"]
    if add_eos and len(ids) < cutoff_len and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


# --- the leakage guard ----------------------------------------------------------------------------------------

def check_leakage(train: datasets.Dataset, eval_tasks: Sequence[str], root: Path, train_path: Path) -> None:
    """Fail when training instructions appear in an evaluation set (the paper's files had some)."""
    seen = {normalise(t) for t in train["instruction"]}
    for name in eval_tasks:
        path = task_file(name, root)
        overlap = [t for t in load_records(path)["instruction"] if normalise(t) in seen]
        if overlap:
            examples = "; ".join(repr(t[:60]) for t in overlap[:3])
            raise ConfigError(
                str(train_path), "data.allow_leakage",
                f"{len(overlap)} training instructions also appear in the {name} test set ({path}), "
                f"e.g. {examples}; remove them or set data.allow_leakage: true",
            )


# --- the training data ----------------------------------------------------------------------------------------

@dataclass
class TrainData:
    """Tokenised training and validation sets, with what was done to them."""

    train: datasets.Dataset
    val: datasets.Dataset | None
    stats: dict[str, Any] = field(default_factory=dict)


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    return _fingerprint(type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer),
                        sorted(tokenizer.get_vocab().items())[:64], tokenizer.eos_token_id)


def build_train_data(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase, seed: int, cache_dir: Path | None = None
) -> TrainData:
    """Load, check, split and tokenise the training set of `spec`; tokenised sets are cached on disk.

    The cache key is the file's content hash, the tokenizer, `cutoff_len`, `train_on_inputs`, the
    template's text, `limit_train`, `val_set_size` and `seed`: a second call with the same inputs loads the
    tokenised Arrow files and calls the tokenizer on nothing.
    """
    path, records = _train_records(spec)
    records, val = _split_validation(records, spec.val_set_size, seed, path)
    cache = Path(cache_dir or Path.home() / ".cache" / "adaptune" / "tokenised")
    cache.mkdir(parents=True, exist_ok=True)
    key = _cache_key(path, tokenizer, spec, seed)
    train = _tokenise(records, tokenizer, spec, cache / f"{key}-train")
    if len(train) == 0:
        raise ConfigError(
            str(path), "data.cutoff_len",
            f"no training example has a response token within cutoff_len {spec.cutoff_len}",
        )
    val_tok = _tokenise(val, tokenizer, spec, cache / f"{key}-val") if val is not None else None
    stats = {
        "train_file": str(path),
        "train_examples": len(train),
        "val_examples": len(val_tok) if val_tok is not None else 0,
        "dropped_after_cutoff": len(records) - len(train),
        "train_tokens": int(sum(train["length"])),
    }
    return TrainData(train=train, val=val_tok, stats=stats)


def _train_records(spec: DataSpec) -> tuple[Path, datasets.Dataset]:
    """The training file of `spec` and its records, checked for leakage, cut to `limit_train`."""
    if spec.train is None:
        raise ConfigError(None, "data.train", "no training set given")
    root = data_root(spec.data_root)
    path = train_file(spec.train, root)
    records = load_records(path, required=("instruction", "output"))
    if not spec.allow_leakage:
        check_leakage(records, spec.eval, root, path)
    if spec.limit_train is not None:
        records = records.select(range(min(spec.limit_train, len(records))))
    return path, records


def _split_validation(
    records: datasets.Dataset, val_set_size: int, seed: int, path: Path
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, validation): `val_set_size` records drawn at random by `seed`, none when it is 0."""
    if val_set_size <= 0:
        return records, None
    if val_set_size >= len(records):
        raise ConfigError(
            str(path), "data.val_set_size",
            f"{val_set_size} validation examples asked of {len(records)} training records",
        )
    split = records.train_test_split(test_size=val_set_size, shuffle=True, seed=seed)
    return split["train"], split["test"]


def _cache_key(path: Path, tokenizer: PreTrainedTokenizerBase, spec: DataSpec, seed: int) -> str:
    """What the tokenised sets depend on: the file's bytes, the tokenizer, the template and the split."""
    return _fingerprint(
        hashlib.sha256(path.read_bytes()).hexdigest(), _tokenizer_fingerprint(tokenizer), spec.cutoff_len,
        spec.train_on_inputs, training_prompt("{i}", "{n}", "{o}", spec.template),
        training_prompt("{i}", None, "{o}", spec.template), spec.limit_train, spec.val_set_size, seed,
    )


def _tokenise(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, spec: DataSpec, stem: Path
) -> datasets.Dataset:
    """`ds` tokenised by `tokenize_example` (cached in `<stem>.arrow`), less the examples without a label token
    (cached in `<stem>-kept.arrow`)."""
    fn = lambda r: tokenize_example(r, tokenizer, spec.cutoff_len, spec.train_on_inputs, spec.template)  # noqa: E731
    out = ds.map(fn, remove_columns=ds.column_names, cache_file_name=f"{stem}.arrow")
    # An example whose labels are all masked (a prompt longer than the cutoff) teaches nothing.
    return out.filter(lambda r: any(x != -100 for x in r["labels"]), cache_file_name=f"{stem}-kept.arrow")


# --- batches --------------------------------------------------------------------------------------------------

Row = tuple[int, ...]
MicroBatch = list[Row]


def _first_fit(items: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Each item into the first bin with room for it, a new bin when none has: the bins, in order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in items:
        fit = next((b for b, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            bins.append([])
            room.append(capacity)
            fit = len(bins) - 1
        bins[fit].append(i)
        room[fit] -= lengths[i]
    return bins


def micro_batches(
    lengths: Sequence[int],
    micro_batch_size: int,
    *,
    seed: int,
    epoch: int,
    group_by_length: bool = False,
    packing: bool = False,
    cutoff_len: int = 256,
) -> list[MicroBatch]:
    """The order of one epoch: micro-batches of rows, each row the example indices it holds.

    Without packing every row holds one example. The same (seed, epoch) always gives the same
    order, so a resumed run and every data-parallel rank see the same sequence.
    `group_by_length` shuffles, then sorts within mega-batches of 50 micro-batches by length, as
    transformers' LengthGroupedSampler does. `packing` fills rows of up to `cutoff_len` tokens with
    whole examples: the shuffled examples of each such mega-batch go, longest first, into the first
    row with room (first-fit decreasing), which leaves rows nearly full and of nearly equal length,
    so the micro-batches that stack them carry little padding.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not (packing or group_by_length):
        rows: list[Row] = [(i,) for i in order]
    else:
        mega = micro_batch_size * 50
        windows = [sorted(order[start:start + mega], key=lambda j: -lengths[j])
                   for start in range(0, len(order), mega)]
        if packing:
            rows = [tuple(b) for window in windows for b in _first_fit(window, lengths, cutoff_len)]
        else:
            rows = [(i,) for window in windows for i in window]
    return [rows[start:start + micro_batch_size] for start in range(0, len(rows), micro_batch_size)]


def collate(rows: Sequence[Sequence[dict[str, list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of a micro-batch; a row of several examples is packed.

    Packed rows get position ids that restart at every example and a 4-D block-diagonal causal
    mask, so no token attends across examples. The mask is additive (0 where a token attends, the
    dtype's minimum elsewhere), the form every attention path takes: SDPA, and eager code that adds
    the mask to its scores (GPT-J, any model under `attn_implementation="eager"`). It is float32:
    cast it to the model's dtype (`to_device`). Labels are -100 on padding.
    """
    width = max(sum(len(ex["input_ids"]) for ex in row) for row in rows)
    packed = any(len(row) > 1 for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row):
            n = len(ex["input_ids"])
            input_ids[r, start:start + n] = torch.tensor(ex["input_ids"])
            labels[r, start:start + n] = torch.tensor(ex["labels"])
            mask[r, start:start + n] = 1
            position_ids[r, start:start + n] = torch.arange(n)
            segment[r, start:start + n] = s
            start += n
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    if packed:
        same = segment[:, :, None] == segment[:, None, :]
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        valid = (segment >= 0)[:, :, None] & (segment >= 0)[:, None, :]
        # Padding rows attend to themselves only, which keeps the softmax finite.
        blocks = (same & causal & valid) | torch.eye(width, dtype=torch.bool)
        additive = torch.zeros(blocks.shape).masked_fill(~blocks, torch.finfo(torch.float32).min)
        batch["attention_mask"] = additive[:, None]
        batch["position_ids"] = position_ids
    return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A collated batch on `device`, its additive mask (the only floating tensor) in the model's `dtype`."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


def padding_share(micro_batch: MicroBatch, lengths: Sequence[int]) -> float:
    """The share of positions of a collated micro-batch that carry no token."""
    row_tokens = [sum(lengths[i] for i in row) for row in micro_batch]
    return 1.0 - sum(row_tokens) / (len(row_tokens) * max(row_tokens))
