"""Prefix tuning (Li & Liang 2021): n trained virtual tokens of keys and values in every layer.

    attention(q, [P_k; K], [P_v; V])        P_k, P_v: n x kv_dim per layer

The prefix enters through the model's documented inputs only, as PEFT's prefix tuning gives it: a
forward pre-hook on the family's backbone passes a `Cache` holding P_k, P_v as if n tokens had been
seen before the input (under the keyword the backbone's forward takes: `past_key_values`, renamed
`cache` in transformers 5.24), extends the attention mask by n ones on the left (n attending columns
in a 4-D mask, such as the block masks of packed rows) and places the real tokens after the prefix.
So training, cached and uncached generation all run the model's own attention code, on every family.

Positions: the real tokens of a row take positions n..n+L-1, after the virtual tokens, as in the
reference (LLM-Adapters' PEFT fork) and PEFT; a prefixed model's logits equal those of PEFT's
`PrefixTuning` with the same table. Callers never see the prefix: a mask they give covers their own
tokens, and position ids they give (generate derives them from that mask) count their tokens from 0;
the hook adds n. Without position ids they come from the extended 2-D mask (cumsum - 1, as generate
computes them), so a left-padded row computes what it computes alone; without a mask, from the cache
length. BLOOM has no position ids: its ALiBi distances come from the extended mask, so it sees the
prefix as n earlier tokens too.

Which cache: a forward that may be continued gets a `DynamicCache` (the caller's, or a new one) that
holds the prefix; a training forward (unless it continues a cache it was given) and one with
`use_cache=False` get a `PrefixCache`, whose `update` returns prefix + new states and stores
nothing: no state outlives the forward, and recomputing a layer gives the same tensors.

Gradient checkpointing: transformers' own (`GradientCheckpointingLayer`) drops the cache of every
checkpointed layer in training, and the prefix with it (PEFT refuses prefix tuning with gradient
checkpointing for that reason); the hook refuses it with a clear error. `enable_gradient_checkpointing`
instead runs each decoder block's forward under `torch.utils.checkpoint.checkpoint` (non-reentrant)
with the `PrefixCache` passed in. The encoder runs once per forward, in the hook, outside the blocks;
its output reaches the blocks through the cache, and its gradient through their recomputation.

`reparametrize: true` produces the prefix with an MLP (embedding n x d -> Linear d->h -> tanh ->
Linear h -> L·2·kv_dim), as Li & Liang and PEFT's prefix projection do; the MLP is trained and saved.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

from workers.adapters.base import AdapterLayer, AdapterMethod
from workers.adapters.config import PrefixConfig
from workers.placement import FamilyLayout, family_for


def kv_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) from the generic config attributes every family maps."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class PrefixEncoder(AdapterLayer):
    """The prefix keys and values of every layer: a table, or the output of the reparametrisation MLP.

    The table is n x (L·2·kv_heads·head_dim), columns ordered (layer, key|value, head, dim): PEFT's
    layout, so PEFT's prefix embedding copies over as it is.
    """

    # Its n keys and values enter the cache ahead of the prompt; a static cache is sized, and its mask laid out,
    # for the prompt alone (padded rows attended pad slots and missed the prefix: measured, other tokens).
    static_cache = False
    # Each layer reads its own slot of the prefix's cache (`layers[layer_idx]`, a constant of the layer): dynamo
    # traces every layer apart, one compile per layer, and past its recompile limit (8) the rest run eager.
    shared_layer_graph = False

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


class _PrefixLayer(DynamicLayer):
    """A cache layer holding the prefix only: `update` returns prefix + new states and stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class PrefixCache(Cache):
    """The prefix as a cache that stores nothing: what a forward that is not continued gets.

    Every layer's `update` is a pure function of its inputs, so a layer recomputed under gradient
    checkpointing sees exactly what its first run saw, and a second forward starts from the prefix again.
    """

    def __init__(self, key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(layers=[_PrefixLayer(k, v) for k, v in key_values])


class PrefixHook:
    """Forward pre-hook of the backbone: the prefix as its cache, its mask extended, its positions shifted."""

    def __init__(self, encoder: PrefixEncoder, config: PretrainedConfig, accepts: set[str]) -> None:
        self.encoder, self.config = encoder, config
        # The backbone's documented cache input; transformers 5.24 renamed it.
        self.cache_name = "cache" if "cache" in accepts else "past_key_values"
        self.with_positions = "position_ids" in accepts

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if module.training and module.is_activation_checkpointing:
            raise RuntimeError(
                "transformers' gradient checkpointing drops the cache, and with it the prefix: enable it for a "
                "prefix model with workers.adapters.registry.enable_gradient_checkpointing"
            )
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, new = ids.shape if ids is not None else embeds.shape[:2]
        device = (ids if ids is not None else embeds).device
        n = self.encoder.n
        cache = kwargs.get(self.cache_name)
        training = module.training and torch.is_grad_enabled()
        # Without use_cache, generate still hands back the cache of its previous call: start afresh.
        if kwargs.get("use_cache") is False or (training and (cache is None or cache.get_seq_length() == 0)):
            cache = PrefixCache(self.encoder.key_values(batch))
        else:
            cache = DynamicCache(config=self.config) if cache is None else cache
            if cache.get_seq_length() == 0:
                for layer, (k, v) in enumerate(self.encoder.key_values(batch)):
                    cache.update(k, v, layer)
        kwargs[self.cache_name] = cache
        past = cache.get_seq_length()  # prefix included
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if positions is not None:
            positions = positions + n
        if mask is not None and mask.dim() == 2:
            missing = past + new - mask.shape[1]
            if missing > 0:
                mask = torch.cat([mask.new_ones(batch, missing), mask], dim=-1)
            if positions is None:
                positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]
        else:
            if mask is not None and mask.shape[-1] == past - n + new:
                attend = mask.new_zeros if mask.is_floating_point() else mask.new_ones  # additive or boolean
                mask = torch.cat([attend((*mask.shape[:-1], n)), mask], dim=-1)
            if positions is None:
                positions = torch.arange(past, past + new, device=device)[None]
        if mask is not None:
            kwargs["attention_mask"] = mask
        if self.with_positions:
            kwargs["position_ids"] = positions
        return args, kwargs


class CheckpointedForward:
    """A decoder block's forward, under `torch.utils.checkpoint.checkpoint` (non-reentrant) in training.

    It replaces the block's `forward`, so the block's hooks run once, outside the checkpoint, and every
    argument (the cache included) reaches the recomputation as it reached the first run.
    """

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.forward.__self__.training and torch.is_grad_enabled():
            return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)
        return self.forward(*args, **kwargs)


class _Prefix(AdapterMethod):
    name = "prefix"
    config = PrefixConfig

    def inject(self, model: nn.Module, layout: FamilyLayout, config: PrefixConfig) -> list[nn.Module]:
        like = model.get_input_embeddings().weight
        encoder = PrefixEncoder(model.config, config, like)
        model.add_module("prefix_encoder", encoder)
        backbone = model.get_submodule(layout.backbone)
        accepts = set(inspect.signature(backbone.forward).parameters)
        backbone.register_forward_pre_hook(PrefixHook(encoder, model.config, accepts), with_kwargs=True)
        return [encoder]

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        """Checkpoint every decoder block with the cache kept (transformers' own would drop the prefix)."""
        for block in model.get_submodule(family_for(model.config).layers):
            if not isinstance(block.forward, CheckpointedForward):
                block.forward = CheckpointedForward(block.forward)


METHOD = _Prefix()
