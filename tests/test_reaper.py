"""The reaper of a cluster started by `adaptune run`: what the driver started ends after the driver, however
it ended, and nothing else does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from orchestrator import reaper

REPO = Path(__file__).resolve().parents[1]

# A driver: starts its reaper, then a child that ignores SIGTERM with a grandchild of its own, and a
# child whose own child outlives it (reparented to init, as Ray's agents are once their raylet died).
DRIVER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from orchestrator import reaper
    watch = reaper.start()
    stubborn = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)")
    subprocess.Popen([sys.executable, "-c", stubborn])
    if os.fork() == 0:
        if os.fork() == 0:
            time.sleep(600)
        time.sleep(2)
        os._exit(0)
    time.sleep(600)
""")


def _below(root: int) -> set[int]:
    return reaper.descendants({root}, reaper.processes())


def _alive(pids: set[int]) -> set[int]:
    return pids & set(reaper.processes())


def test_what_a_killed_driver_started_ends_after_it_and_nothing_else(tmp_path: Path) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=tmp_path, start_new_session=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        deadline = time.monotonic() + 60
        daemon: set[int] = set()
        while len(daemon) != 1 and time.monotonic() < deadline:  # until the orphan has left the driver's tree
            time.sleep(0.2)
            session = {pid for pid in reaper.processes() if os.getsid(pid) == driver.pid} - {driver.pid}
            daemon = session - _below(driver.pid)
        started = (_below(driver.pid) | daemon) - {_reaper_pid(driver.pid)}
        assert len(started) == 3 and len(daemon) == 1, started
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        killed = time.monotonic()
        while _alive(started) and time.monotonic() - killed < reaper.GRACE_S + 10:
            time.sleep(0.1)
        assert not _alive(started), f"left after {time.monotonic() - killed:.1f} s"
        assert bystander.poll() is None
    finally:
        for pid in _alive({p for p in reaper.processes() if os.getsid(p) == driver.pid}):
            os.kill(pid, signal.SIGKILL)
        bystander.kill()
        bystander.wait()


def _reaper_pid(driver: int) -> int:
    (pid,) = [p for p in _below(driver) if b"orchestrator.reaper" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return pid


def test_the_reaper_ends_with_its_driver_when_nothing_is_left() -> None:
    driver = subprocess.Popen([sys.executable, "-c", "from orchestrator import reaper; import time; "
                               "r = reaper.start(); time.sleep(1)"], env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 30
    while not (below := _below(driver.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.wait()
    while _alive(below) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert below and not _alive(below)
