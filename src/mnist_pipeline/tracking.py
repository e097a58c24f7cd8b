"""Everything MLflow: where the store is, how runs are opened, tagged and filled.

Stages call these helpers and never the MLflow API directly, so the store location, the
tags that make a run reproducible and the model format are decided here once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnist_pipeline.config import PROJECT_ROOT, PipelineConfig, flatten
from mnist_pipeline.errors import ConfigError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import mlflow
    import numpy as np

#: Where DVC runs queued experiments: a temporary copy inside the project's own .dvc/.
_DVC_EXP_TMP = "/.dvc/tmp/exps/"


def project_root(path: Path = PROJECT_ROOT) -> Path:
    """The repository whose store runs belong to, even from a DVC experiment's temp copy."""
    text = path.as_posix()
    if _DVC_EXP_TMP in text:
        return Path(text.split(_DVC_EXP_TMP)[0])
    return path


def default_tracking_uri() -> str:
    """An absolute SQLite URI: relative ones silently split runs across working directories."""
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the project's own SQLite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={uri} is relative to the working directory, so runs would "
            "scatter across Hydra and DVC experiment folders; use an absolute path "
            "(sqlite:////abs/path/mlflow.db)"
        )
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={uri} is a file store, which MLflow 3 deprecates; use "
            "sqlite:////abs/path/mlflow.db or an http(s):// tracking server"
        )
    return uri


_checked: set[str] = set()


