"""The one check of a tracking store (`workers.store_check`): SQLite, file stores and MLflow servers.

Databases (PostgreSQL) and a real MLflow server are checked in tests/test_cluster.py.
"""

from __future__ import annotations

import base64
import http.server
import sqlite3
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import free_port

from workers.errors import ConfigError
from workers.store_check import check_tracking_store, tls_context

SEARCH = "/api/2.0/mlflow/experiments/search"


def test_a_sqlite_uri_in_a_missing_folder_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        check_tracking_store(f"sqlite:///{tmp_path}/missing/ml.db")
    assert err.value.field == "tracking.uri" and "does not exist" in err.value.message
    with pytest.raises(ConfigError, match="not a writable file"):
        check_tracking_store(f"sqlite:///{tmp_path}")  # a folder where the database should be
    check_tracking_store(f"sqlite:///{tmp_path}/ml.db")


def test_an_existing_sqlite_file_must_be_mlflows(tmp_path: Path) -> None:
    (tmp_path / "text.db").write_text("not a database at all")
    with pytest.raises(ConfigError, match="is not an SQLite database"):
        check_tracking_store(f"sqlite:///{tmp_path}/text.db")
    with sqlite3.connect(tmp_path / "other.db") as con:
        con.execute("CREATE TABLE things (x)")
    with pytest.raises(ConfigError, match="not an MLflow store"):
        check_tracking_store(f"sqlite:///{tmp_path}/other.db")


def test_a_file_store_under_a_file_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="not a writable folder"):
        check_tracking_store(str(blocker / "mlruns"))
    check_tracking_store((tmp_path / "new" / "mlruns").as_uri())


def test_a_server_that_does_not_answer_fails_fast() -> None:
    with pytest.raises(ConfigError) as err:
        check_tracking_store(f"http://127.0.0.1:{free_port()}")
    assert err.value.field == "tracking.uri" and "does not answer" in err.value.message


@pytest.fixture
def server() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A stand-in MLflow server: 200 on the experiments search for alice:secret, 401 for other
    credentials, 404 elsewhere; its address, and the path and headers of every request it saw."""
    seen: list[dict[str, str]] = []
    good = "Basic " + base64.b64encode(b"alice:secret").decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, **self.headers})
            if not self.path.startswith(SEARCH):
                code = 404
            else:
                code = 200 if self.headers.get("Authorization") == good else 401
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b'{"experiments": []}')

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_server_gets_the_credentials_mlflow_would_send(server, monkeypatch: pytest.MonkeyPatch) -> None:
    address, seen = server
    check_tracking_store(f"http://alice:secret@{address}")  # the URL's user:password, as Basic auth
    assert seen[-1]["path"] == f"{SEARCH}?max_results=1"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    check_tracking_store(f"http://{address}/")
    assert len(seen) == 2


def test_refused_credentials_are_named_without_echoing_them(server, monkeypatch: pytest.MonkeyPatch) -> None:
    address, _ = server
    with pytest.raises(ConfigError) as err:
        check_tracking_store(f"http://alice:wrong-password@{address}")
    assert "rejects the credentials" in err.value.message and "wrong-password" not in str(err.value)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "a-token")
    with pytest.raises(ConfigError, match="rejects the credentials"):
        check_tracking_store(f"http://{address}")


def test_a_server_that_is_not_mlflow_is_named_as_such(server) -> None:
    address, _ = server
    with pytest.raises(ConfigError, match=r"answered 404 .* MLflow tracking server"):
        check_tracking_store(f"http://{address}/not-mlflow")


def test_tls_is_set_up_as_mlflows_client_does(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tls_context().verify_mode == ssl.CERT_REQUIRED
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    context = tls_context()
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname
