"""A sweep's MLflow bookkeeping: its parent run, the child run of each job, and the tags that
tie them together (the only module that knows those tag names).

The launching process opens the parent and writes its ids to ``mlflow_sweep.json`` in the
sweep folder; each job (possibly another process or machine) reads them from there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mnist_pipeline import tracking
from mnist_pipeline.core.errors import PipelineError
from mnist_pipeline.tracking import names
from mnist_pipeline.tracking.provenance import provenance_tags

SWEEP_FILE = "mlflow_sweep.json"
#: On a parent run that a resumed study reopened: when (ms), so "the latest sweep" is it.
RESUMED_TAG = "sweep_resumed_ms"
#: In the sweep file: the parent run is left open for another call of the study (who).
KEPT_OPEN = "parent_kept_open_for"


def open_parent(
    sweep_dir: Path, experiment: str, sweep_id: str, overrides: list[str], name: str
) -> str:
    """Open the sweep's parent run, named ``name``, without making it the process's active run
    (in the basic launcher the jobs run in this same process and open runs of their own);
    record its ids and the sweep's overrides in the sweep folder. Returns the parent's run
    id."""
    run = tracking.client().create_run(
        tracking.ensure_experiment(experiment),
        run_name=name[: names.MAX_LENGTH],
        # Not tagged sweep_id: filtering on that tag returns exactly the sweep's jobs.
        tags={
            "sweep_parent": sweep_id,
            "sweep_role": "parent",
            "sweep_overrides": " ".join(overrides),
            **provenance_tags(),
        },
    )
    info = {
        "parent_run_id": run.info.run_id,
        "sweep_id": sweep_id,
        "experiment": experiment,
        "overrides": overrides,
    }
    write_sweep(sweep_dir, info)
    return run.info.run_id


def read_sweep(sweep_dir: str | Path) -> dict[str, Any]:
    """The sweep's MLflow ids, as ``open_parent`` (or ``resume_parent``) wrote them."""
    return json.loads((Path(sweep_dir).resolve() / SWEEP_FILE).read_text())


def write_sweep(sweep_dir: str | Path, info: dict[str, Any]) -> None:
    (Path(sweep_dir).resolve() / SWEEP_FILE).write_text(json.dumps(info, indent=2))


def resume_parent(sweep_dir: str | Path, parent_run_id: str, sweep_id: str) -> dict | None:
    """Make this sweep continue an earlier one (a resumed Optuna study): its parent run is
    reopened and the jobs become its children, and the parent ``open_parent`` just opened is
    deleted. None (nothing changed) when the earlier parent is no longer there; a
    ``ConfigError`` when a live process still holds it open (``join_parent`` then)."""
    if not tracking.reopen_run(parent_run_id):
        return None
    tracking.set_run_tags(parent_run_id, {RESUMED_TAG: int(time.time() * 1000)})
    return join_parent(sweep_dir, parent_run_id, sweep_id)


def join_parent(sweep_dir: str | Path, parent_run_id: str, sweep_id: str) -> dict:
    """Make this sweep's jobs children of ``parent_run_id``, a parent another call holds open
    (two calls of one Optuna study), and delete the parent ``open_parent`` just opened."""
    info = read_sweep(sweep_dir)
    tracking.delete_run(info["parent_run_id"])
    info.update(parent_run_id=parent_run_id, sweep_id=sweep_id)
    write_sweep(sweep_dir, info)
    return info


def keep_parent_open(sweep_dir: str | Path, holder: str) -> None:
    """Record that the parent run is shared and stays open for ``holder`` (another call of
    the study), so that this sweep's end does not close it (``SweepCallback``)."""
    write_sweep(sweep_dir, {**read_sweep(sweep_dir), KEPT_OPEN: holder})


def job_run(parent_run_id: str, job_num: int) -> Any | None:
    """The run of a sweep's job, by its number (None if the job never recorded one)."""
    for run in child_runs(parent_run_id):
        if run.data.tags.get("sweep_job") == str(job_num):
            return run
    return None


def sweep_failed(info: dict[str, Any], n_jobs: int, n_failed: int) -> bool:
    """Whether the sweep as a whole failed. A plain sweep fails if any job did; a search
    (``info["study"]``, set by ``mnist_pipeline.search``) expects some trials to fail (a
    diverging learning rate, say) and fails only when none finished."""
    if not n_failed:
        return False
    return not info.get("study") or n_failed == n_jobs


def job_context(info: dict[str, Any], job_num: int, overrides: list[str]) -> tracking.JobContext:
    """What makes a job's training run a child of the sweep: the parent, the tags, and its
    name: the overrides of its own (``names.job_name``)."""
    name = names.job_name(overrides, info.get("overrides", []), job_num)
    tags = {
        "sweep_id": info["sweep_id"],
        "sweep_job": str(job_num),
        "sweep_job_name": name,
        "pipeline_run": name,
        "sweep_overrides": " ".join(overrides),
    }
    return tracking.JobContext(parent_run_id=info["parent_run_id"], tags=tags, run_name=name)


