"""Against real services, without Docker: MLflow on PostgreSQL, a two-node Ray cluster with token
authentication, and the checks of orchestrator/cluster.py on each bad input the issue names.

The servers are real (tests/services.py): a throwaway PostgreSQL 15, an `mlflow server` on it,
two `ray start` nodes on this machine, each stopped and removed whatever happens.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from services import (
    Postgres,
    RayCluster,
    free_port,
    mlflow_server,
    mount_namespaces_work,
    pg_bin,
    postgres,
    ray_cluster,
)
from tiny_models import TINY_CONFIGS

from orchestrator.cluster import check_address
from workers.errors import ConfigError
from workers.store_check import check_tracking_store

REPO = Path(__file__).resolve().parents[1]
TOKEN = "adaptune-test-token-0123456789abcdef"
FAST_S = 30.0  # the issue: every bad input is a clear message within 30 s


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    if pg_bin("initdb") is None and not os.environ.get("CI"):
        pytest.skip("PostgreSQL 15 is not installed (initdb); CI has it")
    with postgres() as server:
        yield server


@pytest.fixture(scope="module")
def mlflow_url(pg: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # As in docker/compose.yaml: no password in the URI, libpq reads PGPASSWORD.
    artifacts = tmp_path_factory.mktemp("mlflow") / "artifacts"
    with mlflow_server(pg.uri(with_password=False), artifacts, env={"PGPASSWORD": pg.password}) as url:
        yield url


def raises_fast(fn, *args, **kwargs) -> ConfigError:
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    assert time.monotonic() - start < FAST_S
    return info.value


# --- MLflow on PostgreSQL --------------------------------------------------------------------

@pytest.mark.slow
def test_mlflow_on_postgres_keeps_runs_metrics_and_artifacts(pg: Postgres, mlflow_url: str, tmp_path: Path) -> None:
    import psycopg
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_url)
    experiment = client.create_experiment("cluster-smoke")
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    child = client.create_run(experiment, run_name="trial", tags={"mlflow.parentRunId": parent}).info.run_id
    client.log_param(child, "adapter.rank", "8")
    for step, loss in enumerate([2.0, 1.5, 1.25]):
        client.log_metric(child, "train_loss", loss, step=step)
    (tmp_path / "predictions.jsonl").write_text('{"answer": "yes"}\n')
    client.log_artifact(child, str(tmp_path / "predictions.jsonl"), "eval")
    client.set_terminated(child)

    history = [(m.step, m.value) for m in client.get_metric_history(child, "train_loss")]
    assert sorted(history) == [(0, 2.0), (1, 1.5), (2, 1.25)]
    assert client.get_run(child).data.params == {"adapter.rank": "8"}
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert [a.path for a in client.list_artifacts(child, "eval")] == ["eval/predictions.jsonl"]
    downloaded = client.download_artifacts(child, "eval/predictions.jsonl", str(tmp_path / "back"))
    assert Path(downloaded).read_text() == '{"answer": "yes"}\n'
    # The rows are in PostgreSQL, not in some local file the server fell back to.
    with psycopg.connect(pg.uri()) as db:
        rows = db.execute("SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'train_loss' ORDER BY step",
                          (child,)).fetchall()
        status = db.execute("SELECT status FROM runs WHERE run_uuid = %s", (child,)).fetchone()
    assert rows == [(0, 2.0), (1, 1.5), (2, 1.25)] and status == ("FINISHED",)


@pytest.mark.slow
def test_tracking_check_accepts_the_real_server_and_database(pg: Postgres, mlflow_url: str) -> None:
    check_tracking_store(mlflow_url)
    check_tracking_store(pg.uri())


@pytest.mark.slow
def test_a_database_with_the_wrong_password_is_refused_without_echoing_it(pg: Postgres) -> None:
    error = raises_fast(check_tracking_store, pg.uri(password="not-the-password"))
    assert error.field == "tracking.uri" and "rejects the credentials" in error.message
    assert "not-the-password" not in str(error) and "***@127.0.0.1" in str(error)


@pytest.mark.parametrize("scheme", ["http", "postgresql"])
def test_a_tracking_store_that_refuses_connections_fails_fast(scheme: str) -> None:
    uri = f"{scheme}://adaptune:secret@127.0.0.1:{free_port()}/mlflow" if scheme == "postgresql" \
        else f"http://127.0.0.1:{free_port()}"
    error = raises_fast(check_tracking_store, uri)
    assert error.field == "tracking.uri" and "does not answer" in error.message
    assert "secret" not in str(error)


def test_a_server_that_is_not_mlflow_is_named_as_such(tmp_path: Path) -> None:
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port := free_port())],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        error = raises_fast(check_tracking_store, f"http://127.0.0.1:{port}")
        assert "answered 404" in error.message and "MLflow tracking server" in error.message
    finally:
        server.kill()
        server.wait()


# --- Ray addresses -----------------------------------------------------------------------------

def test_a_ray_address_that_refuses_connections_fails_fast() -> None:
    error = raises_fast(check_address, f"127.0.0.1:{free_port()}")
    assert error.field == "--address" and "does not answer" in error.message


@pytest.mark.slow
def test_a_listener_that_is_not_ray_fails_fast_instead_of_hanging() -> None:
    # ray.init on such a port waits for minutes; the check gives up after its timeout.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        error = raises_fast(check_address, address, timeout_s=10)
    assert "not a Ray cluster's GCS port" in error.message


@pytest.mark.parametrize("address", ["10.0.0.1", "ray://:10001", "head:port"])
def test_a_malformed_ray_address_is_named(address: str) -> None:
    error = raises_fast(check_address, address)
    assert "HOST:PORT" in error.message


@pytest.mark.parametrize("address", [None, "auto", "local"])
def test_local_addresses_are_left_to_ray(address: str | None) -> None:
    check_address(address)


# --- a two-node cluster ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hidden(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """A folder that node_b cannot see, or None where mount namespaces are not allowed."""
    return tmp_path_factory.mktemp("hidden-on-node-b") if mount_namespaces_work() else None


@pytest.fixture(scope="module")
def cluster(hidden: Path | None) -> Iterator[RayCluster]:
    # One CPU per node and one per trial: two concurrent trials must use both nodes.
    with ray_cluster(TOKEN, cpus_per_node=1, dashboard=True, hide=hidden) as running:
        yield running


def driver(cluster: RayCluster, code: str, timeout_s: float = 120) -> dict:
    """Run `code` in a fresh process connected to `cluster`; it sets `result` (JSON) or raises ConfigError."""
    script = (
        "import json, ray\nfrom workers.errors import ConfigError\n"
        f"ray.init(address={cluster.address!r}, logging_level='ERROR')\n"
        f"try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) +
        "    print(json.dumps({'ok': True}))\n"
        "except ConfigError as exc:\n    print(json.dumps({'field': exc.field, 'message': exc.message}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, **cluster.env}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_cluster_refuses_a_wrong_token(cluster: RayCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    check_address(cluster.address)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "someone-elses-token-0123456789abcdef")
    error = raises_fast(check_address, cluster.address)
    assert "refused this process's token" in error.message and "RAY_AUTH_TOKEN" in error.message
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("HOME", str(Path(cluster.temp_dirs["node_a"])))  # no ~/.ray/auth_token either
    assert "refused this process's token" in raises_fast(check_address, cluster.address).message


@pytest.mark.slow
def test_every_node_sees_the_shared_storage_and_the_tracking_store(cluster: RayCluster, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    result = driver(cluster, f"from orchestrator.tune_driver import check_nodes\n"
                             f"check_nodes({str(storage)!r}, 'sqlite:///{tmp_path}/mlflow.db')")
    assert result == {"ok": True}
    assert storage.is_dir() and list(storage.iterdir()) == []  # created, and the marker removed


@pytest.mark.slow
def test_a_tracking_store_unreachable_from_the_nodes_is_named(cluster: RayCluster, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    result = driver(cluster, f"from orchestrator.tune_driver import check_nodes\n"
                             f"check_nodes({str(tmp_path / 'runs')!r}, {uri!r})")
    assert result["field"] == "tracking.uri"
    assert result["message"].count("does not answer") == 2  # from node_a and from node_b


@pytest.mark.slow
def test_a_storage_folder_missing_on_a_worker_is_named(cluster: RayCluster, hidden: Path | None) -> None:
    if hidden is None:
        pytest.skip("no mount namespaces here: node_b cannot be given a disk of its own")
    start = time.monotonic()
    result = driver(cluster, f"from orchestrator.tune_driver import check_nodes\n"
                             f"check_nodes({str(hidden / 'runs')!r}, 'sqlite:///{hidden}/mlflow.db')")
    assert time.monotonic() - start < FAST_S
    assert result["field"] == "storage"
    # node_a (the head, where the driver is) sees the folder; node_b sees an empty disk there.
    assert result["message"].count("node ") == 1 and str(hidden / "runs") in result["message"]


# --- sweeps on the cluster -----------------------------------------------------------------------

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaMA and a small training set, on the disk every node shares."""
    root = tmp_path_factory.mktemp("sweep")
    config = TINY_CONFIGS["llama"]
    config.save_pretrained(root / "llama")
    records = [{"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}"} for _ in range(16) for w in WORDS]
    (root / "train.json").write_text(json.dumps(records))
    return root


def write_sweep(folder: Path, workdir: Path, name: str, tracking_uri: str, space: list[dict]) -> Path:
    sweep = {
        "name": name,
        "base": {"model": str(workdir / "llama"), "random_init": True, "tokenizer": "byte",
                 "data": {"train": str(workdir / "train.json"), "template": "alpaca", "cutoff_len": 64,
                          "val_set_size": 8}},
        "train": {"epochs": 8, "micro_batch_size": 4, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1,
                  "log_every": 10, "eval_every": 40, "save_every": 40},
        "seed": 0,
        "space": space,
        "resources": {"gpus_per_trial": 0, "workers_per_trial": 1, "cpus_per_worker": 1},
        "tracking": {"uri": tracking_uri},
        "storage": str(workdir / "shared" / "runs"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def sweep_runs(tracking_uri: str, experiment: str) -> tuple[object, list]:
    """The parent run and its child runs, all of them finished."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    return client, children


@pytest.mark.slow
def test_a_sweep_runs_on_both_nodes_against_mlflow_on_postgres(cluster: RayCluster, mlflow_url: str,
                                                               workdir: Path, tmp_path: Path) -> None:
    space = [{"type": "lora", "placement": [["q", "v"], ["up", "down"]], "rank": 4},
             {"type": "series", "placement": [["mlp"], ["attn"]], "bottleneck": 8}]
    # Credentials in the tracking URI (this server ignores them) must not reach MLflow's records.
    secret = "pw-in-the-uri-5d41402a"
    sweep = write_sweep(tmp_path, workdir, "two-nodes", mlflow_url.replace("://", f"://adaptune:{secret}@"), space)
    done = subprocess.run([str(Path(sys.executable).parent / "adaptune"), "run", str(sweep),
                           "--address", cluster.address], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **cluster.env}, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    client, children = sweep_runs(mlflow_url, "two-nodes")
    assert len({r.info.run_name for r in children}) == len(children) == 4
    for run in children:
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(10, 121, 10))  # 120 examples, batch 8, 8 epochs
        assert run.data.params["adapter.type"] in ("lora", "series")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"adapter", "summary.json"} <= artifacts
        assert client.list_artifacts(run.info.run_id, "adapter")
    for run in [*children, client.get_run(children[0].data.tags["mlflow.parentRunId"])]:
        assert secret not in json.dumps([run.data.params, run.data.tags]), run.info.run_name
        folder = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts" / run.info.run_id)))
        for path in folder.rglob("*"):
            assert not path.is_file() or secret.encode() not in path.read_bytes(), path
    # Each node logs its Ray workers in its own folder: the trials' pids say where they ran. (Tune reuses
    # a trial's actor for the next trial: trials of a few seconds would all go to the actor that was
    # ready first; these take ~8 s, longer than an actor's start.)
    results = list((workdir / "shared" / "runs" / "two-nodes").glob("*/result.json"))
    pids = {json.loads(line)["pid"] for path in results for line in path.read_text().splitlines() if line}
    assert len(results) == 4
    assert {cluster.node_of_pid(pid) for pid in pids} == {"node_a", "node_b"}


@pytest.mark.slow
def test_a_sweep_submitted_as_a_ray_job(cluster: RayCluster, mlflow_url: str, workdir: Path, tmp_path: Path) -> None:
    space = [{"type": "lora", "placement": [["q", "v"]], "rank": [2, 4]}]
    sweep = write_sweep(tmp_path / "job", workdir, "as-a-job", mlflow_url, space)
    # The job's driver runs on the head and finds the cluster by itself (RAY_ADDRESS from the job).
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard,
              "--working-dir", str(sweep.parent), "--", "adaptune", "run", "sweep.yaml"]
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run(submit, capture_output=True, text=True, timeout=600, env={**os.environ, **cluster.env},
                              check=False)
        # A fresh head answers before its job agent has registered: Ray says so, and to try again.
        if "No available agent" not in done.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0 and "succeeded" in done.stdout + done.stderr, done.stdout[-4000:] + done.stderr[-3000:]
    _, children = sweep_runs(mlflow_url, "as-a-job")
    assert len(children) == 2


@pytest.mark.slow
def test_adaptune_run_on_a_silent_address_stops_with_one_line(workdir: Path, tmp_path: Path) -> None:
    space = [{"type": "lora", "placement": [["q", "v"]], "rank": 4}]
    sweep = write_sweep(tmp_path, workdir, "silent", f"sqlite:///{tmp_path}/mlflow.db", space)
    start = time.monotonic()
    done = subprocess.run([str(Path(sys.executable).parent / "adaptune"), "run", str(sweep), "--address",
                           f"127.0.0.1:{free_port()}"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)
    assert time.monotonic() - start < FAST_S
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and "--address" in line and "does not answer" in line
