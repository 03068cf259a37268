"""Base models and tokenizers: from the hub, from a folder, or random from a config."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from workers.errors import ConfigError

BYTE_TOKENIZER = "byte"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def load_model_config(
    model: str, overrides: dict[str, Any] | None = None, trust_remote_code: bool = False
) -> PretrainedConfig:
    """The config of `model` (a folder with config.json, or a hub id), with `overrides` applied."""
    if _looks_like_path(model):
        folder = Path(model).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(None, "model", f"{folder} has no config.json (expected a model folder or a hub id)")
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(None, "model", f"cannot load a config for {model!r}: {str(exc).splitlines()[0]}") from None
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return config


def eight_bit_config() -> BitsAndBytesConfig:
    """transformers' LLM.int8() quantization (Dettmers et al.): W ≈ s · W_int8 per row, outlier
    features in fp16; or a `ConfigError` naming `load_in_8bit` where it cannot run."""
    if not torch.cuda.is_available():
        raise ConfigError(None, "load_in_8bit", "8-bit loading (bitsandbytes) needs a CUDA GPU; this machine has none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(None, "load_in_8bit", "8-bit loading needs the bitsandbytes package, not installed here")
    return BitsAndBytesConfig(load_in_8bit=True)


def build_model(
    model: str,
    *,
    overrides: dict[str, Any] | None = None,
    random_init: bool = False,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    load_in_8bit: bool = False,
) -> PreTrainedModel:
    """A causal LM: pretrained weights, or random ones from its config (`random_init`, or `device="meta"`).

    `load_in_8bit` loads the pretrained linears in 8-bit straight onto `device` (a CUDA device);
    the other weights keep `dtype`.
    """
    quantization = eight_bit_config() if load_in_8bit else None
    config = load_model_config(model, overrides, trust_remote_code)
    if random_init or str(device) == "meta":
        torch.manual_seed(seed)
        with torch.device(device):
            net = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        return net
    if quantization is not None:
        return AutoModelForCausalLM.from_pretrained(
            model, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
            quantization_config=quantization, device_map={"": torch.device(device)},
        )
    net = AutoModelForCausalLM.from_pretrained(
        model, config=config, dtype=dtype, trust_remote_code=trust_remote_code
    )
    return net.to(device)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that needs no download: one token per UTF-8 byte, plus pad, bos and eos (259 ids)."""
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """`name` as a tokenizer, with a pad token guaranteed (the EOS, or unk, where it has none)."""
    if name == BYTE_TOKENIZER:
        return byte_tokenizer()
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(None, "tokenizer", f"cannot load a tokenizer for {name!r}: {reason}") from None
    return ensure_pad_token(tok)


def ensure_pad_token(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tok` a pad token where it has none: unk where it has one, else EOS."""
    if tok.pad_token is None:
        # The paper's LLaMA runs pad with id 0 (unk); other families have only an EOS.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok
