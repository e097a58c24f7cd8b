"""Hydra multirun sweeps tracked in MLflow: one parent run per sweep, one child per job.

``SweepCallback`` (wired in ``conf/pipeline.yaml``) runs in the launching process: before
any job starts it creates the MLflow database and experiment (parallel first use of a fresh
SQLite store races), prepares the data once, and opens the parent run; when the sweep ends
it logs the comparison table and picture to the parent and closes it. ``run_job`` runs in
each job, possibly in another process: it isolates the job, tags its run with the sweep id,
job number and overrides, and turns a failure into a FAILED run instead of stopping the
sweep.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mnist_pipeline import tracking
from mnist_pipeline.config import load_config
from mnist_pipeline.errors import PipelineError

log = logging.getLogger(__name__)

SWEEP_FILE = "mlflow_sweep.json"


def _task_config(config: DictConfig) -> DictConfig:
    """The config without Hydra's own node (what a job's task function receives)."""
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mnist_pipeline.preprocess import ensure_processed

        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        experiment = config.tracking.experiment_name
        try:
            tracking.ensure_experiment(experiment)
        except PipelineError as exc:  # an unusable store: stop before any job starts
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        try:
            ensure_processed(load_config(_task_config(config)))
        except PipelineError as exc:  # a sweep may fix the base config; jobs will report
            log.warning("data not prepared before the sweep: %s", exc)
        sweep_id = f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        arguments = " ".join(config.hydra.overrides.task)
        parent = tracking.create_parent_run(
            experiment,
            run_name=f"sweep-{sweep_id}",
            # Not tagged sweep_id: filtering on that tag returns exactly the sweep's jobs.
            tags={"sweep_parent": sweep_id, "sweep_role": "parent", "sweep_overrides": arguments},
        )
        info = {"parent_run_id": parent, "sweep_id": sweep_id, "experiment": experiment}
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=2))
        log.info("sweep %s: MLflow parent run %s", sweep_id, parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mnist_pipeline import compare

        info = read_sweep(config.hydra.sweep.dir)
        children = tracking.child_runs(info["parent_run_id"])
        failed = [r for r in children if r.info.status != "FINISHED"]
        try:
            finished = compare.select_runs(sweep_id=info["sweep_id"])
            table = compare.runs_table(finished)
            print(compare.to_text(table))
            with tempfile.TemporaryDirectory() as tmp:
                names = (Path(tmp) / f"comparison{ext}" for ext in (".md", ".csv", ".png"))
                for path in compare.write_outputs(table, finished, *names):
                    tracking.log_artifact_to(info["parent_run_id"], path)
        except PipelineError as exc:  # no finished job: nothing to compare
            log.warning("no comparison for sweep %s: %s", info["sweep_id"], exc)
        finally:
            tracking.terminate_run(info["parent_run_id"], failed=bool(failed))
        log.info("sweep %s: %d jobs, %d failed", info["sweep_id"], len(children), len(failed))
        if failed:
            for run in failed:
                print(
                    f"error: job {run.data.tags.get('sweep_job')} "
                    f"({run.data.tags.get('sweep_overrides')}) failed: "
                    f"{run.data.tags.get('error', 'no error recorded')}",
                    file=sys.stderr,
                )
            raise SystemExit(1)


def read_sweep(sweep_dir: str | Path) -> dict[str, str]:
    """The sweep's MLflow ids, as ``SweepCallback.on_multirun_start`` wrote them."""
    return json.loads((Path(sweep_dir).resolve() / SWEEP_FILE).read_text())


def abort_sweep(sweep_dir: str | Path, error: BaseException) -> None:
    """Close the parent run as FAILED, with the reason, when the launcher itself fails (no
    cluster, say): Hydra then skips ``on_multirun_end``, which would otherwise close it."""
    try:
        info = read_sweep(sweep_dir)
    except OSError:
        return  # the callback never opened a parent
    tracking.fail_run(info["parent_run_id"], error)


def record_lost_job(
    sweep_dir: str | Path, job_num: int, overrides: list[str], error: BaseException
) -> None:
    """Record a job that died without reporting (a crashed worker process): its run, if it
    opened one, becomes FAILED with the reason; otherwise a FAILED run stands for it. The
    sweep then goes on and ``on_multirun_end`` reports it like any failed job."""
    info = read_sweep(sweep_dir)
    for run in tracking.child_runs(info["parent_run_id"]):
        if run.data.tags.get("sweep_job") == str(job_num) and run.info.status == "RUNNING":
            tracking.fail_run(run.info.run_id, error)
            return
    with tracking.job_context(info["parent_run_id"], job_tags(info, job_num, overrides)):
        tracking.fail_job(info["experiment"], error, override_params(overrides))


def job_tags(info: dict[str, str], job_num: int, overrides: list[str]) -> dict[str, str]:
    """The tags that tie a job's run to its sweep."""
    return {
        "sweep_id": info["sweep_id"],
        "sweep_job": str(job_num),
        "sweep_job_name": f"{info['sweep_id']}-job{job_num}",
        "sweep_overrides": " ".join(overrides),
    }


def override_params(overrides: list[str]) -> dict[str, str]:
    """A failed job's overrides as params, so it shows beside the others in comparisons."""
    return dict(o.split("=", 1) for o in overrides if "=" in o)


def job_threads(launcher: DictConfig) -> int | None:
    """TensorFlow threads for one job, so that parallel jobs do not oversubscribe their
    machine: the CPUs a Ray launcher reserves per job (``num_cpus``), or the cores shared
    among joblib's ``n_jobs``. None (TensorFlow's default: every core) for one job at a time."""
    if launcher.get("num_cpus"):
        return max(1, int(launcher.num_cpus))
    n_jobs = launcher.get("n_jobs")
    if not n_jobs or n_jobs == 1:
        return None
    cores = os.cpu_count() or 1
    jobs = cores if n_jobs < 0 else min(n_jobs, cores)
    return max(1, cores // jobs)


def limit_threads(threads: int | None) -> None:
    """Set TensorFlow's thread pools to ``threads``. Must run before TensorFlow starts its
    runtime; a worker process that already ran a job keeps the setting it had."""
    if threads is None:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass


def run_job(raw: DictConfig) -> dict | None:
    """One sweep job: a complete training and evaluation, tracked as a child run."""
    from mnist_pipeline.pipeline import run_pipeline

    hydra_cfg = HydraConfig.get()
    info = read_sweep(hydra_cfg.sweep.dir)
    overrides = list(hydra_cfg.overrides.task)
    tags = job_tags(info, hydra_cfg.job.num, overrides)
    limit_threads(job_threads(hydra_cfg.launcher))
    with tracking.job_context(info["parent_run_id"], tags):
        try:
            cfg = load_config(raw)
            return run_pipeline(cfg, Path(hydra_cfg.runtime.output_dir))
        except Exception as exc:
            # Expected failures get one line; a bug keeps its traceback in the job's log.
            report = log.error if isinstance(exc, PipelineError) else log.exception
            report("job %s (%s) failed: %s", hydra_cfg.job.num, " ".join(overrides), exc)
            tracking.fail_job(info["experiment"], exc, override_params(overrides))
            return None
