"""Shared fixtures: the shared data, the byte tokenizer, tiny models live in tiny_models.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models spend more on thread hand-offs than on arithmetic: one intra-op thread is faster,
# and on a shared 2-core runner several times faster (oversubscription). Worker processes that
# Ray, DeepSpeed or torchrun start set their own.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADAPTUNE_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data" / "llm-adapters"
MODEL_CONFIGS = SHARED / "model-configs"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def model_configs() -> Path:
    if not MODEL_CONFIGS.is_dir():
        pytest.skip(f"shared model configs not found at {MODEL_CONFIGS}")
    return MODEL_CONFIGS


@pytest.fixture(scope="session")
def byte_tok():
    from workers.model_loading import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (about 7 s to start), shared by every driver test."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
