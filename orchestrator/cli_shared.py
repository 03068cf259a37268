"""What the driver's commands (`orchestrator.cli`) and the worker commands (`orchestrator.worker_commands`)
share: the `--trust-remote-code` option and the checks of a store and a folder, torch-free."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from workers.errors import ConfigError

TRUST_REMOTE_CODE = typer.Option("--trust-remote-code",
                                 help="allow trials whose file sets trust_remote_code to run their model folder's code")


def check_store(uri: str, file: str, field: str | None = "tracking.uri") -> None:
    """The tracking store answers (within seconds) and, where it is an SQLite file, is MLflow's: a
    `ConfigError` naming `file` and `field` when not. Each command runs it once per store."""
    from workers.store_check import check_tracking_store

    try:
        check_tracking_store(uri)
    except ConfigError as exc:
        raise ConfigError(file, field, exc.message) from None


def writable_folder(folder: Path, file: str, field: str | None) -> None:
    """`folder` can be created (or is) a writable folder; checked without creating anything."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(file, field, f"{existing} is a file; expected a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(file, field, f"{existing} is not writable")
