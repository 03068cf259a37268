"""The registry of adapter methods: adding a method is its config in `config.py`, its module, and one line here."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from workers.adapters import lora, mosa, parallel, prefix, series
from workers.adapters.base import AdapterConfig, AdapterMethod, adapter_parameters
from workers.placement import family_for

METHODS: dict[str, AdapterMethod] = {
    m.METHOD.name: m.METHOD for m in (series, parallel, prefix, lora, mosa)
}

@dataclass(frozen=True)
class ParamCounts:
    """Trainable (adapter) and base parameters; the share as the paper reports it."""

    trainable: int
    base: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / (self.base + self.trainable)


def count_parameters(model: nn.Module) -> ParamCounts:
    adapter = sum(p.numel() for _, p in adapter_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    return ParamCounts(trainable=adapter, base=total - adapter)


def finalize(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """After training: the adapter of `model` in its deployed form; returns the config that describes it."""
    method = METHODS[config.type]
    return method.finalize(model, config) if hasattr(method, "finalize") else config


def enable_gradient_checkpointing(model: PreTrainedModel, config: AdapterConfig) -> None:
    """Recompute each decoder block in the backward instead of keeping its activations (non-reentrant).

    transformers' own checkpointing, unless the method brings its way (prefix tuning: transformers'
    drops the cache that carries the prefix).
    """
    method = METHODS[config.type]
    if hasattr(method, "enable_gradient_checkpointing"):
        method.enable_gradient_checkpointing(model)
    else:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def inject(model: PreTrainedModel, config: AdapterConfig) -> list[nn.Module]:
    """Insert the adapter `config` describes into `model` and freeze everything else."""
    method = METHODS[config.type]
    layers = method.inject(model, family_for(model.config), config)
    for param in model.parameters():
        param.requires_grad_(False)
    for _, param in adapter_parameters(model):
        param.requires_grad_(True)
    return layers
