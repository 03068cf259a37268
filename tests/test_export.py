"""`adaptune export`: a trained adapter to PEFT's format, loaded by PEFT with the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clirunner import run_cli
from test_adapters_io import IDS, METHODS, trained
from tiny_models import TINY_CONFIGS, tiny_model

from workers.adapters.io import save_adapter


def saved(family: str, fields: dict, tmp_path: Path) -> tuple[torch.Tensor, Path]:
    """The logits of a trained tiny adapter and its folder, saved as a trial saves it (with its base)."""
    TINY_CONFIGS[family].save_pretrained(tmp_path / "base")
    model, spec = trained(family, fields)
    with torch.no_grad():
        logits = model(IDS).logits
    return logits, save_adapter(model, spec, tmp_path / "adapter", base_model=str(tmp_path / "base"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_exported_lora_adapter_computes_the_same_in_peft(family: str, tmp_path: Path, monkeypatch, capsys) -> None:
    from peft import PeftModel

    expected, adapter = saved(family, dict(type="lora", placement=["attn", "mlp"], rank=4, alpha=8, dropout=0.0),
                              tmp_path)
    out = tmp_path / "peft"
    code, stdout, err = run_cli(["export", str(adapter), "--format", "peft", "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert str(out) in stdout
    peft_model = PeftModel.from_pretrained(tiny_model(family, seed=1), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_another_base_folder_can_be_named(tmp_path: Path, monkeypatch, capsys) -> None:
    _, adapter = saved("llama", METHODS["lora"], tmp_path)
    (tmp_path / "base").rename(tmp_path / "moved")
    code, _, err = run_cli(["export", str(adapter), "--out", str(tmp_path / "x")], monkeypatch, capsys)
    assert code == 2 and "base" in err
    code, _, err = run_cli(["export", str(adapter), "--out", str(tmp_path / "x"), "--model", str(tmp_path / "moved")],
                           monkeypatch, capsys)
    assert code == 0, err


@pytest.mark.parametrize(("method", "args", "needle"), [
    ("series", [], "only LoRA"),
    ("lora", ["--format", "onnx"], "--format: expected peft"),
])
def test_what_cannot_be_exported_is_one_line(method, args, needle, tmp_path: Path, monkeypatch, capsys) -> None:
    _, adapter = saved("llama", METHODS[method], tmp_path)
    code, _, err = run_cli(["export", str(adapter), "--out", str(tmp_path / "x"), *args], monkeypatch, capsys)
    assert code == 2 and needle in err and err.startswith("error: ") and "\n" not in err.strip(), err
    assert not (tmp_path / "x").exists()
