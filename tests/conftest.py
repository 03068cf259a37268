"""Shared fixtures: the shared data, the byte tokenizer, tiny models live in tiny_models.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
