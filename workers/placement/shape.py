"""What a method reads of a model to plan its adapter: sizes only, from the model's config, without torch.

The driver's pre-flight reads them from `config.json` (`orchestrator.model_shape.Shape` has them);
`AdapterConfig.planned_parameters` takes any object with these attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from workers.placement.families import FamilyLayout
from workers.placement.slots import QKV, SUBLAYER_BOUNDS


class ModelShape(Protocol):
    """The sizes of one model: hidden size, number of blocks, (d_in, d_out) of each linear role.

    `dims` has every role of the vocabulary and `qkv` (the fused linear, where a family has one).
    """

    @property
    def hidden(self) -> int: ...

    @property
    def layers(self) -> int: ...

    @property
    def dims(self) -> Mapping[str, tuple[int, int]]: ...


def sublayer_dims(layout: FamilyLayout, shape: ModelShape, sublayer: str) -> tuple[int, int]:
    """(d_in, d_out) of `sublayer` on this family: the input of its entry linear, the output of its exit."""
    entry, exit_ = ("qkv" if r in QKV and layout.fused_qkv else r for r in SUBLAYER_BOUNDS[sublayer])
    return shape.dims[entry][0], shape.dims[exit_][1]
