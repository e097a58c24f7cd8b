"""Where the MLflow store is, and whether it can be used: the URI as the user meant it (or
refused), a SQLite store checked before any work (corrupt, read-only, locked, from another
MLflow), a server or database that answers, the experiment with its artifacts beside the
database, followed when the project moves. The one way in to MLflow's module for the rest of
the project is ``configured_mlflow``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import logging
import os
import sqlite3
import tempfile
import urllib.error
import urllib.request
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnist_pipeline.core import diagnosis
from mnist_pipeline.core.errors import DEBUG_ENV, ConfigError
from mnist_pipeline.core.project import project_root
from mnist_pipeline.tracking import address, mlflow_compat
from mnist_pipeline.tracking.server import check_backend

if TYPE_CHECKING:
    import mlflow

log = logging.getLogger(__name__)


def default_tracking_uri() -> str:
    """An absolute SQLite URI (relative ones silently split runs across working directories),
    escaped so that any folder name reads back as itself."""
    return address.sqlite_uri(project_root() / "mlflow.db")


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set (as the user meant it, or refused with the reason:
    ``address.normalise``), else the project's own SQLite store."""
    raw = os.environ.get("MLFLOW_TRACKING_URI", "")
    return address.normalise(raw) if raw.strip() else default_tracking_uri()


def store_lock(purpose: str, uri: str | None = None) -> Path:
    """The file whose lock serialises one kind of write to a store (``core.locks``; by
    default the MLflow store, or the database ``uri``, an Optuna storage say): beside a
    SQLite database, so every process using that file shares it; for a server or PostgreSQL,
    one per address on this machine (processes on other machines are not serialised)."""
    uri = uri or tracking_uri()
    database = address.sqlite_path(uri)
    if database is not None:
        return database.with_name(f"{database.name}.{purpose}.lock")
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mnist-pipeline-{key}.{purpose}.lock"


def artifact_folder(uri: str | None = None) -> Path | None:
    """Where runs' files go on a SQLite store (``uri``, by default the stages' store):
    ``mlartifacts/`` beside the database (``ensure_experiment``). None for a server or
    PostgreSQL: their artifacts are not on this machine's disks."""
    database = address.sqlite_path(uri or tracking_uri())
    return None if database is None else database.parent / "mlartifacts"


def store_label() -> str:
    """The store, named for messages (without a password)."""
    try:
        return f"the MLflow store {address.redact(tracking_uri())}"
    except ConfigError:
        return "the MLflow store"


def require_existing_store() -> None:
    """For commands that only read runs: a SQLite store that does not exist is an error, not
    something to create (MLflow would make its folders and an empty database)."""
    database = address.sqlite_path(tracking_uri())
    if database is not None and not database.is_file():
        raise ConfigError(
            f"no MLflow store at {database}: nothing has been logged there; run the pipeline "
            "first, or set MLFLOW_TRACKING_URI to the store you mean"
        )


