"""Paths as a reader of the record wants them: relative to the adaptune checkout when they lie in it.

A sweep resolves `sweeps/models/tiny-llama` to an absolute path so that Ray workers find it; the
record (parameters, the spec artifact, the adapter's `base_model`) says `sweeps/models/tiny-llama`
again, not the folder of the machine that ran it. Paths elsewhere, and hub ids, stay as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The spec's fields that hold paths: the model, the tokenizer, the data files and folder.
PATH_FIELDS = ("model", "tokenizer", "train", "eval", "data_root", "train_file")


def repo_relative(value: str, repo: Path = REPO) -> str:
    """`value` relative to `repo` when it is an absolute path inside it; else `value` unchanged."""
    path = Path(value)
    if not path.is_absolute():
        return value
    try:
        return path.relative_to(repo).as_posix()
    except ValueError:
        return value


def relative_paths(tree: Any, repo: Path = REPO) -> Any:
    """A copy of a spec-shaped tree with the path fields (`PATH_FIELDS`, at any depth) made repo-relative."""
    if isinstance(tree, dict):
        return {k: _relative_field(v, repo) if k in PATH_FIELDS else relative_paths(v, repo) for k, v in tree.items()}
    if isinstance(tree, list):
        return [relative_paths(v, repo) for v in tree]
    return tree


def _relative_field(value: Any, repo: Path) -> Any:
    if isinstance(value, str):
        return repo_relative(value, repo)
    if isinstance(value, list):
        return [repo_relative(v, repo) if isinstance(v, str) else v for v in value]
    return value
