"""Tiny randomly initialised models of every family (2 layers, hidden 64), built from configs."""

from __future__ import annotations

import copy

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

VOCAB = 259  # the byte tokenizer's size

TINY_CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "mistral": MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "qwen2": Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "bloom": BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "opt": OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "gptj": GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512,
                       n_inner=160, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, n_inner=160,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
}

FAMILIES = ("llama", "bloom", "opt", "gptj", "gpt2", "gpt_neox")


def tiny_model(family: str, seed: int = 0, layers: int = 2) -> PreTrainedModel:
    """A fresh tiny model of `family` in fp32 eval mode, with weights from `seed`, `layers` deep."""
    torch.manual_seed(seed)
    config = copy.deepcopy(TINY_CONFIGS[family])
    config.num_hidden_layers = layers  # every family's name for it, or an alias of its own
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
