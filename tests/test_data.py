"""Training data: label masking, caching, packing, the leakage guard, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from test_prompts import FINETUNE_NO_INPUT
from tiny_models import tiny_model

from workers import data, tasks
from workers.data import (
    build_train_data,
    collate,
    load_records,
    micro_batches,
    padding_share,
    tokenize_example,
)
from workers.errors import ConfigError
from workers.spec import DataSpec
from workers.tasks import task_file


def test_every_task_resolves_to_its_folder(shared_data: Path) -> None:
    present = {name for name in tasks.TASKS if name != "hellaswag"}
    for name in present:
        assert load_records(task_file(name, shared_data)).num_rows > 0
    with pytest.raises(ConfigError, match=r"no test file for task 'hellaswag'.*data root"):
        task_file("hellaswag", shared_data)
    assert set(tasks.MATH_TASKS) | set(tasks.COMMONSENSE_TASKS) == set(tasks.TASKS)


RECORD = {"instruction": "What is 2 + 3?", "input": "", "output": "The answer is 5.", "answer": "5"}


def test_labels_copy_the_ids_when_training_on_inputs(byte_tok) -> None:
    ex = tokenize_example(RECORD, byte_tok, cutoff_len=512, train_on_inputs=True)
    full = byte_tok(FINETUNE_NO_INPUT)["input_ids"]
    assert ex["input_ids"] == [*full, byte_tok.eos_token_id]
    assert ex["labels"] == ex["input_ids"]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])


def test_labels_mask_the_prompt_when_not_training_on_inputs(byte_tok) -> None:
    ex = tokenize_example(RECORD, byte_tok, cutoff_len=512, train_on_inputs=False)
    n_prompt = len(byte_tok(FINETUNE_NO_INPUT.removesuffix("The answer is 5."))["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert byte_tok.decode(ex["labels"][n_prompt:-1]) == "The answer is 5."


def test_cutoff_truncates_without_eos(byte_tok) -> None:
    ex = tokenize_example(RECORD, byte_tok, cutoff_len=40, train_on_inputs=True)
    assert len(ex["input_ids"]) == 40 and ex["input_ids"][-1] != byte_tok.eos_token_id


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def _arith(n: int) -> list[dict]:
    return [
        {"instruction": f"What is {i} plus {i + 1}?", "input": "", "output": f"{2 * i + 1}", "answer": str(2 * i + 1)}
        for i in range(n)
    ]


def test_build_splits_caches_and_reports(tmp_path: Path, byte_tok, monkeypatch) -> None:
    train = _write(tmp_path / "train.json", _arith(40))
    spec = DataSpec(train=str(train), val_set_size=8, cutoff_len=256)
    first = build_train_data(spec, byte_tok, seed=3, cache_dir=tmp_path / "cache")
    assert first.stats["train_examples"] == 32 and first.stats["val_examples"] == 8
    assert first.stats["train_tokens"] == sum(first.train["length"])

    calls = []
    real = data.tokenize_example
    monkeypatch.setattr(data, "tokenize_example", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = build_train_data(spec, byte_tok, seed=3, cache_dir=tmp_path / "cache")
    assert calls == []  # the tokenised sets came from the cache
    assert second.train["input_ids"] == first.train["input_ids"]

    third = build_train_data(spec.model_copy(update={"cutoff_len": 64}), byte_tok, seed=3,
                             cache_dir=tmp_path / "cache")
    assert calls and max(third.train["length"]) <= 64


def test_the_validation_split_depends_on_the_seed(tmp_path: Path, byte_tok) -> None:
    train = _write(tmp_path / "train.json", _arith(40))
    spec = DataSpec(train=str(train), val_set_size=8)
    a = build_train_data(spec, byte_tok, seed=1, cache_dir=tmp_path / "c")
    b = build_train_data(spec, byte_tok, seed=2, cache_dir=tmp_path / "c")
    assert a.val["input_ids"] != b.val["input_ids"]


def test_leakage_guard_catches_a_planted_overlap(tmp_path: Path, byte_tok, shared_data: Path) -> None:
    planted = load_records(task_file("svamp", shared_data)).select(range(3))
    records = _arith(20) + [
        {"instruction": "  " + r["instruction"].upper() + " ", "input": "", "output": "x", "answer": "1"}
        for r in planted
    ]
    spec = DataSpec(train=str(_write(tmp_path / "t.json", records)), eval=["gsm8k", "svamp"],
                    data_root=str(shared_data), val_set_size=0)
    with pytest.raises(ConfigError) as err:
        build_train_data(spec, byte_tok, seed=0, cache_dir=tmp_path / "c")
    assert "3 training instructions also appear in the svamp test set" in str(err.value)
    allowed = build_train_data(spec.model_copy(update={"allow_leakage": True}), byte_tok, seed=0,
                               cache_dir=tmp_path / "c")
    assert allowed.stats["train_examples"] == 23


def test_math_10k_is_refused_with_the_mawps_sets_it_contains() -> None:
    """The reference's announcement: math_10k holds MAWPS training data, hence AddSub, MultiArith, SingleEq."""
    for leaked in ("addsub", "multiarith", "singleeq"):
        with pytest.raises(ValidationError, match=f"math_10k contains the {leaked} test questions"):
            DataSpec(train="math_10k", eval=["gsm8k", leaked])
    assert DataSpec(train="math_10k", eval=["gsm8k", "aqua", "mawps", "svamp"]).eval[2] == "mawps"
    assert DataSpec(train="math_10k", eval=["addsub"], allow_leakage=True).allow_leakage
    for clean in ("math_7k", "math_14k"):
        assert DataSpec(train=clean, eval=["addsub", "multiarith", "singleeq"]).train == clean


