"""A model's shape from its `config.json` alone: read with `json`, no torch, no transformers.

The pre-flight reads the config from a folder or the hub cache (fetching it within `HUB_TIMEOUT_S`
when online), and from it the in/out sizes of every linear role and rough parameter counts: enough to
refuse a placement a family lacks, a rank larger than its layer, or a model that cannot fit.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from workers.errors import ConfigError
from workers.placement import FamilyLayout

HUB_TIMEOUT_S = 10.0
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def looks_like_path(name: str) -> bool:
    """A local folder rather than a hub id (the rule of `workers.model_loading`)."""
    return name.startswith((".", "/", "~")) or Path(name).exists()


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_file(repo: str, filename: str, field: str) -> Path | None:
    """`filename` of hub repo `repo` from the cache, else fetched within `HUB_TIMEOUT_S`; None when the
    repo answered that it has no such file. A `ConfigError` on `field` when it cannot be had."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo, filename)
    except ValueError as exc:  # not a valid repo id
        raise ConfigError(None, field, f"{repo!r} is neither a folder nor a hub id: {exc}") from None
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:  # the cache records that the repo has no such file
        return None
    if offline():
        raise ConfigError(None, field, f"{repo!r} is not a folder and its {filename} is not in the hub cache "
                                       f"(offline: HF_HUB_OFFLINE is set)")
    result: dict[str, Any] = {}

    def fetch() -> None:
        try:
            result["path"] = hf_hub_download(repo, filename, etag_timeout=HUB_TIMEOUT_S)
        except Exception as exc:  # the hub client raises many types (HTTP, connection, repo not found)
            result["error"] = exc

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(HUB_TIMEOUT_S)
    if worker.is_alive():
        raise ConfigError(None, field, f"{repo!r} is not a folder and the hub did not answer within "
                                       f"{HUB_TIMEOUT_S:.0f} s (set HF_HUB_OFFLINE=1 to use the cache only)")
    if "error" in result:
        exc = result["error"]
        if type(exc).__name__ == "EntryNotFoundError":
            return None
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(None, field, f"cannot fetch {filename} of {repo!r} from the hub: {reason}")
    return Path(result["path"])


def read_config(model: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The config of `model` (a folder with config.json, or a hub id) as a mapping, `overrides` applied."""
    if looks_like_path(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise ConfigError(None, "model", f"{folder} is not a folder (expected a model folder or a hub id)")
        path: Path | None = folder / "config.json"
        if not path.is_file():
            raise ConfigError(None, "model", f"{folder} has no config.json (expected a model folder or a hub id)")
    else:
        path = hub_file(model, "config.json", "model")
        if path is None:
            raise ConfigError(None, "model", f"the hub repo {model!r} has no config.json")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(None, "model", f"{path} is not a JSON file: {exc}") from None
    except OSError as exc:
        raise ConfigError(None, "model", f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(config, dict):
        raise ConfigError(None, "model", f"{path} is not a JSON object")
    return {**config, **overrides}


def has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _int(config: dict[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    if default is None:
        raise ConfigError(None, "model", f"config.json has no positive integer {' or '.join(keys)}")
    return default


class Shape:
    """The sizes of one model: hidden, MLP width, layers, heads, and the in/out size of each linear role.

    What an adapter's config plans with (`workers.placement.ModelShape`: hidden, layers, dims).
    """

    def __init__(self, config: dict[str, Any], layout: FamilyLayout) -> None:
        self.layout = layout
        self.hidden = d = _int(config, "hidden_size", "n_embd", "n_embed", "d_model")
        self.layers = _int(config, "num_hidden_layers", "n_layer", "num_layers")
        heads = _int(config, "num_attention_heads", "n_head", default=1)
        kv = _int(config, "num_key_value_heads", default=heads)
        head_dim = _int(config, "head_dim", default=max(1, d // heads))
        self.mlp = _int(config, "intermediate_size", "ffn_dim", "n_inner", default=4 * d)
        self.vocab = _int(config, "vocab_size", default=32_000)
        self.tied = config.get("tie_word_embeddings", True) is not False
        q, k = heads * head_dim, kv * head_dim
        self.dims = {"q": (d, q), "k": (d, k), "v": (d, k), "qkv": (d, q + 2 * k), "o": (q, d),
                     "gate": (d, self.mlp), "up": (d, self.mlp), "down": (self.mlp, d)}

    def base_parameters(self) -> int:
        """About the base model's parameters: the linears of every block and the embeddings."""
        roles = ["qkv", "o"] if self.layout.fused_qkv else ["q", "k", "v", "o"]
        roles += [r for r in ("gate", "up", "down") if self.layout.has(r)]
        per_layer = sum(a * b for a, b in (self.dims[r] for r in roles))
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2)
