"""The thin layer between a Hydra ``main`` and a stage function: validation and exit codes."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from mnist_pipeline import tracking
from mnist_pipeline.core import log_filter
from mnist_pipeline.core.config import PipelineConfig, load_config
from mnist_pipeline.core.errors import exit_on_error


def run_stage(stage: Callable[[PipelineConfig], Any], cfg: DictConfig) -> Any:
    """Validate ``cfg`` and run ``stage`` on it.

    Expected failures print one line to stderr and exit with status 1 (``exit_on_error``);
    anything else is a bug and keeps its traceback. An unreachable tracking server is found
    here, before any work starts. TensorFlow's native start-up noise is filtered from stderr
    (``quiet``).
    """
    log_filter.filter_native_stderr()
    stop_at_once_on_signals()
    with exit_on_error(store=tracking.store_label):
        config = load_config(cfg)
        tracking.check_store(tracking.tracking_uri())
        return stage(config)


def stop_at_once_on_signals() -> None:
    """SIGTERM and Ctrl-C end this process at once with one line (``_terminate``): a stage,
    and a sweep (its parent process runs the basic launcher's jobs in itself)."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)


def _terminate(signum: int, frame: Any) -> None:
    """Stop at once on SIGTERM or Ctrl-C.

    Unwinding from wherever the signal lands (inside an MLflow database write, say) can
    leave the SQLite store locked, so this exits without touching it. Outputs are safe, since
    every file is written atomically; the run left RUNNING is marked KILLED by the next run
    on this machine (tracking.close_dead_runs), an Optuna trial left RUNNING FAIL by the
    next call of its study (``study_calls.fail_stale_trials``)."""
    os.write(
        log_filter.stderr_fd(),
        f"error: stopped by signal {signum}; the next run marks this run KILLED\n".encode(),
    )
    os._exit(128 + signum)
