"""MoSA, Mixture of Sparse Adapters ("Split & Merge", Zhang et al. 2023, arXiv:2312.02923).

A series or parallel bottleneck whose projection weights are split into N disjoint random sparse
parts: every weight element belongs to exactly one part, M_1 + ... + M_N = 1. In training each
forward activates one part i and computes with W ⊙ M_i, so its gradient reaches only that part's
elements. In evaluation all parts are active, W ⊙ (M_1 + ... + M_N) = W, and `merge_mosa`
replaces every MoSA layer by the dense bottleneck it equals: no extra inference cost.
A trial ends with that merge (`finalize`) and saves the dense series or parallel adapter, its
MoSA config kept beside it as `trained_as`.

What we follow: split into non-overlapping parts, train them stochastically one at a time, merge
after tuning. What we chose or changed:
- the split is element-wise and uniform: each element's part is drawn from `mask_seed`, with one
  generator for the whole model, so layers get different masks; masks are buffers, saved with
  the adapter. Biases (when on) and a learned scale are dense, shared by all parts;
- a part is drawn per forward (per micro-batch) and per layer, from torch's global RNG: runs are
  reproducible under a seed, and gradient checkpointing, which restores the RNG before it
  recomputes a block, recomputes with the same parts;
- the optional consistency term (`consistency_loss`) is the symmetric KL divergence between the
  token distributions of two training forwards, each with its own draw of parts; the parts are
  drawn, not fixed, so that the term stays correct under gradient checkpointing (a recompute
  happens after the call has returned), which means a layer uses the same part in both forwards
  with probability 1/N;
- 15 of the 18 scripts the authors released (github.com/Theia-4869/MoSA at 286cc0f, `scripts/mosa/`)
  set `SHARE down`: the down projection stays dense and shared, only the up projection is split
  (2 split only the down one, 1 both); ours splits both;
- the paper's hierarchical sparse strategy is not implemented: its definition and schedule are in
  the paper's method section, which no source reachable here holds (only its abstract), and the
  authors' code has no trace of it (`SOLVER.MERGE_EPOCH` is declared in its config and never read).
Masking gradients does not freeze the inactive elements under Adam: their moments (and weight
decay) still move them, as in any masked training with a stateful optimizer.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from workers.adapters.base import AdapterMethod, replace_module
from workers.adapters.bottleneck import Bottleneck, inject_parallel, inject_series
from workers.adapters.config import AdapterConfig, MosaConfig
from workers.placement import FamilyLayout


class SparseBottleneck(Bottleneck):
    """f(x) = s · ((W_up ⊙ M_up,i) · act((W_down ⊙ M_down,i) · dropout(x) + b_down) + b_up), part i active.

    `down_part` / `up_part` hold each weight element's part; in evaluation every part is active.
    """

    def __init__(
        self, down: nn.Linear, up: nn.Linear, act: nn.Module, dropout: nn.Module, scale: float | nn.Parameter,
        float32: bool = True, *, parts: int, generator: torch.Generator,
    ) -> None:
        super().__init__(down, up, act, dropout, scale, float32)
        self.parts = parts
        self.active: int | None = None
        for name, lin in (("down_part", down), ("up_part", up)):
            part = torch.randint(parts, lin.weight.shape, generator=generator, dtype=torch.uint8)
            self.register_buffer(name, part.to(lin.weight.device))

    def part_masks(self, which: str) -> torch.Tensor:
        """The N masks M_1..M_N of projection `which` (down or up), stacked: (N, out, in)."""
        part = getattr(self, f"{which}_part")
        ids = torch.arange(self.parts, device=part.device, dtype=part.dtype).view(-1, 1, 1)
        return (part.unsqueeze(0) == ids).to(getattr(self, which).weight.dtype)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            return self.down.weight, self.up.weight  # W ⊙ Σ_i M_i = W
        i = self.active if self.active is not None else int(torch.randint(self.parts, ()))
        return self.down.weight * (self.down_part == i), self.up.weight * (self.up_part == i)

    def merged(self) -> Bottleneck:
        """The dense bottleneck Σ_i W ⊙ M_i = W of all parts, sharing this layer's parameters."""
        return Bottleneck(self.down, self.up, self.act, self.dropout, self.scale, self.float32)


def _sparse_layers(model: nn.Module) -> list[tuple[str, SparseBottleneck]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseBottleneck)]


def set_active_part(model: nn.Module, part: int | None) -> None:
    """Fix the part every MoSA layer uses in training (None: draw one per forward)."""
    for _, layer in _sparse_layers(model):
        if part is not None and not 0 <= part < layer.parts:
            raise ValueError(f"part {part} out of range: this MoSA adapter has {layer.parts} parts")
        layer.active = part


def merge_mosa(model: nn.Module) -> int:
    """Replace every MoSA layer by its dense bottleneck; returns how many were merged."""
    layers = _sparse_layers(model)
    for name, layer in layers:
        replace_module(model, name, layer.merged())
    return len(layers)


def symmetric_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """½ (KL(p‖q) + KL(q‖p)) = ½ Σ_v (p_v − q_v)(log p_v − log q_v), per position, in fp32."""
    log_p, log_q = F.log_softmax(logits_p.float(), dim=-1), F.log_softmax(logits_q.float(), dim=-1)
    return 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)


def consistency_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean symmetric KL between the next-token distributions of two training forwards of `batch`.

    Each forward draws its own parts. Averaged over the positions the LM loss scores (labels other
    than -100, shifted), or over all positions when the batch has no labels. Unweighted: `extra_loss`
    multiplies it by `consistency_weight`.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    first, second = model(**inputs, use_cache=False).logits, model(**inputs, use_cache=False).logits
    labels = batch.get("labels")
    if labels is None:
        return symmetric_kl(first, second).mean()
    scored = labels[:, 1:] != -100
    return symmetric_kl(first[:, :-1], second[:, :-1])[scored].mean()


class _Mosa(AdapterMethod):
    name = "mosa"
    config = MosaConfig

    def inject(self, model: nn.Module, layout: FamilyLayout, config: MosaConfig) -> list[nn.Module]:
        generator = torch.Generator().manual_seed(config.mask_seed)
        make = partial(SparseBottleneck.build, config, parts=config.parts, generator=generator)
        if config.base == "series":
            return inject_series(model, layout, config, make)
        return inject_parallel(model, layout, config, make)

    def extra_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], config: MosaConfig
    ) -> torch.Tensor | None:
        """The weighted consistency term λ · ½ (KL(p‖q) + KL(q‖p)) (`consistency_loss`); None when λ = 0."""
        if config.consistency_weight == 0:
            return None
        return config.consistency_weight * consistency_loss(model, batch)

    def finalize(self, model: nn.Module, config: MosaConfig) -> AdapterConfig:
        """Merge the parts: what remains is the dense series or parallel adapter `config.dense()` names."""
        merge_mosa(model)
        return config.dense()


METHOD = _Mosa()
