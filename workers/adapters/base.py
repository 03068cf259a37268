"""What every adapter method shares: its config base, the layer marker and the method protocol."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from workers.adapters.config import AdapterConfig
from workers.placement import FamilyLayout


class AdapterLayer(nn.Module):
    """Marker for modules that own adapter parameters.

    Every parameter inside an `AdapterLayer` is an adapter parameter, except those under its
    `base_layer` attribute: wrappers keep the frozen linear they wrap there.
    """

    base_layer_attr: ClassVar[str] = "base_layer"


class AdapterMethod(Protocol):
    """What the registry holds for each method."""

    name: str
    config: type[AdapterConfig]

    def inject(self, model: PreTrainedModel, layout: FamilyLayout, config: AdapterConfig) -> list[nn.Module]:
        """Insert the method's layers into `model` in place; return the layers inserted."""
        ...

    # Optional: `finalize(model, config) -> AdapterConfig` puts a trained adapter into the form it is
    # deployed in and returns that form's config (MoSA merges its parts). Without it, nothing changes.
    # Optional: `enable_gradient_checkpointing(model)` checkpoints the decoder blocks the method's own
    # way (prefix tuning keeps the cache). Without it, transformers' `activation_checkpointing_enable`.


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear` or a GPT-2 style `Conv1D`."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    raise TypeError(f"expected a linear layer, got {type(module).__name__}")


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` where `path` is in `model`."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(full name, parameter) of every adapter parameter in `model`, each once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, AdapterLayer):
            continue
        skip = f"{module.base_layer_attr}."
        for rel, param in module.named_parameters():
            if rel.startswith(skip) or id(param) in seen:
                continue
            seen.add(id(param))
            yield (f"{module_name}.{rel}" if module_name else rel), param


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter parameter and persistent adapter buffer (MoSA masks), keyed by full name."""
    state: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, AdapterLayer):
            continue
        skip = f"{module.base_layer_attr}."
        for rel, tensor in module.state_dict(keep_vars=True).items():
            if not rel.startswith(skip):
                state[f"{module_name}.{rel}" if module_name else rel] = tensor
    return state
