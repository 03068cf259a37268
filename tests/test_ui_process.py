"""`adaptune ui` is the MLflow UI's own process: what stops it stops the server."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from services import free_port, stop_group


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.slow
def test_a_sigterm_to_adaptune_ui_stops_the_server(tmp_path: Path) -> None:
    port = free_port()
    health = f"http://127.0.0.1:{port}/health"
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "adaptune"), "ui", "--tracking-uri",
                                 f"sqlite:///{tmp_path}/mlflow.db", "--port", str(port)], cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _answers(health):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert f"MLflow UI on http://127.0.0.1:{port}" in log.read_text()  # printed before the server took over
        proc.send_signal(signal.SIGTERM)  # to `adaptune ui` alone, as a supervisor or `kill` sends it
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _answers(health) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _answers(health), "the MLflow UI outlived `adaptune ui`"
    finally:
        stop_group(proc, grace_s=5)  # whatever is left of its session, if the assertions failed
