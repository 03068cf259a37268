"""8-bit base loading: refused with one line naming `load_in_8bit` where CUDA or bitsandbytes is missing.

The loading itself (bitsandbytes LLM.int8() on a CUDA GPU) cannot run on this CPU-only suite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from clirunner import run_cli

from workers.errors import ConfigError
from workers.model_loading import build_model, eight_bit_config
from workers.spec import parse_trial_spec

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "sweeps" / "models" / "tiny-llama")
LORA = {"type": "lora", "placement": ["q", "v"], "rank": 2}


def test_without_a_gpu_8bit_loading_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        build_model(TINY, load_in_8bit=True)
    assert str(err.value) == "load_in_8bit: 8-bit loading (bitsandbytes) needs a CUDA GPU; this machine has none"


def test_without_bitsandbytes_8bit_loading_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # importlib finds no such package
    with pytest.raises(ConfigError) as err:
        eight_bit_config()
    assert str(err.value) == "load_in_8bit: 8-bit loading needs the bitsandbytes package, not installed here"


def test_with_both_the_config_is_transformers_int8(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if name == "bitsandbytes" else None)
    config = eight_bit_config()
    assert config.load_in_8bit is True and config.load_in_4bit is False


@pytest.mark.parametrize(("extra", "needle"), [
    ({"random_init": True}, "load_in_8bit quantizes pretrained weights; random_init has none"),
    ({"train": {"zero_stage": 3}}, "ZeRO-3 cannot partition 8-bit weights"),
])
def test_8bit_with_what_it_cannot_take_is_refused_at_validation(extra, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_trial_spec({"model": TINY, "adapter": LORA, "load_in_8bit": True, **extra})


def test_8bit_trial_on_this_machine_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    spec = {"model": TINY, "tokenizer": "byte", "adapter": LORA, "load_in_8bit": True,
            "data": {"train": str(tmp_path / "never-read.json")}}
    (tmp_path / "t.yaml").write_text(json.dumps(spec))
    code, _, err = run_cli(["trial", str(tmp_path / "t.yaml"), "--tracking-uri", f"sqlite:///{tmp_path}/ml.db",
                            "--checkpoint-dir", str(tmp_path / "c")], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [  # the pre-flight's line, before any store or run exists
        f"error: {tmp_path / 't.yaml'}: load_in_8bit: 8-bit loading (bitsandbytes) needs a CUDA GPU; "
        "the trials run on CPUs"]
    assert not (tmp_path / "ml.db").exists()
