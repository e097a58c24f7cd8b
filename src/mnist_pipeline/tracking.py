"""MLflow for the stages: where the store is, how runs are opened, and what goes into them.

Stages call these helpers and never the MLflow API directly, so the store location, the tags
that make a run reproducible and the model format are decided here once. MLflow is imported
when first needed (the import costs a second). ``provenance`` says what produced a run;
``sweep_runs`` keeps a sweep's parent and child runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

from omegaconf import OmegaConf

from mnist_pipeline import faults, memory, run_names, store_address
from mnist_pipeline.config import PipelineConfig, flatten
from mnist_pipeline.errors import DEBUG_ENV, ConfigError
from mnist_pipeline.project import project_root
from mnist_pipeline.provenance import (
    CONFIG_ARTIFACT,
    numerics_tags,
    package_version,
    provenance_tags,
)
from mnist_pipeline.tracking_server import check_backend

if TYPE_CHECKING:
    import mlflow
    import numpy as np

log = logging.getLogger(__name__)


# --- where the store is -----------------------------------------------------------------


def default_tracking_uri() -> str:
    """An absolute SQLite URI (relative ones silently split runs across working directories),
    escaped so that any folder name reads back as itself."""
    return store_address.sqlite_uri(project_root() / "mlflow.db")


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set (as the user meant it, or refused with the reason:
    ``store_address.normalise``), else the project's own SQLite store."""
    raw = os.environ.get("MLFLOW_TRACKING_URI", "")
    return store_address.normalise(raw) if raw.strip() else default_tracking_uri()


def store_label() -> str:
    """The store, named for messages (without a password)."""
    try:
        return f"the MLflow store {store_address.redact(tracking_uri())}"
    except ConfigError:
        return "the MLflow store"


def require_existing_store() -> None:
    """For commands that only read runs: a SQLite store that does not exist is an error, not
    something to create (MLflow would make its folders and an empty database)."""
    database = store_address.sqlite_path(tracking_uri())
    if database is not None and not database.is_file():
        raise ConfigError(
            f"no MLflow store at {database}: nothing has been logged there; run the pipeline "
            "first, or set MLFLOW_TRACKING_URI to the store you mean"
        )


