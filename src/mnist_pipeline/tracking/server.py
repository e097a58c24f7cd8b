"""Start a shared MLflow tracking server: runs in PostgreSQL, artifacts proxied by the server.

The project's default store, SQLite beside the code, serves one person on one machine. A
team runs one server and points every machine at it with a single setting,
``MLFLOW_TRACKING_URI=http://host:5000``; nothing else in the project changes. Clients then
never see the database or the artifact store, only the server's REST API, so the artifact
store can move to S3 or another object store (``--artifacts-destination s3://bucket/path``)
without touching a client.

This module checks the database before starting (``mlflow server`` itself would print a
SQLAlchemy traceback) and then becomes ``mlflow server``; ``make server`` and the tests start
it through here, with the same arguments. The settings use MLflow's own variable names.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from mnist_pipeline.core.errors import ConfigError, PipelineError, exit_on_error
from mnist_pipeline.core.project import PROJECT_ROOT, mlflow_command
from mnist_pipeline.tracking.address import redact

DEFAULT_BACKEND = "postgresql://mlflow:mlflow@127.0.0.1:5432/mlflow"
DEFAULT_ARTIFACTS = PROJECT_ROOT / "mlartifacts-server"


def check_backend(
    uri: str, timeout_s: float = 5, setting: str = "MLFLOW_BACKEND_STORE_URI"
) -> None:
    """Fail in seconds, with the reason, when the PostgreSQL store cannot be used (MLflow's
    engine would retry for minutes); a real connection, so a wrong password or database is
    caught too. ``setting`` is the variable the user should fix."""
    scheme = urlsplit(uri).scheme
    if not scheme.startswith("postgresql"):
        return  # MySQL, SQLite, ...: mlflow server reports its own errors
    if scheme not in ("postgresql", "postgresql+psycopg"):
        raise ConfigError(
            f"{scheme}:// needs a driver this project does not install; use postgresql:// "
            "(SQLAlchemy drives it with psycopg 3)"
        )
    try:
        import psycopg  # the optional `server` extra
    except ImportError:
        raise ConfigError(
            "a PostgreSQL store needs psycopg, the project's optional `server` extra: "
            "make server installs it (or uv sync --frozen --inexact --extra server)"
        ) from None

    # libpq does not know SQLAlchemy's driver suffix (postgresql+psycopg://).
    dsn = "postgresql" + uri[len(scheme) :]
    try:
        psycopg.connect(dsn, connect_timeout=max(1, round(timeout_s))).close()
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"PostgreSQL store {redact(uri)} is not usable: {reason}. Start PostgreSQL and "
            "create the role and database (docs/operations.md, 'A shared tracking server on "
            f"PostgreSQL'), or set {setting}"
        ) from None


def artifacts_location(destination: str) -> str:
    """An object-store URI as given; a local folder made absolute and created."""
    if "://" in destination:
        return destination
    folder = Path(destination).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def server_command(
    artifacts_destination: str, host: str = "127.0.0.1", port: int = 5000, workers: int = 2
) -> list[str]:
    """``mlflow server`` with proxied artifacts (``--serve-artifacts``: clients upload and
    download through the server and need no storage credentials).

    The database URI is not an argument: it holds a password, and any user of the machine can
    read a process's arguments. ``mlflow server`` reads it from ``$MLFLOW_BACKEND_STORE_URI``.
    """
    return [
        *mlflow_command(),
        "server",
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other options are passed to `mlflow server` (see `mlflow server --help`).",
    )
    parser.add_argument(
        "--backend-store-uri",
        default=env("MLFLOW_BACKEND_STORE_URI", DEFAULT_BACKEND),
        help="SQLAlchemy URI of the database (default: %(default)s)",
    )
    parser.add_argument(
        "--artifacts-destination",
        default=env("MLFLOW_ARTIFACTS_DESTINATION", str(DEFAULT_ARTIFACTS)),
        help="a shared folder or an object store, e.g. s3://bucket/mlflow (default: %(default)s)",
    )
    parser.add_argument(
        "--host",
        default=env("MLFLOW_HOST", "127.0.0.1"),
        help="interface to bind: 127.0.0.1 (default) is this machine only; 0.0.0.0 shares it",
    )
    parser.add_argument("--port", type=int, default=int(env("MLFLOW_PORT", "5000")))
    parser.add_argument("--workers", type=int, default=int(env("MLFLOW_WORKERS", "2")))
    # Anything else goes to `mlflow server` as is (--allowed-hosts, --gunicorn-opts, ...).
    args, extra = parser.parse_known_args(argv)
    with exit_on_error(expected=(PipelineError, OSError)):
        check_backend(args.backend_store_uri)
        artifacts = artifacts_location(args.artifacts_destination)
        command = server_command(artifacts, args.host, args.port, args.workers) + extra
    os.environ["MLFLOW_BACKEND_STORE_URI"] = args.backend_store_uri
    # 0.0.0.0 is where it listens, not an address to connect to.
    reach = socket.gethostname() if args.host in ("0.0.0.0", "::") else args.host
    print(
        f"MLflow tracking server: http://{reach}:{args.port} "
        f"(runs in {redact(args.backend_store_uri)}, artifacts in {artifacts})\n"
        f"Point the pipeline at it: export MLFLOW_TRACKING_URI=http://{reach}:{args.port}",
        flush=True,
    )
    os.execv(command[0], command)
