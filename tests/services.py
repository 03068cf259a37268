"""Throwaway servers for tests: PostgreSQL 15 (initdb/pg_ctl) and an MLflow tracking server on it.

Both live in a fresh temporary folder on a free loopback port and are stopped and removed on the
way out of their `with` block, whatever happened inside. PostgreSQL refuses to run as root: as
root the server runs as the `postgres` system user (runuser), from a folder that user owns.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

PG_DIRS = ("/usr/lib/postgresql/15/bin",)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> str | None:
    """A PostgreSQL program: on the PATH, or in Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    for folder in PG_DIRS:
        if os.access(Path(folder) / name, os.X_OK):
            return str(Path(folder) / name)
    return None


def _as_pg_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str
    database: str
    folder: Path

    def uri(self, *, password: str | None = None, with_password: bool = True) -> str:
        """`postgresql://user:password@127.0.0.1:port/db`; `with_password=False` leaves it to PGPASSWORD."""
        secret = self.password if password is None else password
        auth = f"{self.user}:{secret}" if with_password else self.user
        return f"postgresql://{auth}@{self.host}:{self.port}/{self.database}"


@contextmanager
def postgres(user: str = "adaptune", password: str = "pg-test-secret", database: str = "mlflow") -> Iterator[Postgres]:
    """A PostgreSQL server on 127.0.0.1 with password (SCRAM) authentication and one database."""
    initdb, pg_ctl, createdb = pg_bin("initdb"), pg_bin("pg_ctl"), pg_bin("createdb")
    if not (initdb and pg_ctl and createdb):
        raise FileNotFoundError("PostgreSQL's initdb/pg_ctl/createdb are not installed (apt-get install postgresql)")
    # /tmp, not pytest's tmp_path: the postgres user must be able to reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="adaptune-pg-"))
    data, log, pwfile = folder / "data", folder / "server.log", folder / "pwfile"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    port = free_port()
    started = False
    try:
        try:
            subprocess.run(_as_pg_user([initdb, "-D", str(data), "-U", user, f"--pwfile={pwfile}", "-E", "UTF8",
                                        "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "--no-sync"]),
                           check=True, capture_output=True, timeout=120)
            pwfile.unlink()
            options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
            started = True
            subprocess.run(_as_pg_user([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60",
                                        "start"]), check=True, capture_output=True, timeout=90)
            subprocess.run([createdb, "-h", "127.0.0.1", "-p", str(port), "-U", user, database], check=True,
                           capture_output=True, timeout=60, env={**os.environ, "PGPASSWORD": password})
        except subprocess.CalledProcessError as exc:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"PostgreSQL failed: {exc.cmd}\n{exc.stderr.decode()[-2000:]}\n{tail}") from exc
        yield Postgres("127.0.0.1", port, user, password, database, folder)
    finally:
        if started:
            subprocess.run(_as_pg_user([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True, timeout=60, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, env: dict[str, str] | None = None,
                  timeout_s: float = 180.0, port: int | None = None, workers: int = 2) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over `backend_uri`, serving artifacts from `artifacts`; yields its URL.

    `port`: a given port (to restart a stopped server where its clients look for it), else a free one.
    `workers`: its worker processes; each imports MLflow as it starts (seconds of CPU on a loaded runner).
    """
    port = port or free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    log_path = artifacts.parent / f"mlflow-server-{port}.log"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", backend_uri, "--serve-artifacts", "--artifacts-destination", str(artifacts),
           "--workers", str(workers)]
    with log_path.open("w") as log:
        # Its own process group: the server's workers are stopped with it.
        # Without MLflow's job runner (4 huey processes for GenAI jobs that no test uses).
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server not up in {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(proc, grace_s=5)


@dataclass(frozen=True)
class RayCluster:
    address: str                      # the head's GCS, host:port
    dashboard: str | None             # http://127.0.0.1:port, for `ray job submit`
    env: dict[str, str]               # a client's environment: the token
    temp_dirs: dict[str, Path]        # node name -> its Ray folder (sessions, worker logs)

    def node_of_pid(self, pid: int) -> str | None:
        """Which node ran the Ray worker process `pid`: each node logs its workers in its own folder."""
        for name, folder in self.temp_dirs.items():
            if list(folder.glob(f"session_*/logs/worker-*-{pid}.out")):
                return name
        return None


def mount_namespaces_work() -> bool:
    """Whether this process may give a child a mount namespace of its own (root, unshare present)."""
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True,
                              timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextmanager
def ray_cluster(token: str, *, cpus_per_node: int = 1, dashboard: bool = False, hide: Path | None = None,
                timeout_s: float = 180.0) -> Iterator[RayCluster]:
    """Two Ray nodes on this machine, `node_a` (the head) and `node_b`, token authentication on.

    Each node has `cpus_per_node` CPUs and a custom resource named after it, and its own Ray folder,
    so nothing here touches /tmp/ray or other Ray clusters on the machine (no `ray stop`: it would
    end every Ray process on the machine). `hide`: a folder that node_b cannot see (a tmpfs over it
    in a mount namespace of its own), a disk missing on a worker.
    """
    ray_bin = str(Path(sys.executable).parent / "ray")
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # The venv's bin first: a job's entrypoint (`adaptune run ...`) resolves through the head's PATH.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **client_env,
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    temp = {name: Path(tempfile.mkdtemp(prefix=f"adt-{name}-")) for name in ("node_a", "node_b")}
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Each node's agent gets a port of its own: by default every agent on the machine takes 52365,
    # and the head's job API needs its agent's.
    head_cmd = [ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={temp['node_a']}",
                f"--num-cpus={cpus_per_node}", '--resources={"node_a": 1}', "--block", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}"]
    dashboard_url = None
    if dashboard:
        dashboard_port = free_port()
        head_cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    else:
        head_cmd.append("--include-dashboard=false")
    node_cmd = [ray_bin, "start", f"--address={address}", f"--temp-dir={temp['node_b']}",
                f"--num-cpus={cpus_per_node}", '--resources={"node_b": 1}', "--block", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}"]
    if hide is not None:
        hide.mkdir(parents=True, exist_ok=True)
        node_cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs adaptune-hidden "$0" && exec "$@"', str(hide), *node_cmd]
    procs: list[subprocess.Popen] = []
    try:
        for name, cmd in (("node_a", head_cmd), ("node_b", node_cmd)):
            with (temp[name] / "start.log").open("w") as log:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            if name == "node_a":
                _wait_for(lambda: (temp["node_a"] / "ray_current_cluster").exists(), procs, temp, timeout_s)
        nodes = _count_nodes_script(address, 2, timeout_s)
        waited = subprocess.run([sys.executable, "-c", nodes], env=env, capture_output=True, text=True,
                                timeout=timeout_s + 30, check=False)
        if waited.returncode != 0:
            raise RuntimeError(f"the second Ray node did not join:\n{waited.stderr[-2000:]}\n{_logs(temp)}")
        if dashboard_url:
            _wait_for(lambda: _answers(f"{dashboard_url}/api/version", token), procs, temp, timeout_s)
        yield RayCluster(address, dashboard_url, client_env, temp)
    finally:
        for proc in reversed(procs):
            stop_group(proc, grace_s=3)
        for folder in temp.values():
            shutil.rmtree(folder, ignore_errors=True)


def _wait_for(ready, procs: list[subprocess.Popen], temp: dict[str, Path], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise RuntimeError(f"a Ray node did not start:\n{_logs(temp)}")
        time.sleep(0.5)


def _answers(url: str, token: str) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _count_nodes_script(address: str, count: int, timeout_s: float) -> str:
    return (f"import ray, sys, time\nray.init(address={address!r}, logging_level='ERROR')\n"
            f"deadline = time.monotonic() + {timeout_s}\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
            f"    if time.monotonic() > deadline: sys.exit('only ' + str(ray.nodes()))\n"
            f"    time.sleep(0.5)\n")


def _logs(temp: dict[str, Path]) -> str:
    return "\n".join(f"--- {name}\n{(folder / 'start.log').read_text()[-1500:]}"
                     for name, folder in temp.items() if (folder / "start.log").exists())


def stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop `proc`, started with `start_new_session=True`, and every process of its session.

    SIGTERM to its process group first; after `grace_s`, SIGKILL to whatever is left of the session
    (Ray's worker processes move to process groups of their own, not to sessions of their own).
    """
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    for pid in _session_members(proc.pid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=grace_s)


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(ProcessLookupError, PermissionError):
                if os.getsid(int(entry.name)) == sid:
                    members.append(int(entry.name))
    return members