@cache  # once per process and store: a store that answered is not asked again
def check_store(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, before any expensive work, when the store cannot be used: a tracking
    server or PostgreSQL that does not answer (MLflow's own client would retry for minutes)."""
    database = store_address.sqlite_path(uri)
    if database is not None:
        check_sqlite_store(database)
        return
    if uri.startswith(store_address.POSTGRES_SCHEMES):
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
        raise ConfigError(faults.describe_one(sqlite3.OperationalError("readonly database"), store))
    try:
        con = sqlite3.connect(database, timeout=faults.LOCK_WAIT_S, isolation_level=None)
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
        raise ConfigError(faults.describe_one(exc, store) or f"{store}: {exc}") from None
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

    _sqlite_parent_dirs_fix()
    _quiet_store_tracebacks()
    mlflow.set_tracking_uri(uri)
    return mlflow


def _no_traceback(record: logging.LogRecord) -> bool:
    return record.exc_info is None


def _quiet_store_tracebacks() -> None:
    """MLflow logs a database error with its full traceback before raising it again; the
    command reports the raised error in one line (``errors.exit_on_error``). The traceback
    stays for MNIST_PIPELINE_DEBUG=1."""
    if os.environ.get(DEBUG_ENV):
        return
    logger = logging.getLogger("mlflow.store.db.utils")
    if _no_traceback not in logger.filters:
        logger.addFilter(_no_traceback)


def _sqlite_parent_dirs_fix() -> None:
    """MLflow 3.17 creates the parent folder of a SQLite store from the URI's text without
    percent-decoding it, so an escaped ``sqlite:////a/50%25/mlflow.db`` makes a stray folder
    ``50%25`` beside the real one. Create the folder SQLAlchemy will open instead."""
    import mlflow.store.db.utils as db_utils

    def make_parent_dirs(db_uri: str) -> None:
        path = store_address.sqlite_path(db_uri)
        if path is not None and path.name not in ("", ":memory:"):
            path.parent.mkdir(parents=True, exist_ok=True)

    db_utils._make_parent_dirs_if_sqlite = make_parent_dirs


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
    database = store_address.sqlite_path(tracking_uri())
    location = None if database is None else (database.parent / "mlartifacts").as_uri()
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
    with sqlite3.connect(database, timeout=faults.LOCK_WAIT_S) as con:
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


# --- how runs are opened and closed -----------------------------------------------------


@dataclass
class JobContext:
    """A training run opened on behalf of a job: a sweep's child (``parent_run_id``, tags with
    the sweep id, job number and overrides) or a reproduction (tag ``reproduces``).

    Passed to ``start_run`` explicitly; ``run_id`` is filled in when the run opens, so a
    failure after that is recorded on the job's own run."""

    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    run_name: str | None = None
    run_id: str | None = None


@contextmanager
def start_run(
    cfg: PipelineConfig,
    stage: str,
    run_id: str | None = None,
    params: dict | None = None,
    job: JobContext | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open (or, with ``run_id``, reopen) a run in the configured experiment.

    A new run gets a name that says which pipeline run it belongs to (``run_names``; the
    ``pipeline_run`` tag holds it for filtering, ``job`` may set it), the stage name,
    provenance tags, ``job``'s parent and tags, and
    ``params`` (by default the whole flattened config). An exception inside the block ends
    the run as FAILED, with the error in the ``error`` tag.
    """
    mlflow = configured_mlflow()
    experiment_id = ensure_experiment(cfg.tracking.experiment_name)
    close_dead_runs(experiment_id)
    if run_id is not None:
        with mlflow.start_run(run_id=run_id) as run, _record_error(mlflow):
            yield run
        return
    job = job or JobContext()
    pipeline_run = job.tags.get("pipeline_run") or run_names.pipeline_run_name()
    with (
        mlflow.start_run(
            experiment_id=experiment_id,
            run_name=job.run_name or run_names.run_name(stage, pipeline_run),
            parent_run_id=job.parent_run_id,
            tags={"stage": stage, "pipeline_run": pipeline_run, **provenance_tags(), **job.tags},
        ) as run,
        _record_error(mlflow),
    ):
        job.run_id = run.info.run_id
        mlflow.log_params(flatten(cfg) if params is None else params)
        yield run


@contextmanager
def _record_error(mlflow: Any) -> Iterator[None]:
    """Put the error on the run; an interrupted run (Ctrl-C, SIGTERM) ends KILLED.

    The store may be what failed (full, locked, read-only): then the run cannot be closed
    here, stays RUNNING, and the next run marks it KILLED. That second failure never hides
    the first."""
    try:
        yield
    except BaseException as exc:
        try:
            mlflow.set_tag("error", error_text(exc))
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                mlflow.end_run(status="KILLED")
        except Exception as again:
            log.debug("could not record the failure on the run: %s", again)
        raise


def close_dead_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs this machine left RUNNING when their process died (SIGKILL, a
    crash, a lost machine can't say goodbye). Returns their ids."""
    store = client()
    host = socket.gethostname()
    stale = store.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`process.host` = '{host}'",
    )
    closed = []
    for run in stale:
        pid = int(run.data.tags.get("process.pid", "0"))
        if pid <= 0 or pid == os.getpid() or _alive(pid):
            continue
        store.set_tag(run.info.run_id, "error", dead_run_reason(pid, run.data.tags))
        store.set_terminated(run.info.run_id, status="KILLED")
        log.warning("marked run %s KILLED: its process %d is gone", run.info.run_id, pid)
        closed.append(run.info.run_id)
    return closed


def dead_run_reason(pid: int, tags: dict[str, str]) -> str:
    """Why a run was left RUNNING by a process that is gone, as far as can be told: the
    kernel's OOM killer when its counters rose since the run began (``memory``)."""
    oom = memory.killed_by_oom(tags.get("process.oom_kills", ""))
    if oom:
        return (
            f"process {pid} died while the run was open, likely out of memory: {oom}; "
            f"{faults.MEMORY_HINT}"
        )
    return (
        f"process {pid} died while the run was open, or could not record its end (it was "
        "killed, crashed, or its store was not writable when it failed)"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:5000]


def fail_run(run_id: str, error: BaseException) -> None:
    """End a run FAILED, with the error in its ``error`` tag."""
    store = client()
    store.set_tag(run_id, "error", error_text(error))
    store.set_terminated(run_id, status="FAILED")


def require_train_run(run_id: str, reference: str = "models/run.json") -> None:
    """Before evaluate touches anything: the training run it adds to must be in this store
    and not deleted. A teammate's ``dvc pull`` brings ``models/`` without the run."""
    mlflow = configured_mlflow()
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(
            f"the training run {run_id} that {reference} names is not in {store_label()} "
            "(models/ came from elsewhere: a dvc pull, a copy): train here with "
            "`dvc repro -f train`, or set MLFLOW_TRACKING_URI to the store that has the run"
        ) from None
    if run.info.lifecycle_stage == "deleted":
        raise ConfigError(
            f"the training run {run_id} was deleted (in mlflow ui): restore it with "
            f"`mlflow runs restore --run-id {run_id}`, or train again with `dvc repro -f train`"
        )


def get_run(run_id: str) -> Any:
    mlflow = configured_mlflow()
    try:
        return mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"no run {run_id!r} in {store_label()}") from None


def set_run_tags(run_id: str, tags: dict[str, Any]) -> None:
    store = client()
    for key, value in tags.items():
        store.set_tag(run_id, key, str(value))


def log_metric_to(run_id: str, key: str, value: float, step: int = 0) -> None:
    """Log a metric to a run this process did not open (a sweep's parent, a finished job)."""
    client().log_metric(run_id, key, float(value), step=step)


def reopen_run(run_id: str) -> bool:
    """Mark a finished run RUNNING again, owned by this process (a resumed study's parent);
    False if it is gone. A run still open by a live process is refused."""
    mlflow = configured_mlflow()
    store = mlflow.MlflowClient()
    try:
        run = store.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    if run.info.lifecycle_stage != "active":
        return False
    host, pid = run.data.tags.get("process.host"), int(run.data.tags.get("process.pid", "0"))
    if run.info.status == "RUNNING" and (host != socket.gethostname() or _alive(pid)):
        raise ConfigError(
            f"run {run_id} is still open by process {pid} on {host}: wait for it to end "
            "(or stop it) first"
        )
    store.update_run(run_id, status="RUNNING")
    store.set_tag(run_id, "process.pid", str(os.getpid()))
    store.set_tag(run_id, "process.host", socket.gethostname())
    return True


def delete_run(run_id: str) -> None:
    client().delete_run(run_id)


# --- what goes into the active run ------------------------------------------------------


def set_tags(tags: dict[str, Any]) -> None:
    configured_mlflow().set_tags({k: str(v) for k, v in tags.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    configured_mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    configured_mlflow().log_artifact(str(path), artifact_path=artifact_path)


def log_dict(obj: dict, name: str) -> None:
    configured_mlflow().log_dict(obj, name)


def log_dataset(
    features: np.ndarray, targets: np.ndarray, name: str, digest: str, context: str
) -> None:
    """Record a data set the run used (MLflow dataset inputs link runs to their data)."""
    mlflow = configured_mlflow()
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.numpy_dataset import NumpyDataset
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.tracking.context import registry

    class MnistDataset(NumpyDataset):
        # MLflow infers this schema with SciPy, which .venv leaves out (Keras would import it
        # on every `import tensorflow`); the same schema, from the arrays' dtype and shape.
        @cached_property
        def schema(self) -> TensorDatasetSchema:
            return TensorDatasetSchema(tensor_schema(features), tensor_schema(targets))

    # The source mlflow.data.from_numpy gives: the code that ran, with the run's context tags.
    source = CodeDatasetSource(tags=registry.resolve_tags())
    dataset = MnistDataset(features, source, targets, name, digest[:36])
    mlflow.log_input(dataset, context=context)


def tensor_schema(array: np.ndarray) -> Any:
    """MLflow's schema of a batch of tensors: the array's dtype and shape, any batch size.
    What ``mlflow.types.utils._infer_schema`` gives for an array, without its SciPy import."""
    from mlflow.types import Schema, TensorSpec

    return Schema([TensorSpec(array.dtype, (-1, *array.shape[1:]))])


def log_run_spec(cfg: PipelineConfig, data_sha256: str) -> None:
    """What it takes to run a training again: the full resolved config (as an artifact), the
    data's content hash, the dependency lock's hash and the flags that change numerics."""
    import tensorflow as tf

    mlflow = configured_mlflow()
    mlflow.log_dict(OmegaConf.to_container(OmegaConf.structured(cfg)), CONFIG_ARTIFACT)
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    mlflow.set_tags(numerics_tags(data_sha256, threads))


def load_run_dict(run_id: str, name: str) -> dict:
    return configured_mlflow().artifacts.load_dict(f"runs:/{run_id}/{name}")


def log_keras_model(model: Any, example: np.ndarray) -> str:
    """Log a Keras 3 model with a signature and input example; return its ``models:/`` URI.

    The pip requirements are given rather than inferred: inference re-imports the model in a
    subprocess and costs many seconds.
    """
    mlflow = configured_mlflow()
    from mlflow.models import ModelSignature

    signature = ModelSignature(
        tensor_schema(example), tensor_schema(model.predict(example[:1], verbose=0))
    )
    requirements = [f"{p}=={package_version(p)}" for p in ("tensorflow", "keras", "numpy")]
    with _keras_example_dir_fix(), _no_pip_version_warning():
        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
        )
    return info.model_uri


def load_logged_model(model_uri: str) -> Any:
    return configured_mlflow().keras.load_model(model_uri)


class _PipVersionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to resolve installed pip version")


@contextmanager
def _no_pip_version_warning() -> Iterator[None]:
    """MLflow warns that it cannot find pip's version when it writes the model's conda.yaml;
    uv-made environments have no pip, and the model's requirements are given explicitly,
    so the warning says nothing to act on."""
    logger = logging.getLogger("mlflow.utils.environment")
    pip_filter = _PipVersionFilter()
    logger.addFilter(pip_filter)
    try:
        yield
    finally:
        logger.removeFilter(pip_filter)


@contextmanager
def _keras_example_dir_fix() -> Iterator[None]:
    """Work around mlflow/mlflow#16183 (open): the Keras flavor writes the input example
    before it creates the model folder, so any ``input_example`` fails with
    FileNotFoundError. Create the folder first, for the duration of one call only."""
    import mlflow.keras.save as keras_save

    original = keras_save._save_example

    def save_example(mlflow_model: Any, example: Any, path: str, *args: Any, **kw: Any) -> Any:
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, example, path, *args, **kw)

    with mock.patch.object(keras_save, "_save_example", save_example):
        yield
