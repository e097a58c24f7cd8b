"""Real servers for integration tests: a throwaway PostgreSQL cluster and an MLflow server.

Both run on loopback from the machine's own binaries (Debian's ``postgresql`` package, the
project's ``mlflow``), live in a temporary folder and are stopped by ``close()``.
"""

from __future__ import annotations

import glob
import importlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from mnist_pipeline.core.supervised import Server, ServerExited, free_port
from mnist_pipeline.tracking.server import server_command


def require_extra(module: str, extra: str) -> ModuleType:
    """An optional dependency (a project extra), or a skip; a failure in CI, which installs
    every extra (``make test``) and sets ``MNIST_REQUIRE_SERVICES``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(f"{module} is not installed: the optional `{extra}` extra (make test has it)")


def missing(message: str) -> NoReturn:
    """Skip a test whose optional piece is not installed; fail it where all must be."""
    if os.environ.get("MNIST_REQUIRE_SERVICES"):
        pytest.fail(message)
    pytest.skip(message)


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
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = server_command(str(artifacts), port=self.port, workers=1)
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend_store_uri}
        self.server = started(command, self.url + "/health", env, log, timeout_s=120)
        self.process = self.server.process

    def close(self) -> None:
        self.server.stop(grace_s=30)


def started(command: list[str], health_url: str, env: dict, log: Path, timeout_s: float) -> Server:
    """A supervised server logging to ``log``, once it answers; its log in the error if not."""
    with log.open("w") as out:
        server = Server(command, health_url, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        server.wait_until_up(timeout_s)
    except (ServerExited, TimeoutError) as exc:
        server.stop()
        raise RuntimeError(f"{command[0]}: {exc}:\n{log.read_text()[-3000:]}") from None
    except BaseException:
        server.stop()
        raise
    return server
