"""Real servers for integration tests: a throwaway PostgreSQL cluster and an MLflow server.

Both run on loopback from the machine's own binaries (Debian's ``postgresql`` package, the
project's ``mlflow``), live in a temporary folder and are stopped by ``close()``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from mnist_pipeline.tracking_server import server_command


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
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def dsn(self, database: str | None = None) -> str:
        return (
            f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/"
            f"{database or self.database}"
        )

    def close(self) -> None:
        try:
            self._run("pg_ctl", "-D", self.folder / "data", "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` as ``make server`` starts it: a database backend, proxied artifacts."""

    def __init__(self, backend_store_uri: str, artifacts: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = server_command(backend_store_uri, str(artifacts), port=self.port, workers=1)
        with log.open("w") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_until_up(timeout_s=120)

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
                time.sleep(0.5)
        self.close()
        raise RuntimeError(f"mlflow server not up in {timeout_s} s:\n{self.log.read_text()}")

    def close(self) -> None:
        """Stop the server and its workers (one process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
