"""The in-process path: the whole pipeline in one process (single runs, sweep jobs,
reproductions), calling the same stage functions ``dvc repro`` runs one process each.

Prepared data is reused by content here, the way DVC reuses a stage's outputs: the DVC
workspace's ``paths.processed`` when its manifest says it was made from the same inputs,
else ``data/cache/processed-<key>``, made once. The key covers exactly the params
``dvc.yaml`` lists for download and preprocess. A run's model and reports go to its own
folder, never over the DVC-tracked ``models/`` and ``reports/``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from filelock import FileLock

from mnist_pipeline.core.config import PathsConfig, PipelineConfig
from mnist_pipeline.stages.artifacts import inputs_key, manifest_key
from mnist_pipeline.stages.download import download
from mnist_pipeline.stages.evaluate import evaluate
from mnist_pipeline.stages.preprocess import preprocess
from mnist_pipeline.stages.train import train
from mnist_pipeline.tracking import JobContext


def with_paths(cfg: PipelineConfig, **paths: str) -> PipelineConfig:
    """``cfg`` with some of ``paths.*`` replaced."""
    return dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, **paths))


def ensure_processed(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` pointed at processed data made from its inputs, prepared now if needed.

    A file lock makes parallel sweep jobs wait for one another instead of writing the same
    files at once."""
    key = inputs_key(cfg)
    raw = Path(cfg.paths.raw)
    raw.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(raw.parent / ".prepare.lock"):
        for candidate in (Path(cfg.paths.processed), cache_folder(cfg.paths, key)):
            if manifest_key(candidate) == key:
                break
        else:
            download(cfg)
            # Statistics go beside the cached arrays, not over DVC's reports/data.json.
            preprocess(with_paths(cfg, processed=str(candidate), reports=str(candidate)))
    return with_paths(cfg, processed=str(candidate))


def cache_folder(paths: PathsConfig, key: str) -> Path:
    return Path(paths.raw).parent / "cache" / f"processed-{key[:16]}"


def run_pipeline(cfg: PipelineConfig, output_dir: Path, job: JobContext | None = None) -> dict:
    """Prepare data (or reuse it), train and evaluate into ``output_dir``; return the
    evaluation metrics. ``job`` makes the training run a sweep's child or a reproduction."""
    cfg = with_paths(
        ensure_processed(cfg),
        models=str(output_dir / "models"),
        reports=str(output_dir / "reports"),
    )
    train(cfg, job=job)
    return evaluate(cfg)
