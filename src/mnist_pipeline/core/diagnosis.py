"""Faults of the environment (a full or read-only disk, a locked, corrupt or foreign MLflow
store, no memory) turned into one line that names the cause and the recovery.

They surface as OSError, sqlite3/SQLAlchemy errors, MlflowException or TensorFlow errors,
often chained (MLflow wraps SQLAlchemy which wraps sqlite3, and a failing store fails again
while the run is being closed), so ``describe`` reads the whole chain and reports the first
cause it recognises, by type and message: nothing here imports MLflow, TensorFlow or another
module of the project, so ``errors.exit_on_error`` can ask it about any exception.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator

#: How long a stage waits for another process's write lock on a SQLite store.
LOCK_WAIT_S = 10.0

#: A full disk in the words libraries use when they raise without an errno, or in text only:
#: NumPy's ``tofile`` ("Not enough free space to write N bytes after offset M" when it cannot
#: reserve the space, "N requested and M written" on a short write), HDF5 and subprocesses
#: quoting strerror, SQLite ("database or disk is full", worded for the store below).
FULL_DISK_TEXT = re.compile(
    r"no space left on device|not enough free space|disk quota exceeded"
    r"|\b\d+ requested and \d+ written\b",
    re.IGNORECASE,
)

FULL = "no space left on "
SOMEWHERE_FULL = FULL + "a disk this stage writes to (its outputs, or the MLflow artifact folder)"

SERVER_HINT = "for many concurrent writers use a tracking server (docs/operations.md)"
MEMORY_HINT = "lower model.units, model.layers or train.batch_size"


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and everything it was raised from or during; the first cause comes last."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe(exc: BaseException, store: str = "the MLflow store") -> str | None:
    """One line for an environment fault anywhere in ``exc``'s chain, else None (a bug).

    The innermost recognised cause wins: it is what went wrong first; the later errors are
    the same fault met again while cleaning up. One exception: a full disk that names no
    place (NumPy's) does not replace the same fault re-raised with the place named
    (``atomic.full_disk``). ``store`` names the store in the line."""
    found = None
    for link in _chain(exc):
        line = describe_one(link, store)
        if line and not (line.startswith(SOMEWHERE_FULL) and found and found.startswith(FULL)):
            found = line
    return found


def is_full_disk(exc: BaseException) -> bool:
    """Whether ``exc`` says a disk is full, by its errno or, lacking one, by its words."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return bool(FULL_DISK_TEXT.search(str(exc)))


#: MLflow's REST client giving up on a server (urllib3's words, in MlflowException's text).
SERVER_LOST = re.compile(r"Max retries exceeded with url|Failed to establish a new connection")


#: A tracking server that answers every retry with an error (urllib3's words): ``mlflow
#: server`` answers 503 while its database (PostgreSQL) is down, 500 for other failures of
#: its stores.
SERVER_FAILING = re.compile(r"too many (5\d\d) error responses")


def server_lost(exc: BaseException) -> bool:
    """Whether ``exc`` or its chain is MLflow's client giving up on a tracking server that
    stopped answering, after its retries."""
    return any(SERVER_LOST.search(str(link)) for link in _chain(exc))


def describe_one(exc: BaseException, store: str = "the MLflow store") -> str | None:
    """``describe`` for one exception, without its chain."""
    text = " ".join(str(exc).split())
    if is_full_disk(exc):
        # a copy (shutil, MLflow's artifact store) names its source first, its target second
        where = (exc.filename2 or exc.filename) if isinstance(exc, OSError) else None
        disk = f"the disk holding {where}" if where else SOMEWHERE_FULL.removeprefix(FULL)
        return f"{FULL}{disk}: free space there and run again (no output was replaced)"
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return (
            f"{exc.filename2 or exc.filename or 'an output'} is on a read-only file system: "
            "remount it read-write or point the output elsewhere, then run again"
        )
    if "database or disk is full" in text:
        return f"no space left on the disk holding {store}: free space there and run again"
    if "readonly database" in text or "read-only file system" in text.lower():
        return (
            f"{store} is read-only (a read-only disk or mount): make it writable, or set "
            "MLFLOW_TRACKING_URI to a writable store, and run again"
        )
    if "unable to open database file" in text:
        return (
            f"cannot open {store}: its folder is missing, unreadable or read-only; fix that "
            "or set MLFLOW_TRACKING_URI to another store, and run again"
        )
    if "database is locked" in text:
        return (
            f"{store} is locked by another process (a notebook, `sqlite3` or a tool holding a "
            f"write transaction): close it and run again; {SERVER_HINT}"
        )
    corrupt = re.search(r"file is not a database|database disk image is malformed", text)
    if corrupt:
        return (
            f"{store} is corrupt ({corrupt.group(0)}): move it aside and restore a backup "
            "(with none, the next run creates a new, empty store there)"
        )
    if "out-of-date database schema" in text:
        return (
            f"{store} was made by an older MLflow: back it up, then run "
            "`mlflow db upgrade <its URI>`, and run again"
        )
    if "Can't locate revision" in text:  # alembic, when MLflow tries to migrate it
        return (
            f"{store} was made by a newer MLflow than this one (its schema is unknown here): "
            "use that MLflow version (uv sync at a newer commit) or another store"
        )
    failing = SERVER_FAILING.search(text)
    if failing:
        return (
            f"{store} answers, but only with errors ({failing.group(1)}, after its retries): "
            "its database is likely down (the server's log says why); start that again and "
            "rerun (the run left RUNNING is then marked KILLED)"
        )
    if SERVER_LOST.search(text):
        why = re.search(r"\[Errno -?\d+\] [^\"')]*|Remote end closed[^\"')]*|timed out", text)
        return (
            f"{store} stopped answering ({why.group(0) if why else 'no connection'}): start "
            "it again and rerun (the run left RUNNING is then marked KILLED)"
        )
    if isinstance(exc, MemoryError) or type(exc).__name__ == "ResourceExhaustedError":
        return f"out of memory: {MEMORY_HINT} ({type(exc).__name__})"
    return None
