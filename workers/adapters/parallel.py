"""Parallel adapters (He et al. 2022): a bottleneck beside a sublayer.

    y = g(x) + f(x)      g: the sublayer, x: its input

`attn` / `mlp` read the input of the sublayer's entry linear (q or the fused qkv; up) and add to
the output of its exit linear (o; down). On a linear role, the paper code's per-linear form:
y = W z + b + f(z), with f: in_features -> bottleneck -> out_features.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from workers.adapters.base import AdapterMethod
from workers.adapters.bottleneck import Bottleneck, inject_parallel
from workers.adapters.config import ParallelConfig
from workers.placement import FamilyLayout


class _Parallel(AdapterMethod):
    name = "parallel"
    config = ParallelConfig

    def inject(self, model: nn.Module, layout: FamilyLayout, config: ParallelConfig) -> list[nn.Module]:
        return inject_parallel(model, layout, config, partial(Bottleneck.build, config))


METHOD = _Parallel()
