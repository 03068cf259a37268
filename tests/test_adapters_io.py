"""Adapters on disk: save/load round trips for every method, strict loading, and LoRA in PEFT's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model
from torch import nn

import workers
from workers.adapters.base import adapter_parameters, adapter_state_dict
from workers.adapters.io import export_peft, load_adapter, read_adapter_config, save_adapter
from workers.adapters.mosa import SparseBottleneck
from workers.adapters.registry import count_parameters, finalize, inject
from workers.errors import ConfigError
from workers.spec import parse_trial_spec

IDS = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))

METHODS = {
    "series": dict(type="series", placement=["attn", "mlp"], bottleneck=8),
    "parallel": dict(type="parallel", placement=["up", "down"], bottleneck=8, bias=True, scaling="learned"),
    "mosa": dict(type="mosa", placement=["mlp"], bottleneck=8, parts=4),
    "lora": dict(type="lora", placement=["attn", "mlp"], rank=4, alpha=6, rslora=True),
    "prefix": dict(type="prefix", virtual_tokens=5),
    "prefix-mlp": dict(type="prefix", virtual_tokens=3, reparametrize=True, prefix_hidden=16),
}


def adapter(**fields):
    return parse_trial_spec({"model": "unused", "adapter": fields}).adapter


def trained(family: str, fields: dict, seed: int = 1) -> tuple[nn.Module, object]:
    """A tiny model with the adapter injected and moved off its init, as after some training."""
    spec = adapter(**fields)
    model = tiny_model(family, seed=seed)
    inject(model, spec)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval(), spec


@pytest.mark.parametrize("family", ["llama", "bloom"])
@pytest.mark.parametrize("name", list(METHODS))
def test_a_fresh_base_model_plus_load_gives_identical_logits(name: str, family: str, tmp_path: Path) -> None:
    model, spec = trained(family, METHODS[name])
    expected = model(IDS).logits
    save_adapter(model, spec, tmp_path / "a", base_model="tiny")
    fresh = tiny_model(family, seed=1)
    torch.manual_seed(99)  # the injection draws different inits (and MoSA partitions): all must come from disk
    assert load_adapter(fresh, tmp_path / "a") == spec
    assert torch.equal(fresh.eval()(IDS).logits, expected)
    assert count_parameters(fresh) == count_parameters(model)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {n for n, _ in adapter_parameters(fresh)}


@pytest.mark.parametrize("base", ["series", "parallel"])
def test_a_finalized_mosa_adapter_is_the_dense_adapter_it_merged_into(base: str, tmp_path: Path) -> None:
    fields = dict(type="mosa", base=base, placement=["attn", "up"], bottleneck=8, parts=3, scaling="learned")
    model, spec = trained("llama", fields)
    expected = model(IDS).logits
    deployed = finalize(model, spec)
    assert deployed == adapter(type=base, placement=["attn", "up"], bottleneck=8, scaling="learned")
    assert not any(isinstance(m, SparseBottleneck) for m in model.modules())
    assert torch.equal(model(IDS).logits, expected)  # evaluation already used W = Σ_i W ⊙ M_i
    save_adapter(model, deployed, tmp_path, trained_as=spec)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trained_as"] == spec.model_dump(mode="json")
    assert not any(k.endswith("_part") for k in load_file(str(tmp_path / "adapter.safetensors")))
    fresh = tiny_model("llama", seed=1)
    assert load_adapter(fresh, tmp_path) == deployed
    assert torch.equal(fresh.eval()(IDS).logits, expected)


def test_finalize_leaves_other_methods_as_they_are() -> None:
    model, spec = trained("llama", METHODS["lora"])
    expected = model(IDS).logits
    assert finalize(model, spec) is spec
    assert torch.equal(model(IDS).logits, expected)


def test_the_folder_holds_the_config_and_only_adapter_tensors(tmp_path: Path) -> None:
    model, spec = trained("llama", METHODS["mosa"])
    save_adapter(model, spec, tmp_path, base_model="huggyllama/llama-7b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta == {
        "adaptune_version": workers.__version__,
        "base_model": "huggyllama/llama-7b",
        "family": "llama",
        "adapter": spec.model_dump(mode="json"),
    }
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    state = adapter_state_dict(model)
    assert saved.keys() == state.keys()
    params = dict(adapter_parameters(model))
    assert sum(saved[k].numel() for k in params) == count_parameters(model).trainable
    # Besides parameters, only MoSA's partition of each sparse layer's two weights.
    sparse = [name for name, m in model.named_modules() if isinstance(m, SparseBottleneck)]
    assert sparse and set(saved) - set(params) == {f"{n}.{w}_part" for n in sparse for w in ("down", "up")}
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert read_adapter_config(tmp_path) == spec


def _saved(tmp_path: Path) -> Path:
    model, spec = trained("llama", METHODS["lora"])
    return save_adapter(model, spec, tmp_path / "saved")


def _rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(str(folder / "adapter.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "adapter.safetensors"))


def _drop_one(tensors: dict) -> None:
    tensors.pop(sorted(tensors)[0])


def _add_one(tensors: dict) -> None:
    tensors["model.layers.0.stray.weight"] = torch.zeros(2)


def _reshape_one(tensors: dict) -> None:
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])


@pytest.mark.parametrize(
    ("damage", "file", "needle"),
    [
        (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json", "no adapter config"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), "adapter_config.json", ""),
        (lambda d: (d / "adapter.safetensors").unlink(), "adapter.safetensors", ""),
        (lambda d: _rewrite_weights(d, _drop_one), "adapter.safetensors", "missing"),
        (lambda d: _rewrite_weights(d, _add_one), "adapter.safetensors", "model.layers.0.stray.weight"),
        (lambda d: _rewrite_weights(d, _reshape_one), "adapter.safetensors", "shape"),
    ],
    ids=["no-config", "bad-json", "no-weights", "missing-key", "unexpected-key", "wrong-shape"],
)
def test_a_damaged_folder_is_a_config_error_naming_the_file(damage, file: str, needle: str, tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    damage(folder)
    with pytest.raises(ConfigError) as err:
        load_adapter(tiny_model("llama"), folder)
    assert err.value.file == str(folder / file)
    assert needle in str(err.value)


def test_an_invalid_adapter_config_names_the_field(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["adapter"]["rank"] = 0
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as err:
        load_adapter(tiny_model("llama"), folder)
    assert err.value.file == str(folder / "adapter_config.json") and err.value.field == "adapter.rank"


def test_a_different_rank_than_saved_fails(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["adapter"]["rank"] = 8
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="shape"):
        load_adapter(tiny_model("llama"), folder)


# --- PEFT ------------------------------------------------------------------------------------------------------

PEFT_CASES = {
    "llama": dict(placement=["q", "k", "v", "up", "down"]),
    "bloom": dict(placement=["q", "k", "v", "up", "down"]),
    "opt": dict(placement=["q", "k", "v", "up", "down"]),
    "gpt2": dict(placement=["attn", "mlp"]),  # Conv1D, and attn.c_proj beside mlp.c_proj
    "gpt_neox": dict(placement=["attn"], rslora=True),
}


@pytest.mark.parametrize("family", list(PEFT_CASES))
def test_peft_loads_the_export_and_computes_the_same_logits(family: str, tmp_path: Path) -> None:
    from peft import PeftModel

    model, spec = trained(family, dict(type="lora", rank=4, alpha=8, dropout=0.0, **PEFT_CASES[family]))
    expected = model(IDS).logits
    export_peft(model, spec, tmp_path, base_model="tiny")
    peft_model = PeftModel.from_pretrained(tiny_model(family, seed=1), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    assert config["fan_in_fan_out"] is (family == "gpt2")
    assert config["use_rslora"] is spec.rslora and config["bias"] == "none"
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert len(keys) == 2 * sum(1 for m in model.modules() if type(m).__name__ == "LoraLinear")


@pytest.mark.parametrize("name", ["series", "prefix"])
def test_only_lora_exports_to_peft(name: str, tmp_path: Path) -> None:
    model, spec = trained("llama", METHODS[name])
    with pytest.raises(ConfigError, match="only LoRA"):
        export_peft(model, spec, tmp_path)
    assert not any(tmp_path.iterdir())


def test_an_adapter_for_another_family_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_adapter(tiny_model("bloom"), folder)
    assert err.value.file == str(folder / "adapter_config.json") and err.value.field == "family"
    assert "llama" in str(err.value) and "bloom" in str(err.value)


def test_what_the_model_cannot_take_names_the_config_file(tmp_path: Path) -> None:
    model, spec = trained("llama", dict(type="lora", placement=["gate"], rank=4))
    folder = save_adapter(model, spec, tmp_path / "saved")
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["family"] = None  # an adapter of unknown origin: the injection itself must refuse
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as err:
        load_adapter(tiny_model("bloom"), folder)
    assert err.value.file == str(folder / "adapter_config.json") and err.value.field == "adapter.placement"
    assert "has no 'gate'" in str(err.value)
