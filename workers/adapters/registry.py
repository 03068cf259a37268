"""The registry of adapter methods: adding a method is its config in `config.py`, its module, and one line here.

The rest of the code reaches a method only through the functions below, by its config's `type`:
`inject`, `enable_gradient_checkpointing`, `extra_loss`, `finalize` and `state_dict` call the hooks
of `AdapterMethod` (base.py), whose defaults cover a method that does not override them. A method
defined elsewhere (a plugin, a test) joins with `register`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from workers.adapters import lora, mosa, parallel, prefix, series
from workers.adapters.base import AdapterConfig, AdapterMethod, adapter_parameters
from workers.adapters.config import CONFIGS, register_config
from workers.placement import family_for

METHODS: dict[str, AdapterMethod] = {
    m.METHOD.name: m.METHOD for m in (series, parallel, prefix, lora, mosa)
}


def register(method: AdapterMethod) -> None:
    """Add `method` to the registry and its config to those a spec's `adapter:` accepts (by `method.name`)."""
    if method.config.model_fields["type"].default != method.name:
        raise ValueError(f"{method.config.__name__}.type defaults to "
                         f"{method.config.model_fields['type'].default!r}, not the method's name {method.name!r}")
    if METHODS.get(method.name, method) is not method:
        raise ValueError(f"adapter method {method.name!r} is already registered")
    register_config(method.config)
    METHODS[method.name] = method


def unregister(name: str) -> None:
    """Take the method `name` and its config out again (a test's toy method, when it is done)."""
    METHODS.pop(name)
    CONFIGS.pop(name)


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
    return METHODS[config.type].finalize(model, config)


def state_dict(model: nn.Module, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The tensors of the adapter `config` describes in `model`, by full name: what is saved and loaded."""
    return METHODS[config.type].state_dict(model)


def extra_loss(model: nn.Module, batch: dict[str, torch.Tensor], config: AdapterConfig) -> torch.Tensor | None:
    """The method's training loss beside the LM loss of `batch` (the trainer minimises their sum); None: none."""
    return METHODS[config.type].extra_loss(model, batch, config)


def enable_gradient_checkpointing(model: PreTrainedModel, config: AdapterConfig) -> None:
    """Recompute each decoder block in the backward instead of keeping its activations (non-reentrant).

    transformers' own checkpointing, unless the method brings its own way (one whose state enters the
    blocks through the cache, which transformers' drops in checkpointed blocks).
    """
    METHODS[config.type].enable_gradient_checkpointing(model)


def inject(model: PreTrainedModel, config: AdapterConfig) -> list[nn.Module]:
    """Insert the adapter `config` describes into `model` and freeze everything else."""
    method = METHODS[config.type]
    layers = method.inject(model, family_for(model.config), config)
    for param in model.parameters():
        param.requires_grad_(False)
    for _, param in adapter_parameters(model):
        param.requires_grad_(True)
    return layers
