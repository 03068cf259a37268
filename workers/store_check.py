"""Can the tracking store take a run? One check for the driver, a trial's own command and every node.

It turns a misconfigured store into one `ConfigError` naming the field, within seconds, before a
model loads or Ray starts: an MLflow server (http, https) gets one authenticated API call, a
database one connection, an SQLite file its folder's permissions and a look at its tables, a file
store its folder's permissions. Standard library only, but SQLAlchemy for databases (imported when
one is named): the driver checks the store without importing MLflow.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import sqlite3
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from workers.errors import ConfigError
from workers.redaction import redact_value

DATABASE_SCHEMES = frozenset({"postgresql", "mysql", "mssql"})
FIELD = "tracking.uri"
# The tables every MLflow SQL store has: an existing SQLite file without them is something else.
MLFLOW_TABLES = frozenset({"alembic_version", "experiments", "runs"})


def scheme(uri: str) -> str:
    """The URI's scheme without its driver (`postgresql+psycopg` -> `postgresql`); "" for a plain path."""
    return urlsplit(uri).scheme.split("+", 1)[0].lower()


def check_tracking_store(uri: str, timeout_s: float = 10.0) -> None:
    """The tracking store at `uri` answers and accepts this process's credentials; a `ConfigError` on
    the field `tracking.uri` when not. Schemes it does not know (databricks, ...) pass."""
    kind = scheme(uri)
    if kind in ("http", "https"):
        _check_server(uri, timeout_s)
    elif kind in DATABASE_SCHEMES:
        _check_database(uri, timeout_s)
    elif kind == "sqlite":
        _check_sqlite(uri)
    elif kind in ("", "file"):
        path = Path(urlsplit(uri).path if kind == "file" else uri).expanduser().resolve()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not _writable_folder(existing):
            raise ConfigError(None, FIELD, f"{uri}: {existing} is not a writable folder")


def _writable_folder(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def _check_sqlite(uri: str) -> None:
    """The database's folder is writable and an existing database is MLflow's (read-only look)."""
    db = Path(uri.split("sqlite:///", 1)[-1]).expanduser()
    folder = db.parent.resolve()
    if not _writable_folder(folder):
        raise ConfigError(None, FIELD, f"{uri}: the folder {folder} does not exist or is not writable")
    if db.exists() and not (db.is_file() and os.access(db, os.W_OK)):
        raise ConfigError(None, FIELD, f"{uri}: the database is not a writable file")
    if not db.is_file() or db.stat().st_size == 0:
        return
    with db.open("rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise ConfigError(None, FIELD, f"{uri}: {db} is not an SQLite database")
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise ConfigError(None, FIELD, f"{uri}: {db} cannot be read as a database: {exc}") from None
    if tables and not MLFLOW_TABLES.issubset(tables):
        raise ConfigError(None, FIELD, f"{uri}: {db} is an SQLite database but not an MLflow store")


def _server_request(uri: str) -> urllib.request.Request:
    """MLflow's cheapest authenticated read, with the credentials MLflow's client would send: the URL's
    user:password, else MLFLOW_TRACKING_USERNAME/PASSWORD, else MLFLOW_TRACKING_TOKEN."""
    parts = urlsplit(uri.rstrip("/"))
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 address
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    url = urlunsplit((parts.scheme, netloc, f"{parts.path}/api/2.0/mlflow/experiments/search", "max_results=1", ""))
    user = parts.username or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = parts.password or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    headers = {}
    if user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    elif token:
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.Request(url, headers=headers)


def tls_context() -> ssl.SSLContext:
    """TLS as MLflow's client sets it up: MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH
    (a CA bundle) and MLFLOW_TRACKING_CLIENT_CERT_PATH (a client certificate with its key)."""
    context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client := os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"):
        context.load_cert_chain(client)
    return context


def _check_server(uri: str, timeout_s: float) -> None:
    shown = redact_value(uri)
    context = tls_context() if scheme(uri) == "https" else None
    try:
        with urllib.request.urlopen(_server_request(uri), timeout=timeout_s, context=context) as response:
            status, body = response.status, ""
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(4096).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            raise ConfigError(None, FIELD, f"{shown} did not answer within {timeout_s:.0f} s") from None
        detail = getattr(reason, "strerror", None) or type(reason).__name__
        raise ConfigError(None, FIELD, f"{shown} does not answer ({detail})") from None
    if status == 401:
        raise ConfigError(None, FIELD, f"{shown} rejects the credentials: set MLFLOW_TRACKING_USERNAME and "
                                       f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    if status == 403 and "Host header" in body:
        raise ConfigError(None, FIELD, f"{shown} refuses the host name {urlsplit(uri).hostname}: add it to the "
                                       f"server's --allowed-hosts")
    if status == 403:
        raise ConfigError(None, FIELD, f"{shown} forbids this user to read experiments")
    if status != 200:
        raise ConfigError(None, FIELD, f"{shown} answered {status} to an MLflow API call: is it an MLflow "
                                       f"tracking server?")


def _check_database(uri: str, timeout_s: float) -> None:
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    shown = redact_value(uri)
    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": max(1, int(timeout_s))})
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise ConfigError(None, FIELD, f"{shown}: cannot use this database URI ({exc}); the PostgreSQL driver "
                                       f"comes with `pip install 'adaptune[cluster]'`") from None
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except OperationalError as exc:
        detail = str(exc.orig or exc).strip().splitlines()[0]
        if re.search(r"password authentication failed|access denied|authentication failed", detail, re.I):
            raise ConfigError(None, FIELD, f"{shown} rejects the credentials: {detail}") from None
        raise ConfigError(None, FIELD, f"{shown} does not answer: {detail}") from None
    finally:
        engine.dispose()
