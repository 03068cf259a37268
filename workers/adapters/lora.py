"""LoRA (Hu et al. 2021): a low-rank update beside a frozen linear.

    y = W x + (alpha / r) · B A dropout(x)        A: r x in, kaiming-uniform;  B: out x r, zero

so a fresh adapter changes nothing. rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) instead.
`merge_lora` folds W' = W + s · B A into the base weights for inference; `unmerge_lora` undoes it.
`attn` and `mlp` in a placement stand for every linear of that sublayer.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from workers.adapters.base import AdapterLayer, AdapterMethod, adapter_dtype, linear_dims, replace_module
from workers.adapters.config import LoraConfig
from workers.errors import ConfigError
from workers.placement import FamilyLayout, expand_sublayers, linear_targets


class LoraLinear(AdapterLayer):
    """y = W x + s · B A dropout(x), or W' x once merged (W' = W + s · B A)."""

    def __init__(self, base_layer: nn.Module, rank: int, scaling: float, dropout: float) -> None:
        super().__init__()
        d_in, d_out = linear_dims(base_layer)
        kw = {"device": base_layer.weight.device, "dtype": adapter_dtype(base_layer.weight)}
        self.base_layer = base_layer
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(d_in, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, d_out, bias=False, **kw)
        self.scaling = scaling
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """s · B A, laid out like the base weight (transposed for GPT-2's Conv1D)."""
        delta = self.scaling * (self.lora_B.weight @ self.lora_A.weight)
        return delta.T if isinstance(self.base_layer, Conv1D) else delta

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight()
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        # In the adapter's dtype and back: float32 beside an 8-bit base; otherwise x's own, and no cast happens.
        delta = self.lora_B(self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype)))
        return y + (self.scaling * delta).to(y.dtype)


class _Lora(AdapterMethod):
    name = "lora"
    config = LoraConfig

    def inject(self, model: nn.Module, layout: FamilyLayout, config: LoraConfig) -> list[nn.Module]:
        roles = expand_sublayers(config.placement)
        if any(s in ("attn", "mlp") for s in config.placement):
            roles = [r for r in roles if layout.has(r)]
        targets = linear_targets(model, layout, roles)
        for target in targets:  # every layer is checked before the model changes
            d_in, d_out = linear_dims(model.get_submodule(target.path))
            if config.rank > min(d_in, d_out):
                raise ConfigError(
                    None, "adapter.rank",
                    f"rank {config.rank} exceeds the layer {target.path} ({d_in} -> {d_out})",
                )
        inserted: list[nn.Module] = []
        for target in targets:
            base = model.get_submodule(target.path)
            wrapper = LoraLinear(base, config.rank, config.scaling, config.dropout)
            replace_module(model, target.path, wrapper)
            inserted.append(wrapper)
        return inserted


METHOD = _Lora()


def _lora_layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight."""
    for layer in _lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged LoRA update out of its base weight again."""
    for layer in _lora_layers(model):
        layer.unmerge()