def _mlflow() -> Any:
    """Import MLflow with its store configured (the import is deferred: it costs a second)."""
    uri = tracking_uri()
    check_store(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow


def check_store(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, before any expensive work, when a tracking server cannot be reached
    (MLflow's own client would retry for minutes)."""
    if uri in _checked or not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

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
    _checked.add(uri)


def ensure_experiment(name: str) -> str:
    """Create the experiment (and so the database) if needed; return its id.

    On a SQLite store, artifacts go beside the database under ``mlartifacts/``, at an
    absolute path, instead of MLflow's cwd-relative ``./mlruns``. A tracking server
    decides for itself.
    """
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        return client.get_experiment_by_name(name).experiment_id


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


DIRTY_CHECK = (
    "status",
    "--porcelain",
    "--untracked-files=no",
    "--",
    ".",
    ":!dvc.lock",
    ":!params.yaml",
)


def provenance_tags() -> dict[str, str]:
    """Tags that say what produced a run: code version and the software that ran it.

    dvc.lock and params.yaml are left out of the dirty check: DVC rewrites them (between
    stages, and for `dvc exp run -S`), and the run records the full config anyway.
    """
    commit = git("rev-parse", "HEAD")
    status = git(*DIRTY_CHECK)
    tags = {
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
        "python.version": platform.python_version(),
        "process.host": socket.gethostname(),
        "process.pid": str(os.getpid()),
    }
    for package in ("tensorflow", "keras", "mlflow", "dvc", "hydra-core", "numpy"):
        tags[f"version.{package}"] = _package_version(package)
    return tags


#: Set by ``job_context``: the parent run and the tags for training runs opened within.
_job: dict[str, Any] = {}


@contextmanager
def job_context(parent_run_id: str | None, tags: dict[str, str]) -> Iterator[None]:
    """Within this block, new train runs become children of ``parent_run_id`` (if any) and get
    ``tags`` (a sweep's id, job number and overrides; the run a reproduction repeats);
    other stages' runs only get the parent."""
    _job.update(parent_run_id=parent_run_id, tags=tags)
    try:
        yield
    finally:
        _job.clear()


@contextmanager
def start_run(
    cfg: PipelineConfig, stage: str, run_id: str | None = None, params: dict | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Open (or, with ``run_id``, reopen) a run in the configured experiment.

    A new run gets the stage name, provenance tags and ``params`` (by default the whole
    flattened config). An exception inside the block ends the run as FAILED, with the
    error in the ``error`` tag.
    """
    mlflow = _mlflow()
    experiment_id = ensure_experiment(cfg.tracking.experiment_name)
    close_dead_runs(experiment_id)
    if run_id is not None:
        with mlflow.start_run(run_id=run_id) as run, _record_error(mlflow):
            yield run
        return
    tags = {"stage": stage, **provenance_tags()}
    # Only the training run is the job's run: data preparation inside a job stays outside
    # the sweep, so the sweep's children are exactly its jobs.
    is_job_run = stage == "train" and bool(_job)
    if is_job_run:
        tags.update(_job["tags"])
    with (
        mlflow.start_run(
            experiment_id=experiment_id,
            run_name=tags.get("sweep_job_name", stage),
            parent_run_id=_job.get("parent_run_id") if is_job_run else None,
            tags=tags,
        ) as run,
        _record_error(mlflow),
    ):
        if is_job_run:
            _job["run_id"] = run.info.run_id
        mlflow.log_params(flatten(cfg) if params is None else params)
        yield run


@contextmanager
def _record_error(mlflow: Any) -> Iterator[None]:
    """Put the error on the run; an interrupted run (Ctrl-C, SIGTERM) ends KILLED."""
    try:
        yield
    except BaseException as exc:
        mlflow.set_tag("error", error_text(exc))
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            mlflow.end_run(status="KILLED")
        raise


def close_dead_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs this machine left RUNNING when their process died (SIGKILL, a
    crash, a lost machine can't say goodbye). Returns their ids."""
    client = _mlflow().MlflowClient()
    host = socket.gethostname()
    stale = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`process.host` = '{host}'",
    )
    closed = []
    for run in stale:
        pid = int(run.data.tags.get("process.pid", "0"))
        if pid <= 0 or pid == os.getpid() or _alive(pid):
            continue
        client.set_tag(run.info.run_id, "error", f"process {pid} died while the run was open")
        client.set_terminated(run.info.run_id, status="KILLED")
        log.warning("marked run %s KILLED: its process %d is gone", run.info.run_id, pid)
        closed.append(run.info.run_id)
    return closed


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


def fail_job(experiment_name: str, error: BaseException, params: dict) -> str:
    """Record a sweep job's failure on its run: the run it opened (whose training may have
    finished before evaluation failed), or a new FAILED run if it never got that far (an
    invalid config, say). Returns the run id."""
    if "run_id" in _job:
        fail_run(_job["run_id"], error)
        return _job["run_id"]
    client = _mlflow().MlflowClient()
    run = client.create_run(
        ensure_experiment(experiment_name),
        run_name=_job.get("tags", {}).get("sweep_job_name"),
        tags={
            "stage": "train",
            "mlflow.parentRunId": _job.get("parent_run_id") or "",
            "error": error_text(error),
            **provenance_tags(),
            **_job.get("tags", {}),
        },
    )
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    client.set_terminated(run.info.run_id, status="FAILED")
    return run.info.run_id


def create_parent_run(experiment_name: str, run_name: str, tags: dict[str, str]) -> str:
    """A sweep's parent run, opened without making it the process's active run (in the
    basic launcher the jobs run in this same process and open runs of their own)."""
    client = _mlflow().MlflowClient()
    run = client.create_run(
        ensure_experiment(experiment_name),
        run_name=run_name,
        tags={**tags, **provenance_tags()},
    )
    return run.info.run_id


def child_runs(parent_run_id: str) -> list[Any]:
    mlflow = _mlflow()
    parent = mlflow.get_run(parent_run_id)
    return mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        output_format="list",
    )


def fail_run(run_id: str, error: BaseException) -> None:
    """End a run FAILED, with the error in its ``error`` tag."""
    client = _mlflow().MlflowClient()
    client.set_tag(run_id, "error", error_text(error))
    client.set_terminated(run_id, status="FAILED")


def terminate_run(run_id: str, failed: bool) -> None:
    """End a run this process did not open: a sweep's parent, when its jobs are done."""
    status = "FAILED" if failed else "FINISHED"
    _mlflow().MlflowClient().set_terminated(run_id, status=status)


def log_artifact_to(run_id: str, path: str | Path) -> None:
    _mlflow().MlflowClient().log_artifact(run_id, str(path))


CONFIG_ARTIFACT = "config.json"


def log_run_spec(cfg: PipelineConfig, data_sha256: str) -> None:
    """What it takes to run a training again: the full resolved config (as an artifact), the
    data's content hash, the dependency lock's hash and the flags that change numerics."""
    import tensorflow as tf
    from omegaconf import OmegaConf

    mlflow = _mlflow()
    mlflow.log_dict(OmegaConf.to_container(OmegaConf.structured(cfg)), CONFIG_ARTIFACT)
    lock = project_root() / "uv.lock"
    mlflow.set_tags(
        {
            "data.content_sha256": data_sha256,
            "uv.lock.sha256": hashlib.sha256(lock.read_bytes()).hexdigest()
            if lock.exists()
            else "missing",
            "tf.onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
            "tf.op_determinism": "true",
            # A sweep job's share of the cores (0: TensorFlow's default, every core).
            "tf.intra_op_threads": str(tf.config.threading.get_intra_op_parallelism_threads()),
        }
    )


def get_run(run_id: str) -> Any:
    mlflow = _mlflow()
    try:
        return mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"no run {run_id!r} in the MLflow store {tracking_uri()}") from None


def load_run_dict(run_id: str, name: str) -> dict:
    return _mlflow().artifacts.load_dict(f"runs:/{run_id}/{name}")


def load_logged_model(model_uri: str) -> Any:
    return _mlflow().keras.load_model(model_uri)


def set_run_tags(run_id: str, tags: dict[str, Any]) -> None:
    client = _mlflow().MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def set_tags(tags: dict[str, Any]) -> None:
    _mlflow().set_tags({k: str(v) for k, v in tags.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    _mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    _mlflow().log_artifact(str(path), artifact_path=artifact_path)


def log_dict(obj: dict, name: str) -> None:
    _mlflow().log_dict(obj, name)


def log_dataset(
    features: np.ndarray, targets: np.ndarray, name: str, digest: str, context: str
) -> None:
    """Record a data set the run used (MLflow dataset inputs link runs to their data)."""
    mlflow = _mlflow()
    dataset = mlflow.data.from_numpy(features, targets=targets, name=name, digest=digest[:36])
    mlflow.log_input(dataset, context=context)


def log_keras_model(model: Any, example: np.ndarray) -> str:
    """Log a Keras 3 model with a signature and input example; return its ``models:/`` URI.

    The pip requirements are given rather than inferred: inference re-imports the model in a
    subprocess and costs many seconds.
    """
    mlflow = _mlflow()
    from mlflow.models import infer_signature

    signature = infer_signature(example, model.predict(example, verbose=0))
    requirements = [f"{p}=={_package_version(p)}" for p in ("tensorflow", "keras", "numpy")]
    with _keras_example_dir_fix():
        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
        )
    return info.model_uri


@contextmanager
def _keras_example_dir_fix() -> Iterator[None]:
    """Work around mlflow/mlflow#16183 (open): the Keras flavor writes the input example
    before it creates the model folder, so any ``input_example`` fails with
    FileNotFoundError. Create the folder first, for the duration of one call only."""
    from unittest import mock

    import mlflow.keras.save as keras_save

    original = keras_save._save_example

    def save_example(mlflow_model: Any, example: Any, path: str, *args: Any, **kw: Any) -> Any:
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, example, path, *args, **kw)

    with mock.patch.object(keras_save, "_save_example", save_example):
        yield
