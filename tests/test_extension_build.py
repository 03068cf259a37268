"""A JIT build of a torch extension killed mid-way leaves its baton (`lock`): the next start must not wait forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers.extension_build import BATON, clear_abandoned_baton

REPO = Path(__file__).resolve().parents[1]


def holding(path: Path) -> subprocess.Popen:
    """A live process that holds `path` open, as torch's builder holds its baton through a build."""
    proc = subprocess.Popen([sys.executable, "-c", f"import os, time; os.open({str(path)!r}, os.O_RDONLY); "
                             "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_baton_no_process_holds_is_removed(tmp_path: Path) -> None:
    baton = tmp_path / BATON
    baton.touch()
    clear_abandoned_baton(tmp_path)
    assert not baton.exists()


def test_a_live_builds_baton_is_left_to_it(tmp_path: Path) -> None:
    baton = tmp_path / BATON
    baton.touch()
    builder = holding(baton)
    try:
        clear_abandoned_baton(tmp_path)
        assert baton.exists()
    finally:
        builder.kill()
        builder.wait()
    clear_abandoned_baton(tmp_path)
    assert not baton.exists()


def test_compilers_a_killed_build_left_finish_before_the_baton_goes(tmp_path: Path) -> None:
    """A killed builder's compilers run on in the build directory: a new build beside them would share their files."""
    baton = tmp_path / BATON
    baton.touch()
    compiler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"], cwd=tmp_path)
    try:
        clear_abandoned_baton(tmp_path, poll_s=0.1)
        assert compiler.poll() is not None, "the baton went while a compiler still worked in the directory"
        assert not baton.exists()
    finally:
        compiler.kill()
        compiler.wait()


@pytest.mark.slow
def test_deepspeed_starts_after_its_first_build_was_killed(tmp_path: Path) -> None:
    """The first DeepSpeed start on a CPU JIT-compiles its comm op (about a minute). Kill it mid-build, as Ray kills a
    trial's process (its compilers run on), then start two trials at once: both start, after one build.

    Before `exclusive_build`, both waited forever on the dead build's baton."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    start = [sys.executable, "-c", "from workers.train import init_distributed; print(init_distributed('gloo'))"]
    first = subprocess.Popen(start, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    baton = tmp_path / "extensions" / "deepspeed_shm_comm" / BATON
    deadline = time.monotonic() + 300
    while not baton.exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first start never began its build"
        time.sleep(0.1)
    time.sleep(2)  # into the compile
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert baton.exists()

    restarts = [subprocess.Popen(start, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    try:
        outcomes = [proc.communicate(timeout=600) for proc in restarts]
    finally:
        for proc in restarts:
            proc.kill()
    for proc, (out, err) in zip(restarts, outcomes, strict=True):
        assert proc.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == "(0, 1)"
    assert sum("ended without removing it" in err for _, err in outcomes) == 1
    assert not baton.exists()
