"""The reaper of a cluster that `adaptune run` started: once the driver is gone, so is its cluster.

Ray ties its head processes to the driver that started them (they die with it), but not all they
started in turn: after a SIGKILL of the driver, Ray's two node agents stayed for 60 s (blocked in a
report to the dead GCS; measured), and whatever a trial started is on its own. So the driver starts
this small process first, in a session of its own. Twice a second it notes every descendant of the
driver (the cluster's processes, the trials and theirs), each by PID and start time; once the driver
is gone, however it ended, every noted process still alive and its own descendants get SIGTERM, and
SIGKILL after a grace period. Not a pipe's end, which a child forked by the driver would hold open;
not a marker in the environment, which Ray's processes overwrite with their titles. Linux only, as
it reads /proc; elsewhere it notes nothing and reaps nothing.

    python -m orchestrator.reaper <driver pid>
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LOOK_EVERY_S = 0.5
GRACE_S = 3.0
GIVE_UP_S = 30.0


def processes() -> dict[int, tuple[int, int]]:
    """PID -> (parent PID, start time in clock ticks since boot) of this user's running processes (no zombies)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    """The processes of `table` below any of `roots`, at any depth."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class Reaper:
    """What the driver started, noted while it lives, and ended after it."""

    def __init__(self, driver: int) -> None:
        self.driver = driver
        self.noted: dict[int, int] = {}  # PID -> start time: a reused PID is somebody else's
        self.driver_start = processes().get(driver, (0, -1))[1]

    def driver_alive(self, table: dict[int, tuple[int, int]]) -> bool:
        """Whether the driver still runs (a zombie does not: `processes` leaves zombies out)."""
        return table.get(self.driver, (0, -2))[1] == self.driver_start

    def alive(self, table: dict[int, tuple[int, int]]) -> set[int]:
        """The noted processes that still run (the same PID with the same start time)."""
        return {pid for pid, start in self.noted.items() if table.get(pid, (0, -1))[1] == start}

    def look(self, driver_alive: bool = True) -> dict[int, tuple[int, int]]:
        """Note the descendants of the driver (while it lives: its PID may be reused after) and of every
        noted process still alive."""
        table = processes()
        roots = self.alive(table) | ({self.driver} if driver_alive else set())
        for pid in descendants(roots, table) - {os.getpid()}:
            self.noted.setdefault(pid, table[pid][1])
        return table

    def reap(self, grace_s: float = GRACE_S, give_up_s: float = GIVE_UP_S) -> None:
        """SIGTERM to every noted process still alive, SIGKILL to those left after `grace_s`, until
        none is left or `give_up_s` has passed."""
        termed: dict[int, float] = {}
        deadline = time.monotonic() + give_up_s
        while (left := self.alive(self.look(driver_alive=False))) and time.monotonic() < deadline:
            now = time.monotonic()
            for pid in left:
                late = now - termed.setdefault(pid, now) > grace_s
                if late or termed[pid] == now:
                    _signal(pid, signal.SIGKILL if late else signal.SIGTERM)
            time.sleep(0.2)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return


def start() -> subprocess.Popen:
    """The reaper of what this process starts, for after this process."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator.reaper", str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def main() -> None:
    reaper = Reaper(int(sys.argv[1]))
    while reaper.driver_alive(reaper.look()):
        time.sleep(LOOK_EVERY_S)
    reaper.reap()


if __name__ == "__main__":
    main()
