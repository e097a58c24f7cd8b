"""Issue 14, class 3: odd tracking-store addresses are used as meant or refused in seconds,
through the real stage command; the project's own store works under any folder name."""

from __future__ import annotations

import base64
import http.server
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mnist_pipeline import tracking
from mnist_pipeline.core.errors import ConfigError
from mnist_pipeline.core.supervised import free_port
from mnist_pipeline.tracking import address
from tests.helpers.config import sha_overrides
from tests.helpers.services import require_extra
from tools.workspace import copy_project


def download(cwd: Path, uri: str | None, mirror, pythonpath: Path | None = None):
    """The download stage as a user runs it; returns (the process, its seconds)."""
    folder, sha = mirror
    env = {**os.environ, "MNIST_MIRROR": str(folder)}
    env.pop("MLFLOW_TRACKING_URI", None)
    if uri is not None:
        env["MLFLOW_TRACKING_URI"] = uri
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.download", *sha_overrides(sha)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    ("raw", "meant"),
    [
        ("  sqlite:////srv/m/mlflow.db\n", "sqlite:////srv/m/mlflow.db"),
        ("SQLite:////srv/m/mlflow.db", "sqlite:////srv/m/mlflow.db"),
        ("HTTP://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("\tHttps://mlflow.example.org ", "https://mlflow.example.org"),
        ("PostgreSQL://u@db:5432/mlflow", "postgresql://u@db:5432/mlflow"),
    ],
)
def test_addresses_are_read_as_meant(monkeypatch, raw, meant):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", raw)
    assert tracking.tracking_uri() == meant


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        (" SQLITE:// ", "in-memory"),
        ("sqlite:///file:x?mode=memory&cache=shared&uri=true", "in-memory"),
        ("mysql://u:pw@127.0.0.1/mlflow", "is a MySQL database, which this project does not"),
        ("databricks", "is a Databricks workspace"),
        ("Databricks-UC", "is Databricks Unity Catalog"),
        ("databricks://profile", "is a Databricks workspace"),
        ("mssql+pyodbc://u@h/db", "is a SQL Server database"),
        ("mlflow-artifacts:/0/runs", "artifact location"),
        ("s3://bucket/mlruns", "artifact location"),
        ("gopher://h/x", "gopher: is not a tracking store scheme"),
        ("FILE:///tmp/mlruns", "file store"),
        ("http://", "names no host"),
        ("postgresql://u@127.0.0.1:5432", "names no database"),
    ],
)
def test_unusable_addresses_are_refused_with_the_reason(monkeypatch, uri, reason):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ConfigError, match=reason):
        tracking.tracking_uri()


@pytest.mark.parametrize("uri", ["mysql://user:hunter2@db/mlflow", "sqlite://u:hunter2@/"])
def test_passwords_stay_out_of_messages(monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ConfigError) as info:
        tracking.tracking_uri()
    assert "hunter2" not in str(info.value) and ":***@" in str(info.value)


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("sqlite://", "in-memory SQLite store"),
        ("sqlite:///:memory:", "in-memory SQLite store"),
        ("HTTP://127.0.0.1:{port}", "is not reachable"),
        ("postgresql://mlflow:pw@127.0.0.1:{port}/mlflow", "is not usable"),
        # a server that never answers (a loopback socket that accepts nothing): the connect
        # timeout, not minutes of retries
        ("postgresql://mlflow:pw@127.0.0.1:{silent}/mlflow", "is not usable"),
        ("mysql://u@127.0.0.1:{port}/mlflow", "is a MySQL database"),
    ],
)
def test_the_stage_refuses_in_seconds_and_writes_nothing(
    tmp_path, tiny_mirror, silent_port, uri, reason
):
    """Through the real command: one line, exit 1, seconds, no data and no ./mlruns."""
    if uri.startswith("postgresql"):
        require_extra("psycopg", "server")
    uri = uri.format(port=free_port(), silent=silent_port)
    result, seconds = download(tmp_path, uri, tiny_mirror)
    assert result.returncode == 1, result.stderr
    assert seconds < 60  # seconds on a busy machine, not minutes of retries
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and reason in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert "pw@" not in result.stderr
    assert set(os.listdir(tmp_path)) <= {"outputs"}  # Hydra's log folder at most


class _LoginServer(http.server.BaseHTTPRequestHandler):
    """A tracking server with logins, as far as ``check_store`` asks: /health for anyone,
    the API for user ``pipeline`` with password ``right`` (403 for a token without rights)."""

    def do_GET(self) -> None:
        header = self.headers.get("Authorization")
        if (
            self.path == "/health"
            or header == "Basic " + base64.b64encode(b"pipeline:right").decode()
        ):
            code = 200
        else:
            code = 403 if header == "Bearer read-only" else 401
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("credentials", "refusal"),
    [
        ({}, "refused a client without credentials (401 Unauthorized): it needs "),
        ({"USERNAME": "pipeline", "PASSWORD": "wrong"}, "refused user 'pipeline' (401"),
        (
            {"TOKEN": "read-only"},
            "refused MLFLOW_TRACKING_TOKEN (403 Forbidden): no permission there",
        ),
        ({"USERNAME": "pipeline", "PASSWORD": "right"}, None),
    ],
)
def test_a_server_with_logins_refuses_wrong_credentials_before_any_work(
    monkeypatch, credentials, refusal
):
    """One line that says what to set, not MLflow's traceback from the middle of a stage
    (the real basic-auth server: tests/test_cluster.py); the password never in it."""
    for name in ("USERNAME", "PASSWORD", "TOKEN"):
        monkeypatch.delenv(f"MLFLOW_TRACKING_{name}", raising=False)
    for name, value in credentials.items():
        monkeypatch.setenv(f"MLFLOW_TRACKING_{name}", value)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LoginServer)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        if refusal is None:
            tracking.check_store(uri)
            return
        with pytest.raises(ConfigError, match=re.escape(refusal)) as info:
            tracking.check_store(uri)
        assert "wrong" not in str(info.value)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_port():
    """A loopback port whose listener never accepts and never speaks: a client's connect
    waits there until its own timeout, as with a host that drops every packet, without
    sending anything off this machine."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("name", ["we%ird 50%25 done", "why? #1", "a&b=c;d #x?y=z%"])
def test_the_default_store_works_under_any_folder_name(tmp_path, tiny_mirror, name):
    """The default store is built from the project folder: URL-special characters in that
    name must not move it, split it or leave stray folders beside it."""
    project = copy_project(tmp_path / name, commit=False)
    result, _ = download(project, None, tiny_mirror, pythonpath=project / "src")
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(tmp_path) == [name]  # nothing made beside the project
    database = project / "mlflow.db"
    with sqlite3.connect(database) as con:
        (runs,) = con.execute("select count(*) from runs where status = 'FINISHED'").fetchone()
        (location,) = con.execute("select artifact_uri from runs").fetchone()
    assert runs == 1
    assert location.startswith((project / "mlartifacts").as_uri())
    assert len(list((project / "mlartifacts").rglob("download.json"))) == 1
    assert address.sqlite_path(address.sqlite_uri(database)) == database
