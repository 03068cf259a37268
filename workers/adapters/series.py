"""Series adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a bottleneck after a sublayer.

    h' = h + f(h)        h: the sublayer's output, inside its residual branch

`attn` places it on the attention output (o's output), `mlp` on the MLP output (down's output);
presets: `houlsby` = [attn, mlp], `pfeiffer` = [mlp]. On a linear role it takes the paper code's
per-linear form: on q, k, v, gate, up it acts on the linear's input, y = W (z + f(z)); on o and
down on its output, y = h + f(h). `residual: false` drops the adapter's own skip.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from workers.adapters.base import AdapterMethod
from workers.adapters.bottleneck import Bottleneck, inject_series
from workers.adapters.config import SeriesConfig
from workers.placement import FamilyLayout


class _Series(AdapterMethod):
    name = "series"
    config = SeriesConfig

    def inject(self, model: nn.Module, layout: FamilyLayout, config: SeriesConfig) -> list[nn.Module]:
        return inject_series(model, layout, config, partial(Bottleneck.build, config), residual=config.residual)


METHOD = _Series()