@cache  # once per process and store: a store that answered is not asked again
def check_store(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, before any expensive work, when the store cannot be used: a tracking
    server or PostgreSQL that does not answer (MLflow's own client would retry for minutes)."""
    database = address.sqlite_path(uri)
    if database is not None:
        check_sqlite_store(database)
        return
    if uri.startswith(address.POSTGRES_SCHEMES):
        check_backend(uri, timeout_s, setting="MLFLOW_TRACKING_URI")
        return
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError:
        pass  # it answered (an authenticating proxy may say 401): reachable
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"MLflow tracking server {uri} is not reachable ({reason}); start it, or unset "
            "MLFLOW_TRACKING_URI to use the project's own store"
        ) from None
    check_credentials(uri, timeout_s)


def check_credentials(uri: str, timeout_s: float) -> None:
    """A server with authentication (``mlflow server --app-name basic-auth``, or a proxy)
    refuses a client without credentials, or with wrong ones, on its first request: said here
    in one line, before any work, instead of MLflow's traceback from the middle of a stage.
    The credentials are MLflow's own variables (``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD``, or ``MLFLOW_TRACKING_TOKEN``), sent as MLflow sends them."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    request = urllib.request.Request(
        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    )
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):
            return  # not about who is asking: the stage's own request will say
        who = f"user {user!r}" if user and password else "MLFLOW_TRACKING_TOKEN" if token else None
        if exc.code == 403:
            advice = "no permission there; ask the server's admin for one"
        elif who:
            advice = "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        else:
            advice = "it needs MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        raise ConfigError(
            f"MLflow tracking server {uri} refused {who or 'a client without credentials'} "
            f"({exc.code} {exc.reason}): {advice}"
        ) from None
    except (OSError, ValueError):
        return  # answered /health a moment ago: the stage's own request will say


def check_sqlite_store(database: Path) -> None:
    """Before any work: a SQLite store that exists must open, be a database and take a write
    lock within ``faults.LOCK_WAIT_S``. Finds a corrupt file, a read-only disk and another
    process holding the database (a notebook in a transaction, even a read) in seconds, where
    MLflow would fail late or retry for half a minute."""
    if not database.exists():
        return  # MLflow creates it
    store = f"the MLflow store {database}"
    # SQLite opens a file it cannot write read-only and fails only at the first write;
    # access() reports a read-only mount even to root.
    if not (os.access(database, os.W_OK) and os.access(database.parent, os.W_OK)):
        raise ConfigError(
            diagnosis.describe_one(sqlite3.OperationalError("readonly database"), store)
        )
    try:
        con = sqlite3.connect(database, timeout=diagnosis.LOCK_WAIT_S, isolation_level=None)
        try:
            tables = {row[0] for row in con.execute("select name from sqlite_master")}
            con.execute("begin exclusive")  # readers block a commit too: wait them out
            con.execute("rollback")
            revision = None
            if "alembic_version" in tables:
                revision = con.execute("select version_num from alembic_version").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise ConfigError(diagnosis.describe_one(exc, store) or f"{store}: {exc}") from None
    known = _schema_revisions()
    if revision and known and revision[0] not in known:
        raise ConfigError(
            f"{store} was made by a newer MLflow than this one (schema revision {revision[0]} "
            "is unknown here): use that MLflow version (uv sync at a newer commit) or another "
            "store"
        )


def _schema_revisions() -> set[str]:
    """The database schema revisions this MLflow knows (its migration scripts are named
    ``<revision>_<what>.py``), read without importing MLflow; empty if they cannot be found."""
    spec = importlib.util.find_spec("mlflow")
    if spec is None or not spec.submodule_search_locations:
        return set()
    folder = Path(spec.submodule_search_locations[0]) / "store" / "db_migrations" / "versions"
    return {p.name.split("_", 1)[0] for p in folder.glob("*_*.py")}


def configured_mlflow() -> Any:
    """MLflow's module, pointed at the project's store (checked reachable once per process).

    The public way in for code that reads runs (``compare``, ``reproduce``, the sweep)."""
    uri = tracking_uri()
    check_store(uri)
    import mlflow

    mlflow_compat.apply()
    _quiet_store_tracebacks()
    mlflow.set_tracking_uri(uri)
    return mlflow


def _no_traceback(record: logging.LogRecord) -> bool:
    return record.exc_info is None


def _quiet_store_tracebacks() -> None:
    """MLflow logs a database error with its full traceback before raising it again; the
    command reports the raised error in one line (``errors.exit_on_error``). The traceback,
    and the store's INFO lines, stay for MNIST_PIPELINE_DEBUG=1."""
    if os.environ.get(DEBUG_ENV):
        return
    logger = logging.getLogger("mlflow.store.db.utils")
    # Its INFO lines ("Creating initial MLflow database tables...", "Updating database
    # tables") are the store's business, not the stage's: warnings and errors stay.
    logger.setLevel(logging.WARNING)
    if _no_traceback not in logger.filters:
        logger.addFilter(_no_traceback)


def client() -> mlflow.MlflowClient:
    """An ``MlflowClient`` of the project's store."""
    return configured_mlflow().MlflowClient()


#: MLflow's own record of what an experiment is for: model training, not GenAI development.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(name: str) -> str:
    """Create the experiment (and so the database) if needed; return its id.

    On a SQLite store, artifacts go beside the database under ``mlartifacts/``, at an
    absolute path, instead of MLflow's cwd-relative ``./mlruns``; a store that was moved or
    copied since is made to point there again (``_follow_moved_store``). A tracking server
    decides for itself.
    """
    mlflow = configured_mlflow()
    store = mlflow.MlflowClient()
    experiment = store.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"the MLflow experiment {name!r} was deleted (in mlflow ui): restore it with "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}`, or "
            "log to another one (tracking.experiment_name=...)"
        )
    database = address.sqlite_path(tracking_uri())
    folder = artifact_folder()
    location = None if folder is None else folder.as_uri()
    if experiment is not None:
        if location is not None and experiment.artifact_location != location:
            _follow_moved_store(database, experiment.artifact_location, location)
        return experiment.experiment_id
    try:
        return store.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        return store.get_experiment_by_name(name).experiment_id


#: Where MLflow's SQL schema keeps locations of artifacts: (table, column).
_LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


def _follow_moved_store(database: Path, old: str, new: str) -> None:
    """The project (and its store) was moved or copied: the experiment still names the old
    folder's ``mlartifacts/``, an absolute location fixed when it was created. Left alone,
    new artifacts would go to the old folder (recreating it after a ``mv``, writing into the
    original after a copy) and moved ones would not load. Every location under the old folder
    is pointed at the same place beside the store, where the move took them."""
    if not (old.startswith("file:") and old.rstrip("/").endswith("/mlartifacts")):
        return  # not a location this project chose: leave it to its owner
    old = old.rstrip("/")
    with sqlite3.connect(database, timeout=diagnosis.LOCK_WAIT_S) as con:
        tables = {row[0] for row in con.execute("select name from sqlite_master")}
        changed = 0
        for table, column in _LOCATION_COLUMNS:
            if table in tables:
                changed += con.execute(
                    f"update {table} set {column} = ? || substr({column}, ?) "
                    f"where {column} = ? or substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, old, len(old) + 1, old + "/"),
                ).rowcount
    log.warning(
        "this store was moved or copied: its artifacts were recorded under %s; %d locations "
        "now point beside it, at %s",
        old,
        changed,
        new,
    )
