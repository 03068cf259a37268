"""Adapters on disk: `adapter_config.json` + `adapter.safetensors`, and LoRA in PEFT's format.

Only adapter tensors are written, never the base model; loading injects the adapter described by
the config into a fresh base model and copies the tensors in, strictly (every key, no extra).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import workers
from workers.adapters.base import AdapterConfig, adapter_state_dict
from workers.adapters.lora import LoraConfig, LoraLinear
from workers.adapters.registry import AdapterSpec, inject
from workers.errors import ConfigError
from workers.placement import family_for

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, config: AdapterConfig, out_dir: Path, *, base_model: str | None = None) -> Path:
    """Write the adapter of `model` (described by `config`) to `out_dir`; returns the folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "adaptune_version": workers.__version__,
        "base_model": base_model,
        "family": family_for(model.config).name,
        "adapter": config.model_dump(mode="json"),
    }
    save_file(_tensors(adapter_state_dict(model)), str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def read_adapter_config(in_dir: Path) -> AdapterConfig:
    path = in_dir / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
        return TypeAdapter(AdapterSpec).validate_python(meta["adapter"])
    except FileNotFoundError:
        raise ConfigError(str(path), None, "no adapter config here (expected an adaptune adapter folder)") from None
    except (json.JSONDecodeError, KeyError, ValidationError) as exc:
        raise ConfigError(str(path), "adapter", f"not a valid adapter config: {str(exc).splitlines()[0]}") from None


def load_adapter(model: nn.Module, in_dir: Path) -> AdapterConfig:
    """Inject the adapter saved in `in_dir` into `model` and load its tensors; returns its config."""
    config = read_adapter_config(in_dir)
    inject(model, config)
    weights = in_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(str(weights), None, "adapter weights missing")
    saved = load_file(str(weights))
    target = adapter_state_dict(model)
    missing, extra = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
    if missing or extra:
        raise ConfigError(
            str(weights), None,
            f"does not match the adapter config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}",
        )
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(saved[name].to(tensor.device, tensor.dtype))
    return config


def export_peft(model: nn.Module, config: AdapterConfig, out_dir: Path, *, base_model: str | None = None) -> Path:
    """Write a LoRA adapter in PEFT's format, loadable with `peft.PeftModel.from_pretrained`."""
    if not isinstance(config, LoraConfig):
        raise ConfigError(None, "adapter.type", f"only LoRA exports to PEFT's format, not {config.type}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    tensors = {}
    for name, layer in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.weight
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "bias": "none",
        # The exact module paths: role names alone can be ambiguous (GPT-2's attn.c_proj vs mlp.c_proj).
        "target_modules": "(" + "|".join(re.escape(n) for n in layers) + ")",
        "fan_in_fan_out": any(isinstance(m.base_layer, Conv1D) for m in layers.values()),
        "inference_mode": True,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(tensors), str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
    return out_dir
