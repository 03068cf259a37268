"""Torch C++ extensions built on first use (DeepSpeed's shared-memory comm op on a CPU), safe after a killed build.

`torch.utils.cpp_extension.load` lets one process at a time build an extension by a baton: a file `lock` in the
extension's build directory, created exclusively and removed when the build ends. A builder killed outright
mid-build (a trial's process killed by Ray, a bench unit killed at its time budget; Ctrl-C lets torch remove it)
never removes it, and every later load of that extension waits for it forever, silently: no trial of that machine
starts again.

`exclusive_build` runs a load one adaptune process at a time (an OS file lock beside the build directory, which
dies with its holder) and, under it, removes a baton no live process holds: the builder that made it holds it
open until it removes it, and the compilers it started run in the build directory, so a baton that no process
holds open, once no process works in that directory any more, is one a dead build left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from filelock import FileLock

BATON = "lock"  # torch's name for it, in cpp_extension._jit_compile


def build_directory(name: str) -> Path:
    """Where torch builds the extension `name` (TORCH_EXTENSIONS_DIR/<name>, or its default for this torch)."""
    from torch.utils import cpp_extension  # imports setuptools: only where an extension is built (a CPU's)

    return Path(cpp_extension._get_build_directory(name, verbose=False))


@contextmanager
def exclusive_build(name: str) -> Iterator[None]:
    """Hold the build of extension `name` against other adaptune processes; remove a baton a dead build left."""
    directory = build_directory(name)
    with FileLock(directory.parent / f"{directory.name}.adaptune.lock"):
        clear_abandoned_baton(directory)
        yield


def clear_abandoned_baton(directory: Path, poll_s: float = 0.5) -> None:
    """Remove `directory`'s baton if no live process holds it; leave a live build's to torch's own wait.

    Compilers a killed build left running in the directory finish first: a new build beside them would write the
    same object files.
    """
    baton = directory / BATON
    while baton.exists():
        holders, workers = users(baton, directory)
        if holders:
            return
        if not workers:
            baton.unlink(missing_ok=True)
            print(f"removed {baton}: the build that made it ended without removing it (killed)", file=sys.stderr)
            return
        time.sleep(poll_s)


def users(path: Path, directory: Path) -> tuple[list[int], list[int]]:
    """(PIDs of the processes that hold `path` open, PIDs of those whose working directory is in `directory`).

    Processes this user may not inspect count as neither: torch's extension directories are per user.
    """
    holders, workers = [], []
    for process in psutil.process_iter():
        try:
            if Path(process.cwd()).is_relative_to(directory):
                workers.append(process.pid)
            if any(Path(f.path) == path for f in process.open_files()):
                holders.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return holders, workers
