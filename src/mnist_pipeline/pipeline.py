"""The whole pipeline in one process: the entry point for Hydra sweeps.

    python -m mnist_pipeline.pipeline                        # one complete run
    python -m mnist_pipeline.pipeline -m model.units=128,512 train.epochs=5,20
    python -m mnist_pipeline.pipeline -m hydra/launcher=joblib hydra.launcher.n_jobs=2 ...

Each run trains and evaluates with the same code and MLflow logging as the DVC stages.
Download and preprocess are reused by content when their outputs are already in place for
the same params. A run's model and reports go to its Hydra output folder, never over the
DVC-tracked ``models/`` and ``reports/``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mnist_pipeline.cli import run_stage
from mnist_pipeline.config import CONF_DIR, PipelineConfig


def run_pipeline(cfg: PipelineConfig, output_dir: Path) -> dict:
    """Prepare data (or reuse it), train and evaluate; return the evaluation metrics."""
    from mnist_pipeline.evaluate import evaluate
    from mnist_pipeline.preprocess import ensure_processed
    from mnist_pipeline.train import train

    cfg = ensure_processed(cfg)
    paths = dataclasses.replace(
        cfg.paths, models=str(output_dir / "models"), reports=str(output_dir / "reports")
    )
    cfg = dataclasses.replace(cfg, paths=paths)
    train(cfg)
    return evaluate(cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pipeline")
def main(raw: DictConfig) -> dict | None:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        from mnist_pipeline.sweep import run_job

        return run_job(raw)
    output_dir = Path(hydra_cfg.runtime.output_dir)
    return run_stage(lambda cfg: run_pipeline(cfg, output_dir), raw)


if __name__ == "__main__":
    main()
