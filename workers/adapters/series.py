"""Series adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a bottleneck after a sublayer.

    h' = h + f(h)        h: the sublayer's output, inside its residual branch

`attn` places it on the attention output (o's output), `mlp` on the MLP output (down's output);
presets: `houlsby` = [attn, mlp], `pfeiffer` = [mlp]. On a linear role it takes the paper code's
per-linear form: on q, k, v, gate, up it acts on the linear's input, y = W (z + f(z)); on o and
down on its output, y = h + f(h). `residual: false` drops the adapter's own skip.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

from pydantic import model_validator
from torch import nn

from workers.adapters.bottleneck import Bottleneck, BottleneckOptions, inject_series
from workers.placement import FamilyLayout

PRESETS: dict[str, list[str]] = {"houlsby": ["attn", "mlp"], "pfeiffer": ["mlp"]}


class SeriesConfig(BottleneckOptions):
    type: Literal["series"] = "series"
    residual: bool = True

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """`preset: houlsby` stands for its placement, which is what the config keeps."""
        if isinstance(data, dict) and "preset" in data:
            data = dict(data)
            preset = data.pop("preset")
            if "placement" in data:
                raise ValueError("give either preset or placement, not both")
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; expected one of: {', '.join(PRESETS)}")
            data["placement"] = PRESETS[preset]
        return data

    def option_tags(self) -> list[str]:
        return [*super().option_tags(), *([] if self.residual else ["nores"])]


class _Series:
    name = "series"
    config = SeriesConfig

    def inject(self, model: nn.Module, layout: FamilyLayout, config: SeriesConfig) -> list[nn.Module]:
        return inject_series(model, layout, config, partial(Bottleneck.build, config), residual=config.residual)


METHOD = _Series()
