"""MoSA, Mixture of Sparse Adapters ("Split & Merge", Zhang et al. 2023, arXiv:2312.02923).

A series or parallel bottleneck whose projection weights are split into N disjoint random sparse
parts: every weight element belongs to exactly one part, M_1 + ... + M_N = 1. In training each
forward activates one part i and computes with W ⊙ M_i, so a step's gradient reaches only that
part's elements. In evaluation all parts are active, W ⊙ (M_1 + ... + M_N) = W, and `merge_mosa`
replaces every MoSA layer by the dense bottleneck it equals: no extra inference cost.

Choices, against the paper:
- parts are drawn per forward (per micro-batch), independently per layer, from torch's global RNG,
  so runs are reproducible under a seed and resume; the paper draws one part per iteration;
- the optional consistency loss is the symmetric KL divergence between the next-token
  distributions of two training forwards with different parts, on the positions that have labels,
  weighted by `consistency_weight` (the paper regularises two sparse forwards towards each other);
- biases (when on) and a learned scale are shared by all parts: only projection weights are split;
- masks come from `mask_seed` and are saved with the adapter.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from workers.adapters.base import replace_module
from workers.adapters.bottleneck import Bottleneck, BottleneckOptions, inject_parallel, inject_series
from workers.placement import FamilyLayout


class MosaConfig(BottleneckOptions):
    type: Literal["mosa"] = "mosa"
    base: Literal["series", "parallel"] = "series"
    parts: int = Field(4, ge=2, description="N, the number of sparse parts")
    consistency_weight: float = Field(0.0, ge=0.0)
    mask_seed: int = 0

    def short_name(self) -> str:
        return super().short_name().replace("mosa-", f"mosa-{self.base}-n{self.parts}-", 1)


class SparseBottleneck(Bottleneck):
    """f(x) = s · (W_up ⊙ M_up,i) · act((W_down ⊙ M_down,i) · dropout(x)), part i active."""

    def __init__(
        self, down: nn.Linear, up: nn.Linear, act: nn.Module, dropout: nn.Module, scale: torch.Tensor,
        parts: int, mask_seed: int,
    ) -> None:
        super().__init__(down, up, act, dropout, scale)
        self.parts = parts
        self.active: int | None = None
        gen = torch.Generator().manual_seed(mask_seed)
        for name, lin in (("down_part", down), ("up_part", up)):
            # Each weight element is assigned to exactly one of the N parts.
            part = torch.randint(parts, lin.weight.shape, generator=gen, dtype=torch.int8)
            self.register_buffer(name, part.to(lin.weight.device))

    @classmethod
    def _from(
        cls, down: nn.Linear, up: nn.Linear, act: nn.Module, dropout: nn.Module, scale: torch.Tensor,
        opts: MosaConfig,
    ) -> SparseBottleneck:
        return cls(down, up, act, dropout, scale, opts.parts, opts.mask_seed)

    def part_masks(self, which: str) -> torch.Tensor:
        """The N masks of a projection, stacked: (N, out, in), disjoint, summing to ones."""
        part = getattr(self, f"{which}_part")
        ids = torch.arange(self.parts, device=part.device).view(-1, 1, 1)
        return (part.unsqueeze(0) == ids).to(self.down.weight.dtype)

    def summed(self, which: str) -> torch.Tensor:
        """Σ_i W ⊙ M_i of one projection: the mixture of all parts, part by part."""
        weight = getattr(self, which).weight
        return (weight.unsqueeze(0) * self.part_masks(which)).sum(0)

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            return self.summed("down"), self.summed("up")
        i = self.active if self.active is not None else int(torch.randint(self.parts, ()))
        return self.down.weight * (self.down_part == i), self.up.weight * (self.up_part == i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_down, w_up = self._weights()
        h = self.act(F.linear(self.dropout(x), w_down, self.down.bias))
        return self.scale * F.linear(h, w_up, self.up.bias)

    def merged(self) -> Bottleneck:
        """The dense bottleneck with the summed weights of all parts."""
        with torch.no_grad():
            for which in ("down", "up"):
                getattr(self, which).weight.copy_(self.summed(which))
        return Bottleneck(self.down, self.up, self.act, self.dropout, self.scale)


def _sparse_layers(model: nn.Module) -> list[tuple[str, SparseBottleneck]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseBottleneck)]


def set_active_part(model: nn.Module, part: int | None) -> None:
    """Fix the part every MoSA layer uses in training (None: draw one per forward)."""
    for _, layer in _sparse_layers(model):
        layer.active = part


def merge_mosa(model: nn.Module) -> int:
    """Replace every MoSA layer by its dense bottleneck; returns how many were merged."""
    layers = _sparse_layers(model)
    for name, layer in layers:
        replace_module(model, name, layer.merged())
    return len(layers)


def consistency_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Symmetric KL between the token distributions of two forwards with independently drawn parts."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    p = F.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
    q = F.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
    keep = labels[:, 1:] != -100
    kl = F.kl_div(p, q, log_target=True, reduction="none") + F.kl_div(q, p, log_target=True, reduction="none")
    return 0.5 * kl.sum(-1)[keep].mean()


class _Mosa:
    name = "mosa"
    config = MosaConfig

    def inject(self, model: nn.Module, layout: FamilyLayout, config: MosaConfig) -> list[nn.Module]:
        if config.base == "series":
            return inject_series(model, layout, config, SparseBottleneck)
        return inject_parallel(model, layout, config, SparseBottleneck)


METHOD = _Mosa()
