"""How runs are opened and closed: a stage's run with its name, tags and params; failures
recorded on the run; runs whose process died marked KILLED (with the OOM killer's evidence);
the few calls on runs that other code needs (sweeps, evaluate, reproduce).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mnist_pipeline.core import diagnosis, liveness, memory
from mnist_pipeline.core.config import PipelineConfig, flatten
from mnist_pipeline.core.errors import ConfigError
from mnist_pipeline.tracking import names
from mnist_pipeline.tracking.provenance import provenance_tags
from mnist_pipeline.tracking.store import client, configured_mlflow, ensure_experiment, store_label

if TYPE_CHECKING:
    import mlflow

log = logging.getLogger(__name__)


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
    the run as FAILED, with the error in the ``error`` tag. A training run takes its pipeline
    run's data-stage runs in as its children (``adopt_data_runs``).
    """
    mlflow = configured_mlflow()
    experiment_id = ensure_experiment(cfg.tracking.experiment_name)
    close_dead_runs(experiment_id)
    if run_id is not None:
        with mlflow.start_run(run_id=run_id) as run, _record_error(mlflow):
            yield run
        return
    job = job or JobContext()
    pipeline_run = job.tags.get("pipeline_run") or names.pipeline_run_name()
    with (
        mlflow.start_run(
            experiment_id=experiment_id,
            run_name=job.run_name or names.run_name(stage, pipeline_run),
            parent_run_id=job.parent_run_id,
            tags={"stage": stage, "pipeline_run": pipeline_run, **provenance_tags(), **job.tags},
        ) as run,
        _record_error(mlflow),
    ):
        job.run_id = run.info.run_id
        mlflow.log_params(flatten(cfg) if params is None else params)
        if stage == "train":
            adopt_data_runs(experiment_id, pipeline_run, run.info.run_id)
        yield run


#: The stages that run before training in a pipeline run, each in a run of its own.
DATA_STAGES = ("download", "preprocess")


def adopt_data_runs(experiment_id: str, pipeline_run: str, train_run_id: str) -> list[str]:
    """Make the training run the parent of its pipeline run's download and preprocess runs
    (same ``pipeline_run`` tag, no parent yet): in ``mlflow ui`` a `dvc repro` or a `dvc exp
    run` is then one row, the data stages' runs folded under it, not two more rows beside it.
    MLflow nests runs by the ``mlflow.parentRunId`` tag, which may be set after the fact."""
    if "'" in pipeline_run:
        return []  # not a name this project makes; it could not be searched for either
    store = client()
    found = store.search_runs(
        [experiment_id], filter_string=f"tags.pipeline_run = '{pipeline_run}'", max_results=100
    )
    adopted = [
        r.info.run_id
        for r in found
        if r.data.tags.get("stage") in DATA_STAGES and "mlflow.parentRunId" not in r.data.tags
    ]
    for run_id in adopted:
        store.set_tag(run_id, "mlflow.parentRunId", train_run_id)
    return adopted


@contextmanager
def _record_error(mlflow: Any) -> Iterator[None]:
    """Put the error on the run; an interrupted run (Ctrl-C, SIGTERM) ends KILLED.

    The store may be what failed (full, locked, read-only): then the run cannot be closed
    here, stays RUNNING, and the next run marks it KILLED. That second failure never hides
    the first."""
    try:
        yield
    except BaseException as exc:
        if diagnosis.server_lost(exc):
            # The tracking server is gone: MLflow would retry each call below (and the end
            # of the run) for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default, with
            # doubling waits). One try each; the next run marks this one KILLED.
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
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
    # Children first, so that a parent (a sweep's) counts them as they end.
    for run in sorted(stale, key=lambda r: "mlflow.parentRunId" not in r.data.tags):
        pid = int(run.data.tags.get("process.pid", "0"))
        if pid <= 0 or pid == os.getpid() or liveness.pid_alive(pid):
            continue
        reason = dead_run_reason(pid, run.data.tags) + _children(store, run)
        store.set_tag(run.info.run_id, "error", reason)
        store.set_terminated(run.info.run_id, status="KILLED")
        log.warning("marked run %s KILLED: %s", run.info.run_id, reason)
        closed.append(run.info.run_id)
    return closed


def _children(store: Any, run: Any) -> str:
    """How far a run with child training runs got (a sweep's parent: how many of its jobs
    finished), for the reason it was left open; empty for a run without any."""
    children = store.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.stage = 'train'",
    )
    if not children:
        return ""
    counts = Counter(child.info.status for child in children)
    return "; its jobs' training runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def dead_run_reason(pid: int, tags: dict[str, str]) -> str:
    """Why a run was left RUNNING by a process that is gone, as far as can be told: the
    kernel's OOM killer when its counters rose since the run began (``memory``)."""
    oom = memory.killed_by_oom(tags.get("process.oom_kills", ""))
    if oom:
        return (
            f"process {pid} died while the run was open, likely out of memory: {oom}; "
            f"{diagnosis.MEMORY_HINT}"
        )
    return (
        f"process {pid} died while the run was open, or could not record its end (it was "
        "killed, crashed, or its store was not writable when it failed)"
    )


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
    if run.info.status == "RUNNING" and (host != socket.gethostname() or liveness.pid_alive(pid)):
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