@pytest.mark.parametrize("name", ["math_7k", "math_14k"])
def test_math_7k_and_14k_train_and_keep_the_guard(name: str, tmp_path: Path, byte_tok, shared_data: Path) -> None:
    root = tmp_path / "root"
    (root / "ft-training_set").mkdir(parents=True)
    (root / "dataset").symlink_to(shared_data / "dataset")
    _write(root / "ft-training_set" / f"{name}.json", _arith(12))
    spec = DataSpec(train=name, eval=["addsub", "singleeq"], data_root=str(root), val_set_size=0)
    built = build_train_data(spec, byte_tok, seed=0, cache_dir=tmp_path / "c")
    assert built.stats["train_examples"] == 12
    assert built.stats["train_file"] == str(root / "ft-training_set" / f"{name}.json")
    # The content check stays on: a planted AddSub question still fails the run.
    planted = load_records(task_file("addsub", shared_data))[0]["instruction"]
    _write(root / "ft-training_set" / f"{name}.json", [*_arith(12), {**_arith(1)[0], "instruction": planted}])
    with pytest.raises(ConfigError, match="1 training instructions also appear in the addsub test set"):
        build_train_data(spec, byte_tok, seed=0, cache_dir=tmp_path / "c")


def test_epoch_order_is_deterministic_and_complete() -> None:
    lengths = [5, 9, 3, 7, 2, 8, 6, 4, 1, 10]
    a = micro_batches(lengths, 3, seed=0, epoch=0)
    assert a == micro_batches(lengths, 3, seed=0, epoch=0)
    assert a != micro_batches(lengths, 3, seed=0, epoch=1)
    assert sorted(i for mb in a for row in mb for i in row) == list(range(10))
    grouped = micro_batches(lengths, 3, seed=0, epoch=0, group_by_length=True)
    assert [lengths[row[0]] for mb in grouped for row in mb] == sorted(lengths, reverse=True)


def test_packing_fills_rows_and_cuts_padding() -> None:
    lengths = [30, 20, 50, 10, 40, 25, 35, 15]
    packed = micro_batches(lengths, 2, seed=0, epoch=0, packing=True, cutoff_len=64)
    assert sorted(i for mb in packed for row in mb for i in row) == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 64 for mb in packed for row in mb)
    plain = micro_batches(lengths, 2, seed=0, epoch=0)
    share = lambda mbs: sum(padding_share(mb, lengths) for mb in mbs) / len(mbs)  # noqa: E731
    assert share(packed) < share(plain)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "opt", "gptj", "gpt2", "gpt_neox"])
def test_packed_examples_never_attend_across(family: str, attention: str) -> None:
    model = tiny_model(family)
    model.set_attn_implementation(attention)
    g = torch.Generator().manual_seed(0)
    examples = [
        {"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)}
        for ids in (torch.randint(3, 250, (n,), generator=g).tolist() for n in (7, 4, 5))
    ]
    batch = collate([examples[:2], examples[2:]], pad_id=0)
    assert batch["attention_mask"].shape == (2, 1, 11, 11)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    alone = [model(torch.tensor([ex["input_ids"]])).logits[0] for ex in examples]
    torch.testing.assert_close(logits[0, :7], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[0, 7:11], alone[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[1, :5], alone[2], rtol=1e-4, atol=1e-5)
    assert (batch["labels"][1, 5:] == -100).all()


def test_collate_pads_right_and_masks_labels() -> None:
    rows = [[{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}], [{"input_ids": [8], "labels": [8]}]]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in batch


# --- bad input ----------------------------------------------------------------------------------------------

def test_missing_training_file_names_file_and_root(tmp_path: Path, byte_tok) -> None:
    with pytest.raises(ConfigError) as err:
        build_train_data(DataSpec(train="math_10k", data_root=str(tmp_path)), byte_tok, seed=0)
    assert "ft-training_set/math_10k.json" in str(err.value) and str(tmp_path) in str(err.value)


def test_unreadable_json_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[{not json")
    with pytest.raises(ConfigError, match="cannot read the JSON records"):
        load_records(bad)


def test_a_record_without_instruction_names_its_index(tmp_path: Path) -> None:
    records = _arith(5)
    records[3]["instruction"] = ""
    with pytest.raises(ConfigError) as err:
        load_records(_write(tmp_path / "r.json", records))
    assert err.value.field == "record 3.instruction"
    no_answer = [{k: v for k, v in r.items() if k != "answer"} for r in _arith(2)]
    with pytest.raises(ConfigError, match=r"record 0\.answer"):
        load_records(_write(tmp_path / "n.json", no_answer))


def test_unknown_task_is_an_error(shared_data: Path) -> None:
    with pytest.raises(ConfigError, match="unknown task 'gsm9k'"):
        task_file("gsm9k", shared_data)


def test_empty_after_cutoff_is_an_error(tmp_path: Path, byte_tok) -> None:
    spec = DataSpec(train=str(_write(tmp_path / "t.json", _arith(10))), cutoff_len=50,
                    train_on_inputs=False, val_set_size=0)
    with pytest.raises(ConfigError, match="no training example has a response token within cutoff_len 50"):
        build_train_data(spec, byte_tok, seed=0, cache_dir=tmp_path / "c")


def test_tokenizer_without_pad_token_gets_one() -> None:
    from workers.model_loading import byte_tokenizer, ensure_pad_token

    tok = byte_tokenizer()
    tok.pad_token = None
    ensure_pad_token(tok)
    assert tok.pad_token_id is not None
