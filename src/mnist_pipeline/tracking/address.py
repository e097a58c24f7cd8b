"""The tracking store's address: read as the user meant it, or refused in a second with the reason.

``tracking.tracking_uri`` reads ``$MLFLOW_TRACKING_URI`` through ``normalise``; nothing here
imports MLflow (that costs a second), so a bad address is refused before any work starts.
The SQLite URI the project builds from its own folder goes through ``sqlite_uri``, the one
place that knows how SQLAlchemy reads such a URI back (``sqlite_path``).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from mnist_pipeline.core.errors import ConfigError

#: What the project supports; everything else MLflow knows (mysql, mssql, databricks, file
#: stores, in-memory SQLite) is refused with the reason.
SUPPORTED = (
    "sqlite:////abs/path/mlflow.db, http(s)://server:port (an MLflow tracking server) or "
    "postgresql://user@host:port/db"
)
POSTGRES_SCHEMES = ("postgresql", "postgresql+psycopg")

#: What MLflow makes of the tracking addresses this project does not take, by scheme (or
#: whole address): named in the refusal, so a user knows what they typed.
OTHER_STORES = {
    "databricks": "a Databricks workspace",
    "databricks-uc": "Databricks Unity Catalog",
    "uc": "Unity Catalog",
    "mysql": "a MySQL database",
    "mssql": "a SQL Server database",
    "mlflow-artifacts": "an MLflow artifact location (it holds a run's files, not runs)",
    "s3": "an S3 artifact location (it holds a run's files, not runs)",
    "gs": "a Google Cloud Storage artifact location (it holds a run's files, not runs)",
    "wasbs": "an Azure Blob artifact location (it holds a run's files, not runs)",
    "dbfs": "a Databricks file system location (it holds a run's files, not runs)",
    "hdfs": "an HDFS artifact location (it holds a run's files, not runs)",
}

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def sqlite_uri(path: Path) -> str:
    """An absolute SQLite URI that SQLAlchemy reads back as exactly ``path``.

    SQLAlchemy percent-decodes the path and cuts it at the first ``?``, so a folder named
    ``50%`` or ``why?`` would silently become another path; those two characters are escaped
    (spaces, ``#``, ``&`` and ``;`` pass through unharmed)."""
    return "sqlite:///" + path.as_posix().replace("%", "%25").replace("?", "%3F")


def sqlite_path(uri: str) -> Path | None:
    """The database file a ``sqlite:///`` URI names (as SQLAlchemy reads it), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri.removeprefix("sqlite:///").split("?", 1)[0]))


def redact(uri: str) -> str:
    """The URI without its password, for messages and logs."""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:  # a port that is not a number: no password to find either
        return uri
    if password is None:
        return uri
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def normalise(raw: str) -> str:
    """The address as the user meant it: surrounding whitespace dropped, the scheme in lower
    case (URI schemes are case-insensitive, MLflow's checks are not). Raises ConfigError
    for an address the project cannot use, saying why."""
    uri = raw.strip()
    shown = redact(uri)
    match = _SCHEME.match(uri)
    scheme = (match.group(1) if match else uri).lower().split("+", 1)[0]
    if scheme in OTHER_STORES:
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={shown!r} is {OTHER_STORES[scheme]}, which this project "
            f"does not track to; use {SUPPORTED}"
        )
    if match is None or len(match.group(1)) == 1 or match.group(1).lower() == "file":
        # no scheme (a folder), a Windows drive letter, or file:
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={shown!r} is a file store, which MLflow 3 deprecates; use "
            f"{SUPPORTED}"
        )
    scheme = match.group(1).lower()
    uri = scheme + uri[len(scheme) :]
    if scheme == "sqlite":
        _check_sqlite(uri, shown)
    elif scheme in ("http", "https"):
        if not urlsplit(uri).hostname:
            raise ConfigError(f"MLFLOW_TRACKING_URI={shown!r} names no host; use {SUPPORTED}")
    elif scheme in POSTGRES_SCHEMES:
        if not urlsplit(uri).path.strip("/"):
            raise ConfigError(
                f"MLFLOW_TRACKING_URI={shown!r} names no database "
                "(postgresql://user@host:port/DATABASE)"
            )
    else:
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={shown!r}: {scheme}: is not a tracking store scheme this "
            f"project knows; use {SUPPORTED}"
        )
    return uri


def _check_sqlite(uri: str, shown: str) -> None:
    rest = uri.removeprefix("sqlite:")
    database = unquote(rest.removeprefix("///").split("?", 1)[0])
    if not rest.startswith("///") or database in ("", ":memory:") or "mode=memory" in rest:
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={shown!r} is an in-memory SQLite store: each stage is its own "
            "process, so every run would vanish when its stage exits; use a file "
            "(sqlite:////abs/path/mlflow.db)"
        )
    if not rest.startswith("////"):
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={shown!r} is relative to the working directory, so runs "
            "would scatter across Hydra and DVC experiment folders; use an absolute path "
            "(sqlite:////abs/path/mlflow.db)"
        )
