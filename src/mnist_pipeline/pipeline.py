"""The whole pipeline in one process: the entry point for single runs and Hydra sweeps.

    python -m mnist_pipeline.pipeline                        # one complete run
    python -m mnist_pipeline.pipeline -m model.units=128,512 train.epochs=5,20
    python -m mnist_pipeline.pipeline -m hydra/launcher=joblib hydra.launcher.n_jobs=2 ...

Each run trains and evaluates with the same stage functions and MLflow logging as the DVC
stages (see ``runner``); each sweep job is tracked as a child run (see ``sweep``).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mnist_pipeline.core import log_filter
from mnist_pipeline.core.project import CONF_DIR
from mnist_pipeline.core.shutdown import exit_fast
from mnist_pipeline.experiments.sweep import run_job
from mnist_pipeline.stages.cli import run_stage, stop_at_once_on_signals
from mnist_pipeline.stages.runner import run_pipeline


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pipeline")
def main(raw: DictConfig) -> dict | None:
    # A sweep's jobs (each launcher's worker too) are as quiet as the stages: no CUDA probe or
    # NodeDef lines from TensorFlow on a CPU machine (a single run gets this from run_stage).
    log_filter.filter_native_stderr()
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return run_job(raw)
    output_dir = Path(hydra_cfg.runtime.output_dir)
    return run_stage(lambda cfg: run_pipeline(cfg, output_dir), raw)


if __name__ == "__main__":
    # Before Hydra starts: a sweep's process stops at once on Ctrl-C or SIGTERM too, like a
    # stage, rather than unwinding from inside a store write (its runs and trials left open
    # are closed by the next command).
    stop_at_once_on_signals()
    main()
    exit_fast()  # only after success: a failure exits through Hydra and Python as usual
