"""Checkpoints read with `torch.load(weights_only=True)`: a file in the storage folder cannot run code.

DeepSpeed's own engine unpickles whatever a checkpoint holds (`weights_only=False`); `SafeCheckpointEngine`
replaces its `load` and allows, besides tensors and plain containers, only the few DeepSpeed types a
checkpoint of ours holds. RNG states are kept as tensors and plain numbers (`rng_state`, `set_rng_state`),
not as the numpy objects `np.random.get_state()` returns.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# The classes of DeepSpeed's a checkpoint of ours holds besides tensors: the ZeRO stage of every one; the loss
# scaler of a ZeRO-1, 2 or 3 optimizer's state (static in fp32 and bf16, dynamic in fp16); the ZeRO-1 and 2
# parameters' places in the flat partition. Each is plain data (numbers), and loading one runs no code of its own.
CHECKPOINT_CLASSES = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True`."""

    def load(self, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(CHECKPOINT_CLASSES):
            return torch.load(path, map_location=map_location, weights_only=True)


def rng_state() -> dict[str, Any]:
    """The Python, numpy, torch (and this rank's CUDA device's) RNG states as tensors, lists and numbers."""
    version, keys, gauss = random.getstate()
    kind, mt, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(keys), gauss], "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(mt.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():  # this rank's GPU's alone: a resumed rank may see fewer GPUs (another node)
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, mt.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())
