"""Adapters on disk: `adapter_config.json` + `adapter.safetensors`, and LoRA in PEFT's format.

Only adapter tensors are written, those the method's `state_dict` hook names (by default every
adapter parameter and persistent adapter buffer, keyed by its path in the model), never the base
model. Loading injects the adapter the config describes into a fresh base model, through the
registry, and copies the tensors in strictly: every key, no extra one, every shape as injected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import workers
from workers.adapters.config import AdapterConfig, AdapterSpec, LoraConfig
from workers.adapters.lora import LoraLinear
from workers.adapters.registry import inject, state_dict
from workers.errors import ConfigError
from workers.placement import family_for

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _listed(keys: list[str], most: int = 3) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def save_adapter(
    model: nn.Module, config: AdapterConfig, out_dir: str | Path, *, base_model: str | None = None,
    trained_as: AdapterConfig | None = None,
) -> Path:
    """Write the adapter of `model` (described by `config`) to `out_dir`; returns the folder.

    `trained_as` records the config an adapter was trained with when `config` is its merged form
    (a MoSA adapter saved as the dense series or parallel adapter it merged into).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(state_dict(model, config)), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    _write_json(out / CONFIG_FILE, {
        "adaptune_version": workers.__version__,
        "base_model": base_model,
        "family": family_for(model.config).name,
        "adapter": config.model_dump(mode="json"),
        **({"trained_as": trained_as.model_dump(mode="json")} if trained_as is not None else {}),
    })
    return out


def _read_meta(in_dir: Path) -> dict[str, Any]:
    path = in_dir / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(str(path), None, "no adapter config here (expected a folder saved by adaptune)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read the adapter config: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("adapter"), dict):
        raise ConfigError(str(path), "adapter", "expected an `adapter` mapping (the adapter's config)")
    return meta


def read_adapter_config(in_dir: str | Path) -> AdapterConfig:
    """The validated adapter config saved in `in_dir`."""
    path = Path(in_dir) / CONFIG_FILE
    try:
        return TypeAdapter(AdapterSpec).validate_python(_read_meta(Path(in_dir))["adapter"])
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(["adapter", *(str(p) for p in err["loc"])])
        raise ConfigError(str(path), field, err["msg"].removeprefix("Value error, ")) from None


def load_adapter(model: nn.Module, in_dir: str | Path) -> AdapterConfig:
    """Inject the adapter saved in `in_dir` into `model` and load its tensors; returns its config."""
    folder = Path(in_dir)
    config = read_adapter_config(folder)
    saved_family, family = _read_meta(folder).get("family"), family_for(model.config).name
    if saved_family is not None and saved_family != family:
        raise ConfigError(
            str(folder / CONFIG_FILE), "family", f"adapter saved for a {saved_family} model, not {family}"
        )
    weights = folder / WEIGHTS_FILE
    try:
        saved = load_file(str(weights))
    except (FileNotFoundError, SafetensorError) as exc:
        raise ConfigError(str(weights), None, f"cannot read the adapter weights: {exc}") from None
    try:
        inject(model, config)
    except ConfigError as exc:
        raise exc.located(str(folder / CONFIG_FILE)) from None
    target = state_dict(model, config)
    missing, extra = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
    if missing or extra:
        raise ConfigError(
            str(weights), None,
            f"does not match the adapter config: missing {_listed(missing) or 'none'}; "
            f"unexpected {_listed(extra) or 'none'}",
        )
    wrong = [k for k in target if target[k].shape != saved[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(
            str(weights), None, f"{k} has shape {tuple(saved[k].shape)}, the adapter expects {tuple(target[k].shape)}"
        )
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(saved[name])
    return config


def export_peft(
    model: nn.Module, config: AdapterConfig, out_dir: str | Path, *, base_model: str | None = None
) -> Path:
    """Write a LoRA adapter in PEFT's format, loadable with `peft.PeftModel.from_pretrained(base, out_dir)`.

    The PEFT model computes what ours computes: same r, alpha, rsLoRA and targets, `lora_A.weight`
    (r x in) and `lora_B.weight` (out x r) under `base_model.model.<module path>`.
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(None, "adapter.type", f"only LoRA exports to PEFT's format, not {config.type}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.weight
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(tensors), str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    _write_json(out / CONFIG_FILE, {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "bias": "none",
        # Full module paths: role names alone can be ambiguous (GPT-2's attn.c_proj and mlp.c_proj).
        "target_modules": [name for name, _ in layers],
        "fan_in_fan_out": any(isinstance(layer.base_layer, Conv1D) for _, layer in layers),
        "inference_mode": True,
    })
    return out
