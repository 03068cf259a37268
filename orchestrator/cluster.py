"""Before a sweep starts on a cluster: can the driver reach Ray and MLflow, and can every node?

Each check turns a misconfiguration into one `ConfigError` naming the field and the fix, within
seconds, where it would otherwise hang (`ray.init` on an address that does not answer waits for
minutes) or fail once per trial. The driver calls, in this order:

    check_address(address)             # before ray.init(address=...)
    ray.init(address=...)
    tune_driver.check_nodes(storage, tracking_uri)  # `probe_node` on every alive node, through Ray

The tracking store is checked from the driver's machine by the command, before any of these
(`workers.store_check`). Nothing here imports Ray: `probe_node` is what Ray runs on each node.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from workers.errors import ConfigError
from workers.store_check import check_tracking_store, scheme

_LOCAL_ADDRESSES = frozenset({"", "auto", "local"})


# --- Ray ---------------------------------------------------------------------------------------

def _host_port(address: str) -> tuple[str, int]:
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(None, "--address", f"{address!r} is not HOST:PORT (e.g. 10.0.0.1:6379 or ray://10.0.0.1:10001)")
    return host.strip("[]"), int(port)


def _tcp_error(host: str, port: int, timeout_s: float) -> str | None:
    """None when something listens on host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except TimeoutError:
        return f"no answer within {timeout_s:.0f} s"
    except socket.gaierror:
        return f"the host name {host} does not resolve"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def check_address(address: str | None, timeout_s: float = 20.0) -> None:
    """The Ray cluster at `address` answers, is Ray (same version) and accepts this process's token.

    `None`, `auto` and `local` are left to `ray.init`, which finds or starts a cluster by itself.
    """
    if address is None or address in _LOCAL_ADDRESSES:
        return
    host, port = _host_port(address)
    reason = _tcp_error(host, port, min(5.0, timeout_s))
    if reason:
        raise ConfigError(None, "--address", f"the Ray cluster at {address} does not answer: {reason}")
    if address.startswith("ray://"):
        return
    # `ray health-check` opens the same GCS connection as ray.init, in a process we can time out.
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"
    try:
        done = subprocess.run([ray_bin, "health-check", "--address", f"{host}:{port}"],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(None, "--address", f"{address} accepts connections but is not a Ray cluster's GCS port "
                                             f"(the --port of `ray start --head`, 6379 by default)") from None
    if done.returncode == 0:
        return
    output = done.stderr + done.stdout
    if "InvalidAuthToken" in output or "AuthenticationError" in output:
        raise ConfigError(None, "--address", f"the Ray cluster at {address} refused this process's token: set "
                                             f"RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the cluster's token")
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "no output")
    raise ConfigError(None, "--address", f"the Ray cluster at {address} cannot be used: {last}")


# --- every node --------------------------------------------------------------------------------

def is_uri(storage: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://", storage))


def probe_node(storage: str | None, marker: str | None, tracking_uri: str, where: str) -> list[tuple[str, str]]:
    """On one node: (field, problem) for what is wrong with its view of the storage and the tracking store.

    `storage` is the driver's storage folder (None for a URI), `marker` a file the driver left in it
    (None when the driver's disk is not the cluster's), `where` names the node in the messages.
    """
    where = f"node {socket.gethostname()} ({where})"
    problems = []
    if storage is not None:
        folder = Path(storage)
        if not folder.is_dir():
            problems.append(("storage", f"{where}: the storage folder {storage} does not exist"))
        elif not os.access(folder, os.W_OK | os.X_OK):
            problems.append(("storage", f"{where}: the storage folder {storage} is not writable"))
        elif marker and not (folder / marker).exists():
            problems.append(("storage", f"{where}: {storage} is not the driver's folder (another disk): "
                                        f"mount the shared volume there"))
    try:
        check_tracking_store(tracking_uri)
    except ConfigError as exc:
        problems.append(("tracking.uri", f"{where}: {exc.message}"))
    return problems


def single_machine_uri(tracking_uri: str) -> bool:
    """A tracking store that is a file on one machine (SQLite, a file store): refused on a multi-machine cluster."""
    return scheme(tracking_uri) in ("sqlite", "file", "")
