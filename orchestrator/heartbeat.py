"""The driver's heartbeat: a file in the sweep's folder that the driver touches while its trials run.

A trial whose driver is gone (killed, its machine lost) notices the file going still and stops at
the next step with a checkpoint, so `adaptune resume` takes it up from there. Staleness is judged by
the file's modification time *changing*, seen on the trial's own clock: no clock is compared
across machines. A driver that ends removes the file: one left behind is a killed driver's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

INTERVAL_S = 2.0
STALE_S = 10.0


class Heartbeat:
    """A thread touching `path` every `interval_s` seconds for the life of the `with` block."""

    def __init__(self, path: Path, interval_s: float = INTERVAL_S) -> None:
        self.path, self.interval_s = path, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="adaptune-heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            self.path.touch()
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> Heartbeat:
        self.path.touch()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def driver_gone(path: Path, stale_s: float = STALE_S) -> Callable[[], bool]:
    """A `should_stop` for a trial: True once `path` has not changed for `stale_s` seconds, or is gone once seen.

    Without the file from the start there is no driver to watch (a trial run on its own): never True.
    """
    last: dict[str, float] = {"mtime": -1.0, "seen": time.monotonic()}

    def gone() -> bool:
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return last["mtime"] != -1.0  # removed by its driver as it ended
        now = time.monotonic()
        if mtime != last["mtime"]:
            last["mtime"], last["seen"] = mtime, now
            return False
        return now - last["seen"] > stale_s

    return gone


def beating(path: Path, wait_s: float = 1.5 * INTERVAL_S) -> bool:
    """Whether a driver touches `path` now: its modification time changes within `wait_s` (no clock compared)."""
    try:
        first = path.stat().st_mtime_ns
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if path.stat().st_mtime_ns != first:
                return True
    except FileNotFoundError:
        pass
    return False
