"""Hydra multirun sweeps tracked in MLflow: one parent run per sweep, one child per job.

``SweepCallback`` (wired in ``conf/pipeline.yaml``) runs in the launching process: before
any job starts it creates the MLflow database and experiment (parallel first use of a fresh
SQLite store races), prepares the data once, and opens the parent run; when the sweep ends
it logs the comparison table and picture to the parent and closes it. ``run_job`` runs in
each job, possibly in another process: it isolates the job, tags its run with the sweep id,
job number and overrides, and turns a failure into a FAILED run instead of stopping the
sweep. The MLflow bookkeeping itself is in ``sweep_runs``.
"""

from __future__ import annotations

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
from mnist_pipeline.core.config import load_config
from mnist_pipeline.core.errors import PipelineError, exit_on_error
from mnist_pipeline.experiments import compare, sweep_tracking, ui
from mnist_pipeline.stages.runner import ensure_processed, run_pipeline
from mnist_pipeline.tracking import names

log = logging.getLogger(__name__)


def _task_config(config: DictConfig) -> DictConfig:
    """The config without Hydra's own node (what a job's task function receives)."""
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        experiment = config.tracking.experiment_name
        # an unusable store: stop before any job starts
        with exit_on_error(store=tracking.store_label):
            tracking.ensure_experiment(experiment)
        try:
            ensure_processed(load_config(_task_config(config)))
        except PipelineError as exc:  # a sweep may fix the base config; jobs will report
            log.warning("data not prepared before the sweep: %s", exc)
        started = datetime.now()
        sweep_id = f"{started:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        overrides = list(config.hydra.overrides.task)
        # Named by when it started and what it sweeps (the overrides with a list or range).
        swept = " ".join(o for o in overrides if any(c in o for c in ",()"))
        name = f"sweep {started:%m-%d %H:%M:%S}" + (f": {swept}" if swept else "")
        parent = sweep_tracking.open_parent(sweep_dir, experiment, sweep_id, overrides, name)
        # The data prepared above (if it was not already): its runs fold under the sweep's
        # parent in mlflow ui, one row per sweep, never beside it.
        experiment_id = tracking.ensure_experiment(experiment)
        tracking.adopt_data_runs(experiment_id, names.pipeline_run_name(), parent)
        log.info("sweep %s: MLflow parent run %s", sweep_id, parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        info = sweep_tracking.read_sweep(config.hydra.sweep.dir)
        if info.get(sweep_tracking.KEPT_OPEN):  # a study another call still runs: its to end
            log.info(
                "sweep %s: its parent run %s stays open for %s, still running the study",
                info["sweep_id"],
                info["parent_run_id"],
                info[sweep_tracking.KEPT_OPEN],
            )
            return
        children = sweep_tracking.child_runs(info["parent_run_id"])
        failed = [r for r in children if r.info.status != "FINISHED"]
        fatal = sweep_tracking.sweep_failed(info, len(children), len(failed))
        lines = [sweep_tracking.describe_failure(r, info.get("overrides")) for r in failed]
        with tempfile.TemporaryDirectory() as tmp:
            outputs: list[Path] = []
            try:
                finished = compare.select_runs(sweep_id=info["sweep_id"])
                table = compare.runs_table(finished)
                print(compare.to_text(table))
                names = (Path(tmp) / f"comparison{ext}" for ext in (".md", ".csv", ".png"))
                outputs = compare.write_outputs(table, finished, *names)
            except PipelineError as exc:  # no finished job: nothing to compare
                log.warning("no comparison for sweep %s: %s", info["sweep_id"], exc)
            finally:
                sweep_tracking.close_parent(
                    info["parent_run_id"], fatal, outputs, "\n".join(lines) if fatal else None
                )
        ui.try_refresh_view(info["experiment"])  # the params this sweep varied become columns
        log.info("sweep %s: %d jobs, %d failed", info["sweep_id"], len(children), len(failed))
        # One line per failed job, each with how to rerun it; a search's failed trials are
        # reported, not fatal.
        for line in lines:
            print(f"{'error' if fatal else 'warning'}: {line}", file=sys.stderr)
        if fatal:
            raise SystemExit(1)


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
    hydra_cfg = HydraConfig.get()
    info = sweep_tracking.read_sweep(hydra_cfg.sweep.dir)
    overrides = list(hydra_cfg.overrides.task)
    job = sweep_tracking.job_context(info, hydra_cfg.job.num, overrides)
    limit_threads(job_threads(hydra_cfg.launcher))
    try:
        cfg = load_config(raw)
        return run_pipeline(cfg, Path(hydra_cfg.runtime.output_dir), job=job)
    except Exception as exc:
        # Expected failures get one line; a bug keeps its traceback in the job's log.
        report = log.error if isinstance(exc, PipelineError) else log.exception
        report("job %s (%s) failed: %s", hydra_cfg.job.num, " ".join(overrides), exc)
        sweep_tracking.fail_job(
            info["experiment"], exc, sweep_tracking.override_params(overrides), job
        )
        return None