def override_params(overrides: list[str]) -> dict[str, str]:
    """A failed job's overrides as params, so it shows beside the others in comparisons."""
    return dict(o.split("=", 1) for o in overrides if "=" in o)


def child_runs(parent_run_id: str) -> list[Any]:
    mlflow = tracking.configured_mlflow()
    parent = mlflow.get_run(parent_run_id)
    return mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        output_format="list",
    )


def describe_failure(run: Any, sweep_overrides: list[str] | None = None) -> str:
    """A failed job in one line: its number, its overrides, why, and how to run it again.

    Given the sweep's own overrides, the job is named by the overrides that are its alone
    (``model.units=32``, not the sweep's long list), and the line ends with how to rerun just
    it: the sweep's command with those values in place of its lists. Its run stays FAILED
    beside the rerun's, so the experiment then holds a finished run of every job."""
    tags = run.data.tags
    overrides = tags.get("sweep_overrides", "").split()
    own = [o for o in overrides if o not in set(sweep_overrides or [])]
    line = (
        f"job {tags.get('sweep_job')} ({' '.join(own if sweep_overrides else overrides)}) "
        f"failed: {' '.join(tags.get('error', 'no error recorded').split())}"
    )
    keys = {o.split("=", 1)[0] for o in own}
    lists = [o for o in sweep_overrides or [] if o.split("=", 1)[0] in keys]
    if own and lists:
        line += f"; rerun it: the same command with {' '.join(own)} for {' '.join(lists)}"
    return line


def fail_job(experiment: str, error: BaseException, params: dict, job: tracking.JobContext) -> str:
    """Record a job's failure on its run: the run it opened (whose training may have finished
    before evaluation failed), or a new FAILED run if it never got that far (an invalid
    config, say). Returns the run id."""
    if job.run_id is not None:
        tracking.fail_run(job.run_id, error)
        return job.run_id
    store = tracking.client()
    run = store.create_run(
        tracking.ensure_experiment(experiment),
        run_name=job.run_name,
        tags={
            "stage": "train",
            "mlflow.parentRunId": job.parent_run_id or "",
            "error": tracking.error_text(error),
            **provenance_tags(),
            **job.tags,
        },
    )
    for key, value in params.items():
        store.log_param(run.info.run_id, key, str(value)[:6000])
    store.set_terminated(run.info.run_id, status="FAILED")
    return run.info.run_id


def record_lost_job(
    sweep_dir: str | Path, job_num: int, overrides: list[str], error: BaseException
) -> None:
    """Record a job that died without reporting (a crashed worker process): its run, if it
    opened one, becomes FAILED with the reason; otherwise a FAILED run stands for it. The
    sweep then goes on and reports it like any failed job."""
    info = read_sweep(sweep_dir)
    for run in child_runs(info["parent_run_id"]):
        if run.data.tags.get("sweep_job") == str(job_num) and run.info.status == "RUNNING":
            tracking.fail_run(run.info.run_id, error)
            return
    job = job_context(info, job_num, overrides)
    fail_job(info["experiment"], error, override_params(overrides), job)


def abort_sweep(sweep_dir: str | Path, error: BaseException) -> None:
    """Close the parent run as FAILED, with the reason, when the launcher itself fails (no
    cluster, say): Hydra then skips ``on_multirun_end``, which would otherwise close it."""
    try:
        info = read_sweep(sweep_dir)
    except OSError:
        return  # the callback never opened a parent
    tracking.fail_run(info["parent_run_id"], error)


def close_parent(
    parent_run_id: str, failed: bool, artifacts: list[Path], error: str | None = None
) -> None:
    """Attach the comparison files to the parent run and end it; ``error`` (which jobs
    failed, and why) goes in its ``error`` tag, so the parent says which jobs to rerun."""
    store = tracking.client()
    try:
        for path in artifacts:
            store.log_artifact(parent_run_id, str(path))
        if error:
            store.set_tag(parent_run_id, "error", error[:5000])
    finally:
        store.set_terminated(parent_run_id, status="FAILED" if failed else "FINISHED")


def latest_sweep_id() -> str:
    """The id of the sweep started (or resumed) last, in any experiment of the store."""
    parents = tracking.configured_mlflow().search_runs(
        search_all_experiments=True,
        filter_string="tags.sweep_role = 'parent'",
        output_format="list",
    )
    if not parents:
        raise PipelineError(
            "no sweep found in the store; run one first "
            "(python -m mnist_pipeline.pipeline -m model.units=128,512)"
        )
    # A resumed Optuna study continues its first call's parent run: it counts from when it
    # was resumed.
    latest = max(parents, key=lambda r: int(r.data.tags.get(RESUMED_TAG, 0)) or r.info.start_time)
    return latest.data.tags["sweep_parent"]


def jobs_filter(sweep_id: str) -> str:
    """An MLflow filter string selecting the runs of one sweep's jobs."""
    return f"tags.sweep_id = '{sweep_id}'"
