"""Checkpoints that survive a crash: written under a temporary name, synced, renamed, verified.

A checkpoint is a folder `step-<8 digits>` in a trial's checkpoint directory holding `manifest.json`,
the size and SHA-256 of each of its files. It is written as `.tmp-step-...`; `commit` records the
manifest, syncs every file to disk and renames the folder, so a `step-*` folder was once complete.
`newest_valid` checks them newest first against their manifests and names each one it skipped;
when there are checkpoints and none is valid it raises `CheckpointError`, one line naming the folder.
No torch here: the checks are on files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

MANIFEST = "manifest.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


class CheckpointError(Exception):
    """A trial's checkpoint directory holds checkpoints, and none of them is valid."""


def tag(step: int) -> str:
    """The folder name of the checkpoint at optimizer step `step`."""
    return f"{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """Record `tmp`'s manifest, sync its files, and rename it to `final` (replacing an older `final`)."""
    manifest = {}
    for path in _files(tmp):
        _fsync(path)
        manifest[path.relative_to(tmp).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _fsync(tmp / MANIFEST)
    for folder in {p.parent for p in _files(tmp)} | {tmp}:
        _fsync(folder)
    if final.exists():  # a step replayed after a resume from an older checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)


def problem(folder: Path) -> str | None:
    """Why the checkpoint in `folder` cannot be used, or None when every file matches its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest.json (written incompletely, or before manifests)"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest.json ({exc})"
    for name, entry in sorted(manifest.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, the manifest says {entry['size']}"
        if _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def candidates(checkpoint_dir: Path) -> list[Path]:
    """The committed checkpoints of `checkpoint_dir`, newest first."""
    return sorted((p for p in checkpoint_dir.glob(f"{PREFIX}*") if p.is_dir()), reverse=True)


def newest_valid(checkpoint_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest valid checkpoint (None when there is none at all) and the newer ones skipped, with why."""
    skipped = []
    for folder in candidates(checkpoint_dir):
        reason = problem(folder)
        if reason is None:
            return folder, skipped
        skipped.append((folder, reason))
    if skipped:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise CheckpointError(f"{checkpoint_dir}: no valid checkpoint to resume from ({reasons})")
    return None, []


def prune(checkpoint_dir: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints; remove older ones and unfinished temporary folders."""
    for old in candidates(checkpoint_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in checkpoint_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
