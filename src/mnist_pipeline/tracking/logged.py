"""What goes into the active run: metrics, tags, files, the data sets it used, what it takes
to run it again, and the Keras model with its signature.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from mnist_pipeline.core.config import PipelineConfig
from mnist_pipeline.tracking import mlflow_compat
from mnist_pipeline.tracking.provenance import CONFIG_ARTIFACT, numerics_tags, package_version
from mnist_pipeline.tracking.store import configured_mlflow

if TYPE_CHECKING:
    import numpy as np


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
        # MLflow infers this schema with SciPy, which .venv leaves out (mlflow_compat).
        @cached_property
        def schema(self) -> TensorDatasetSchema:
            return TensorDatasetSchema(
                mlflow_compat.tensor_schema(features), mlflow_compat.tensor_schema(targets)
            )

    # The source mlflow.data.from_numpy gives: the code that ran, with the run's context tags.
    source = CodeDatasetSource(tags=registry.resolve_tags())
    dataset = MnistDataset(features, source, targets, name, digest[:36])
    mlflow.log_input(dataset, context=context)


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
        mlflow_compat.tensor_schema(example),
        mlflow_compat.tensor_schema(model.predict(example[:1], verbose=0)),
    )
    requirements = [f"{p}=={package_version(p)}" for p in ("tensorflow", "keras", "numpy")]
    with mlflow_compat.keras_example_dir(), no_pip_version_warning():
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
def no_pip_version_warning() -> Iterator[None]:
    """MLflow warns that it cannot find pip's version when it writes the model's conda.yaml,
    and says it found a uv project: uv-made environments have no pip, and the model's
    requirements are given explicitly, so neither says anything to act on."""
    logger = logging.getLogger("mlflow.utils.environment")
    uv_logger = logging.getLogger("mlflow.utils.uv_utils")
    pip_filter = _PipVersionFilter()
    logger.addFilter(pip_filter)
    level = uv_logger.level
    uv_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.removeFilter(pip_filter)
        uv_logger.setLevel(level)
