"""What every adapter method shares: its config base, the layer marker and the method protocol with its defaults."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

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
    # Whether a model holding this layer decodes right with a static (preallocated, fixed-mask) KV cache.
    static_cache: ClassVar[bool] = True
    # Whether every decoder layer of a model holding this layer runs one traced graph, so that compiling each
    # layer costs the compile of one (regional compilation, workers/compile.py).
    shared_layer_graph: ClassVar[bool] = True


def takes_static_cache(model: nn.Module) -> bool:
    """Whether every adapter layer of `model` decodes right with a static KV cache (see `AdapterLayer`)."""
    return all(m.static_cache for m in model.modules() if isinstance(m, AdapterLayer))


def shares_layer_graphs(model: nn.Module) -> bool:
    """Whether `model`'s decoder layers share one traced graph with its adapter in them (see `AdapterLayer`)."""
    return all(m.shared_layer_graph for m in model.modules() if isinstance(m, AdapterLayer))


class AdapterMethod(ABC):
    """A method, as the registry holds it: its name, its config class and the hooks the trial calls.

    A method subclasses this and implements `inject`; every other hook has a default that suits a
    method with nothing more to say (as PEFT's `BaseTuner`). In the order a trial calls them:

    - `inject(model, layout, config)`: insert the method's layers (required);
    - `enable_gradient_checkpointing(model)`: when `train.gradient_checkpointing` is on;
    - `extra_loss(model, batch, config)`: each training micro-batch; the trainer minimises
      L = L_LM + extra_loss (default: no extra term);
    - `finalize(model, config)`: after training, before saving: put the adapter into the form it is
      deployed in and return that form's config (default: unchanged, the same config);
    - `state_dict(model)`: the tensors saved for (and loaded into) an adapter of this method
      (default: `adapter_state_dict`, every adapter parameter and persistent adapter buffer).
    """

    name: ClassVar[str]
    config: ClassVar[type[AdapterConfig]]

    @abstractmethod
    def inject(self, model: PreTrainedModel, layout: FamilyLayout, config: AdapterConfig) -> list[nn.Module]:
        """Insert the method's layers into `model` in place; return the layers inserted."""

    def enable_gradient_checkpointing(self, model: PreTrainedModel) -> None:
        """Recompute each decoder block in the backward: transformers' own checkpointing, non-reentrant."""
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def extra_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], config: AdapterConfig
    ) -> torch.Tensor | None:
        """A training loss added to the LM loss of `batch`, weighted as it is to be added; None: none."""
        return None

    def finalize(self, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        """Put the trained adapter of `model` into its deployed form; returns the config of that form."""
        return config

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapter's tensors by full name: what is saved, and what a load fills."""
        return adapter_state_dict(model)


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of an adapter made beside `weight`: the weight's own, or float32 beside a quantized one (the
    int8 weights of an 8-bit base, in which no trainable tensor can be made), as PEFT makes them."""
    return weight.dtype if weight.is_floating_point() else torch.float32


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
