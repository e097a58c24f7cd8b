"""Every workaround of an MLflow bug, in one place. Each names the upstream report and the
MLflow versions it was checked against, applies only to those versions, and has a test in
``tests/test_mlflow_compat.py`` that runs MLflow's own code and fails once upstream fixes the
bug: then the workaround (and its test) can go.

Checked against MLflow 3.17.2 (``uv.lock``); a newer MLflow turns them off until someone checks
it again and moves ``LAST_CHECKED``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mnist_pipeline.tracking import address

#: The newest MLflow these workarounds were checked against.
LAST_CHECKED = (3, 17, 2)


def affected() -> bool:
    """Whether the installed MLflow is one the workarounds were checked against."""
    try:
        installed = version("mlflow-skinny")
    except PackageNotFoundError:
        installed = version("mlflow")
    numbers = tuple(int(part) for part in installed.split(".")[:3] if part.isdigit())
    return numbers <= LAST_CHECKED


def apply() -> None:
    """The process-wide workarounds, applied once MLflow is imported (``store.configured_mlflow``).

    SQLite parent folders (introduced by mlflow/mlflow#19205, in 3.8-3.17.2; not reported
    upstream yet): MLflow creates the parent folder of a SQLite store from the URI's text
    without percent-decoding it, so an escaped ``sqlite:////a/50%25/mlflow.db`` makes a stray
    folder ``50%25`` beside the real one. The folder SQLAlchemy will open is made instead."""
    import mlflow.store.db.utils as db_utils

    original = db_utils._make_parent_dirs_if_sqlite
    if getattr(original, "__wrapped__", None) is not None or not affected():  # once a process
        return

    def make_parent_dirs(db_uri: str) -> None:
        path = address.sqlite_path(db_uri)
        if path is not None and path.name not in ("", ":memory:"):
            path.parent.mkdir(parents=True, exist_ok=True)

    make_parent_dirs.__wrapped__ = original  # MLflow's own, for the test that it is still wrong
    db_utils._make_parent_dirs_if_sqlite = make_parent_dirs


def server_store(uri: str) -> tuple[str, Path | None]:
    """The store URI to give ``mlflow server`` (``make ui``), and the folder to start it in
    (None: anywhere).

    The same bug as ``apply``'s SQLite parent folders (mlflow/mlflow#19205, 3.8-3.17.2), met
    in the server's own processes, which ``apply`` cannot reach: given the escaped URI of a
    store in a folder named with ``?`` (``sqlite:////a/why%3F/mlflow.db``), the server makes a
    stray empty folder ``why%3F`` beside the real one. An escaped URI is handed over relative
    to the database's folder, the server's working folder: no folder name left to misread."""
    database = address.sqlite_path(uri)
    if database is None or not affected() or uri == f"sqlite:///{database.as_posix()}":
        return uri, None
    return address.sqlite_uri(Path(database.name)), database.parent


@contextmanager
def keras_example_dir() -> Iterator[None]:
    """mlflow/mlflow#16183 (open; 3.x-3.17.2): the Keras flavor writes the input example before
    it creates the model folder, so any ``input_example`` fails with FileNotFoundError. The
    folder is created first, for the duration of one ``log_model`` call only."""
    if not affected():
        yield
        return
    import mlflow.keras.save as keras_save

    original = keras_save._save_example

    def save_example(mlflow_model: Any, example: Any, path: str, *args: Any, **kw: Any) -> Any:
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, example, path, *args, **kw)

    keras_save._save_example = save_example
    try:
        yield
    finally:
        keras_save._save_example = original


def tensor_schema(array: Any) -> Any:
    """MLflow's schema of a batch of tensors: the array's dtype and shape, any batch size.

    What ``mlflow.types.utils._infer_schema`` gives for an array, without its unconditional
    ``import scipy.sparse`` (3.17.2; the class of mlflow/mlflow#5839, fixed there for autolog
    only): SciPy stays out of ``.venv``, where Keras would import it on every
    ``import tensorflow``. Used for the model's signature and the data sets' schema."""
    from mlflow.types import Schema, TensorSpec

    return Schema([TensorSpec(array.dtype, (-1, *array.shape[1:]))])


@contextmanager
def in_experiment_of(run: Any) -> Iterator[None]:
    """Within: MLflow's current experiment is ``run``'s.

    ``Model.log(run_id=...)`` with no active run creates its LoggedModel in the process's
    current experiment, which is the Default one (0) unless set, not the run's: the fallback
    to the run's experiment in ``fluent._create_logged_model`` (mlflow/mlflow#15491) is never
    reached, because ``_get_experiment_id()`` always answers "0" (MLflow 3.17.2; the same
    fault as mlflow/mlflow#16643 for ``log_model``). The model then lands beside runs it does
    not belong to, and on a server with logins (basic-auth, default permission READ) a user
    who owns the run is refused (403) on the Default experiment: found with ``make cluster``
    (``register`` on a worker). The previous current experiment is restored after."""
    if not affected():
        yield
        return
    import mlflow.tracking.fluent as fluent

    previous = fluent._active_experiment_id
    fluent._active_experiment_id = run.info.experiment_id
    try:
        yield
    finally:
        fluent._active_experiment_id = previous
