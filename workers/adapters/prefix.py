"""Prefix tuning (Li & Liang 2021): n trained virtual tokens of keys and values in every layer.

    attention(q, [P_k; K], [P_v; V])        P_k, P_v: n x kv_dim per layer

The prefix enters through the transformers cache: a forward pre-hook on the family's backbone puts
P_k, P_v into the `DynamicCache` as if n tokens had been seen before the input, and extends the
attention mask by n ones on the left (n attending columns in a 4-D mask, such as the block masks
of packed rows). So training, cached generation and uncached generation all run the model's own
attention code, on every family.

Under gradient checkpointing transformers drops the cache of every checkpointed block (GPT-2 already
in its backbone loop), which would drop the prefix while the mask still counts it. A pre-hook on
each attention module hands it a prefix-only cache whenever its cache arrives as None; it reads the
encoder inside the block, so the backward's recomputation gets the same tensors and the encoder its
gradient (with `reparametrize`, the MLP then runs once per layer: cheap for n rows).

Position ids of the real tokens do not count the prefix: they come from the un-extended attention
mask (cumsum - 1), exactly as `generate` computes them, so the three paths agree. On families
without position ids the prefix shifts what the model derives from the mask: BLOOM's ALiBi distances
and OPT's learned positions (computed from the mask when none are given; we always give them)
see the prefix as n earlier tokens, consistently in training and generation.

`reparametrize: true` produces the prefix with an MLP (embedding n x d -> Linear d->h -> tanh ->
Linear h -> L·2·kv_dim), as Li & Liang and PEFT's prefix projection do; the MLP is trained and saved.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

from workers.adapters.base import AdapterLayer
from workers.adapters.config import PrefixConfig
from workers.placement import FamilyLayout


def kv_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) from the generic config attributes every family maps."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class PrefixEncoder(AdapterLayer):
    """The prefix keys and values of every layer: a table, or the output of the reparametrisation MLP."""

    def __init__(self, config: PretrainedConfig, spec: PrefixConfig, like: torch.Tensor) -> None:
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = kv_shape(config)
        self.n = spec.virtual_tokens
        kw = {"device": like.device, "dtype": like.dtype}
        width = self.layers * 2 * self.kv_heads * self.head_dim
        if spec.reparametrize:
            self.embedding = nn.Parameter(torch.empty(self.n, config.hidden_size, **kw))
            self.mlp = nn.Sequential(
                nn.Linear(config.hidden_size, spec.prefix_hidden, **kw),
                nn.Tanh(),
                nn.Linear(spec.prefix_hidden, width, **kw),
            )
            nn.init.normal_(self.embedding)
        else:
            # N(0, 1) as PEFT's prefix embedding table.
            self.prefix = nn.Parameter(torch.empty(self.n, width, **kw))
            nn.init.normal_(self.prefix)
            self.mlp = None

    def key_values(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (batch, kv_heads, n, head_dim)."""
        table = self.mlp(self.embedding) if self.mlp is not None else self.prefix
        kv = table.view(self.n, self.layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)
        return [
            (kv[i, 0].unsqueeze(0).expand(batch, -1, -1, -1), kv[i, 1].unsqueeze(0).expand(batch, -1, -1, -1))
            for i in range(self.layers)
        ]


class _PrefixOnlyLayer(DynamicLayer):
    """A cache layer holding the prefix only: `update` returns prefix + new states and stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class PrefixOnlyCache(Cache):
    """The prefix as a cache that stores nothing: what a checkpointed attention gets instead of None."""

    def __init__(self, key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(layers=[_PrefixOnlyLayer(k, v) for k, v in key_values])


class AttentionPrefixHook:
    """Pre-hook of one attention module: the prefix back when its cache was dropped (checkpointing)."""

    def __init__(self, encoder: PrefixEncoder, attention: nn.Module) -> None:
        self.encoder = encoder
        params = inspect.signature(attention.forward).parameters
        self.name = next(name for name in ("past_key_values", "layer_past") if name in params)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        # Every family passes the cache to its attention by keyword.
        if kwargs.get(self.name) is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs[self.name] = PrefixOnlyCache(self.encoder.key_values(hidden.shape[0]))
        return args, kwargs


class PrefixHook:
    """Forward pre-hook of the backbone that injects the prefix into the cache and the mask."""

    def __init__(self, encoder: PrefixEncoder, config: PretrainedConfig, accepts: set[str]) -> None:
        self.encoder, self.config, self.accepts = encoder, config, accepts

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, new = (ids.shape if ids is not None else embeds.shape[:2])
        n = self.encoder.n
        device = (ids if ids is not None else embeds).device
        cache = kwargs.get("past_key_values")
        # Without use_cache a caller may still hand back the cache of its previous call: start afresh.
        if cache is None or kwargs.get("use_cache") is False:
            cache = DynamicCache(config=self.config)
        if cache.get_seq_length() == 0:
            for layer, (k, v) in enumerate(self.encoder.key_values(batch)):
                cache.update(k, v, layer)
        kwargs["past_key_values"] = cache
        past = cache.get_seq_length()  # prefix included
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            if "position_ids" in self.accepts and kwargs.get("position_ids") is None:
                kwargs["position_ids"] = ((mask.long().cumsum(-1) - 1).clamp(min=0))[:, -new:]
            missing = past + new - mask.shape[1]
            if missing > 0:
                kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, missing), mask], dim=-1)
        else:
            if mask is not None and mask.shape[-1] == past - n + new:
                attend = mask.new_zeros if mask.is_floating_point() else mask.new_ones  # additive or boolean
                kwargs["attention_mask"] = torch.cat([attend((*mask.shape[:-1], n)), mask], dim=-1)
            if "position_ids" in self.accepts and kwargs.get("position_ids") is None:
                start = past - n
                kwargs["position_ids"] = torch.arange(start, start + new, device=device)[None]
        if "cache_position" in self.accepts:
            kwargs["cache_position"] = torch.arange(past, past + new, device=device)
        return args, kwargs


class _Prefix:
    name = "prefix"
    config = PrefixConfig

    def inject(self, model: nn.Module, layout: FamilyLayout, config: PrefixConfig) -> list[nn.Module]:
        like = model.get_input_embeddings().weight
        encoder = PrefixEncoder(model.config, config, like)
        model.add_module("prefix_encoder", encoder)
        backbone = model.get_submodule(layout.backbone)
        accepts = set(inspect.signature(backbone.forward).parameters)
        backbone.register_forward_pre_hook(PrefixHook(encoder, model.config, accepts), with_kwargs=True)
        # A block's attention module is the parent of its query (or fused qkv) projection.
        attention = (layout.fused_qkv or layout.linears["q"]).rpartition(".")[0]
        for block in model.get_submodule(layout.layers):
            module = block.get_submodule(attention)
            module.register_forward_pre_hook(AttentionPrefixHook(encoder, module), with_kwargs=True)
        return [encoder]


METHOD = _Prefix()
