"""A trial's tracking calls, written ahead to disk in order, so a tracking outage loses nothing.

`Spool` is an append-only JSON-lines file of calls (`params`, `metrics`, `tags`, `artifact`) plus a
count of those already delivered. A tracker appends every call, then `deliver`s the undelivered ones
in order, stopping at the first that fails; what is left is delivered on a later call, at the end
of the trial, or by the next attempt of the trial (`adaptune resume`) reading the same file.
No MLflow here: delivery is a callable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

Call = dict[str, Any]


def undelivered(folder: Path) -> bool:
    """Whether `folder` holds calls that some run's spool has not delivered (a delivered spool is removed)."""
    return any(folder.glob("*.jsonl"))


class Spool:
    """The calls of one run in `folder/<run id>.jsonl`; `<run id>.sent` counts those delivered."""

    def __init__(self, folder: Path, run_id: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{run_id}.jsonl"
        self.sent_path = folder / f"{run_id}.sent"

    def append(self, call: Call) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(call) + "\n")

    def _sent(self) -> int:
        try:
            return int(self.sent_path.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def pending(self) -> list[Call]:
        """The calls not yet delivered, oldest first."""
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()
        # A line cut short by a crash mid-write was never delivered, nor acknowledged to the trial.
        calls = []
        for line in lines[self._sent():]:
            try:
                calls.append(json.loads(line))
            except ValueError:
                break
        return calls

    def _mark(self, sent: int) -> None:
        tmp = self.sent_path.with_suffix(".sent.tmp")
        tmp.write_text(str(sent))
        os.replace(tmp, self.sent_path)

    def deliver(self, send: Callable[[Call], None], transient: Callable[[Exception], bool]) -> Exception | None:
        """Send the pending calls in order; None when all went, else the transient error that stopped
        them (the call stays pending). A call refused for good is dropped and its error raised."""
        sent = self._sent()
        for call in self.pending():
            try:
                send(call)
            except Exception as exc:
                if transient(exc):
                    return exc
                self._mark(sent + 1)
                raise
            sent += 1
            self._mark(sent)
        self.path.unlink(missing_ok=True)
        self.sent_path.unlink(missing_ok=True)
        return None
