"""Real servers for integration tests: a throwaway PostgreSQL cluster and an MLflow server.

Both run on loopback from the machine's own binaries (Debian's ``postgresql`` package, the
project's full ``mlflow``, .venv-mlflow), live in a temporary folder and are stopped by ``close()``.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from mnist_pipeline.core.errors import PipelineError
from mnist_pipeline.core.project import full_mlflow
from mnist_pipeline.tracking.server import server_command


def require_extra(module: str, extra: str) -> ModuleType:
    """An optional dependency (a project extra), or a skip; a failure in CI, which installs
    every extra (``make test``) and sets ``MNIST_REQUIRE_SERVICES``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(f"{module} is not installed: the optional `{extra}` extra (make test has it)")


def require_full_mlflow() -> list[str]:
    """The full ``mlflow`` command (.venv-mlflow, for ``mlflow server``), or a skip; a failure
    in CI, where ``make test`` builds it."""
    try:
        return full_mlflow()
    except PipelineError as exc:
        missing(str(exc))


def missing(message: str) -> NoReturn:
    """Skip a test whose optional piece is not installed; fail it where all must be."""
    if os.environ.get("MNIST_REQUIRE_SERVICES"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bindir() -> Path:
    """Debian installs the server outside PATH, under /usr/lib/postgresql/<major>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        message = "PostgreSQL server binaries not found (Debian: apt-get install postgresql)"
        if os.environ.get("MNIST_REQUIRE_SERVICES"):
            pytest.fail(message)  # .ci/run installs them: a skip would hide a broken setup
        pytest.skip(message)
    return Path(initdb).parent


class Postgres:
    """A private PostgreSQL cluster with password login, on a free loopback port.

    PostgreSQL refuses to run as root; as root, its commands run as the ``postgres`` user
    that the Debian package creates."""

    user, password, database = "mlflow", "s3cret-for-tests", "mlflow"

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.folder = Path(tempfile.mkdtemp(prefix="pg-"))  # not pytest's tmp: mode 0700
        self.port = free_port()
        self.as_owner: list[str] = []
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        password_file = self.folder / "password"
        password_file.write_text(self.password)
        if self.as_owner:
            shutil.chown(password_file, "postgres")
        self._run(
            "initdb",
            "-D",
            self.folder / "data",
            f"--username={self.user}",
            f"--pwfile={password_file}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
        )
        self._run(
            "pg_ctl",
            "-D",
            self.folder / "data",
            "-l",
            self.folder / "server.log",
            "-o",
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1",
            "-w",
            "start",
        )
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {self.database}")

    def _run(self, tool: str, *args: object) -> None:
        command = [*self.as_owner, str(self.bindir / tool), *map(str, args)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}")

    def dsn(self, database: str | None = None) -> str:
        return (
            f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/"
            f"{database or self.database}"
        )

    def close(self) -> None:
        """Stop the server if it runs, and remove its folder."""
        try:
            if (self.folder / "data" / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", self.folder / "data", "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` as ``make server`` starts it: a database backend, proxied artifacts."""

    def __init__(self, backend_store_uri: str, artifacts: Path, log: Path) -> None:
        require_full_mlflow()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = server_command(str(artifacts), port=self.port, workers=1)
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend_store_uri}
        with log.open("w") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            self._wait_until_up(timeout_s=120)
        except BaseException:
            self.close()
            raise

    def _wait_until_up(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server not up in {timeout_s} s:\n{self.log.read_text()}")

    def close(self) -> None:
        """Stop the server and its uvicorn workers: the whole process group, even when the
        leader has already exited, with SIGKILL for what outlives SIGTERM by 30 s."""
        group = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _group_alive(group) and time.monotonic() < deadline:
            self.process.poll()  # reap the leader
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.process.wait()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
