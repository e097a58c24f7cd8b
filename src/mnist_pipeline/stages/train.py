"""Stage 3, train: fit the network on the processed training set and save it.

Records two training accuracies that are easy to confuse: ``fit_accuracy``, Keras's running
average over the last epoch (what the book prints), and ``train_accuracy``, the final model
evaluated on the whole training set. The MLflow run id goes to ``models/run.json`` so the
evaluate stage (another process) adds its metrics to the same run.

Under ``train.strategy=multi_worker`` every worker fits; only the chief publishes (saves,
writes reports, logs to MLflow; see ``distribute``).

Reads:    data/processed/ (the preprocess stage's output)
Writes:   models/ (model.keras, run.json), reports/train_history.csv (DVC's curves)
Logs:     an MLflow run `train`: the whole config, loss/accuracy per epoch, fit/train
          accuracy, the data hash, git commit and versions, the model
Main keys: model.{layers,units,activation,dropout,l2}, optimizer=rmsprop|adam|sgd,
          optimizer.learning_rate, train.{epochs,batch_size,early_stopping_patience}, seed
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig

from mnist_pipeline import tracking
from mnist_pipeline.core import atomic, log_filter
from mnist_pipeline.core.config import PipelineConfig
from mnist_pipeline.core.errors import PipelineError
from mnist_pipeline.core.params import ParamsGuard
from mnist_pipeline.core.project import CONF_DIR, stage_params
from mnist_pipeline.stages import artifacts, distribute, footprint
from mnist_pipeline.stages.cli import run_stage

if TYPE_CHECKING:
    import keras
    import mlflow
    import tensorflow as tf

log = logging.getLogger(__name__)


def train(cfg: PipelineConfig, job: tracking.JobContext | None = None) -> dict[str, float]:
    """Train, then (on the chief) save the model and its run reference; return the training
    metrics. ``job`` makes the run a sweep's child or a reproduction.

    One function on purpose, read top to bottom like the Keras example it grew from: its
    order is the contract (the memory check before anything is allocated, the strategy
    before any other TensorFlow op, the outputs put in place only once the run is recorded)."""
    # What params.yaml says now, to compare before anything is put in place.
    guard = ParamsGuard(stage_params("train"))
    models, processed = Path(cfg.paths.models), Path(cfg.paths.processed)
    x_mapped, y_train = artifacts.load_processed(processed, "train")  # memory-mapped: cheap
    # A network that cannot fit is refused before TensorFlow allocates anything.
    footprint.check_memory(cfg, len(x_mapped))
    x_val, y_val = artifacts.load_processed(processed, "val")
    # Refused unless they are the arrays preprocess wrote (an array changed behind DVC's
    # back), before the seconds TensorFlow takes to import.
    digest = artifacts.verify_processed(
        processed, {"train": (x_mapped, y_train), "val": (x_val, y_val)}
    )
    # Keras and TensorFlow cost seconds to import: only when training.
    from mnist_pipeline.stages.model import build_model, seed_everything

    # First of all: MultiWorkerMirroredStrategy must exist before any other TensorFlow op.
    dist = distribute.setup(cfg.train.strategy)
    if dist.chief:
        artifacts.clear_run_ref(models)
    example = artifacts.scaled(x_mapped[:5])  # what the model reads, logged with it
    seed_everything(cfg.seed)
    # After seed_everything: its clear_session resets Keras's global state.
    progress_bar = log_filter.quiet_progress()
    steps_per_execution = dist.steps_per_execution(cfg.train.steps_per_execution)

    def build() -> keras.Model:
        return build_model(cfg.model, cfg.optimizer, steps_per_execution)

    with dist.scope():
        model = build()
    x_train, y_onehot = _tensors(x_mapped, y_train)
    validation = _tensors(x_val, y_val) if len(x_val) else None

    # Outputs are staged and put in place only once the run is recorded FINISHED: a failure
    # anywhere (a full disk at model.save, a store that cannot be written) replaces nothing.
    with (
        atomic.staged() as outputs,
        tracking.start_run(cfg, "train", job=job) if dist.chief else nullcontext() as run,
    ):
        if dist.chief:
            tracking.log_run_spec(cfg, digest)
            tracking.log_dataset(x_mapped, y_train, "mnist-train", digest, context="training")
            tracking.set_tags(
                {"distribute.workers": dist.workers, "distribute.replicas": dist.replicas}
            )
        del x_mapped  # release the memory-mapped file; training reads the tensor
        fit_started = time.perf_counter()
        history = fit(model, dist, cfg, (x_train, y_onehot), validation, progress_bar)
        fit_seconds = time.perf_counter() - fit_started
        if not dist.chief:
            log.info("worker done; the chief saves the model and logs the run")
            return {"fit_accuracy": history["accuracy"][-1], "epochs_run": len(history["loss"])}
        if dist.strategy is not None:
            model = distribute.local_copy(model, build)
        train_loss, train_accuracy = model.evaluate(x_train, y_onehot, batch_size=1024, verbose=0)
        metrics = {
            "fit_accuracy": history["accuracy"][-1],
            "train_accuracy": train_accuracy,
            "train_loss": train_loss,
            "epochs_run": len(history["loss"]),
        }
        if validation is not None:
            # The final model's (early stopping may have restored an earlier epoch's weights):
            # what a hyperparameter search optimises instead of the test set.
            val_loss, val_accuracy = model.evaluate(*validation, batch_size=1024, verbose=0)
            metrics.update(val_accuracy=val_accuracy, val_loss=val_loss)
        publish(cfg, run, model, example, history, metrics, fit_seconds, outputs, guard.values)
        guard.check()
    log.info("fit_accuracy %.4f, train_accuracy %.4f", metrics["fit_accuracy"], train_accuracy)
    return metrics


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[tf.Tensor, tf.Tensor]:
    """The pixels scaled to [0, 1], then one copy in TensorFlow's memory, shared by fit and
    evaluate: NumPy inputs would be converted again by each call (about 250 MB more at the
    peak, and slower)."""
    import keras
    import tensorflow as tf

    y_onehot = keras.utils.to_categorical(y, artifacts.NUM_CLASSES)
    return tf.convert_to_tensor(artifacts.scaled(x)), tf.convert_to_tensor(y_onehot)


def fit(
    model: keras.Model,
    dist: distribute.Distribution,
    cfg: PipelineConfig,
    train_data: tuple[tf.Tensor, tf.Tensor],
    validation: tuple[tf.Tensor, tf.Tensor] | None,
    progress_bar: bool,
) -> dict[str, list[float]]:
    """``model.fit`` with the project's callbacks; return the per-epoch history. Refuses a
    training that diverged, so nothing is saved from it. Without a ``progress_bar`` (a log
    file) the EpochLogger writes one line per epoch instead."""
    import keras

    from mnist_pipeline.stages.callbacks import EpochLogger

    if dist.strategy is None:
        x, y = train_data
        data: dict[str, Any] = {"x": x, "y": y, "batch_size": cfg.train.batch_size}
    else:  # global batches, split across replicas by the strategy, shuffled per epoch
        batches = distribute.batches(*train_data, cfg.train.batch_size, cfg.seed)
        data = {"x": batches, "shuffle": False}
        if validation is not None:
            validation = distribute.batches(*validation, cfg.train.batch_size)
    # TerminateOnNaN stops at the first NaN batch instead of training on garbage.
    callbacks: list[keras.callbacks.Callback] = [
        *([EpochLogger(cfg.train.epochs, echo=not progress_bar)] if dist.chief else []),
        keras.callbacks.TerminateOnNaN(),
    ]
    if cfg.train.early_stopping_patience > 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                patience=cfg.train.early_stopping_patience, restore_best_weights=True
            )
        )
    with distribute.lost_workers_fail(dist), distribute.keras_multi_worker_fixes(model, dist):
        history = model.fit(
            **data,
            epochs=cfg.train.epochs,
            validation_data=validation,
            callbacks=callbacks,
            verbose=1 if progress_bar else 0,  # else EpochLogger logs a line per epoch
        ).history
    if not np.isfinite(history["loss"]).all():
        raise PipelineError(
            "training diverged (loss is NaN or infinite); the model was "
            "not saved: lower optimizer.learning_rate"
        )
    return history


def publish(
    cfg: PipelineConfig,
    run: mlflow.ActiveRun,
    model: keras.Model,
    example: np.ndarray,
    history: dict[str, list[float]],
    metrics: dict[str, float],
    fit_seconds: float,
    outputs: atomic.Staged,
    params_yaml: dict | None = None,
) -> None:
    """The chief's outputs: metrics and the model in MLflow, the history for DVC plots, the
    model file and ``run.json`` (all staged: put in place once the run is recorded)."""
    models, reports = Path(cfg.paths.models), Path(cfg.paths.reports)
    final_val = {k: v for k, v in metrics.items() if k.startswith("val_")}
    rest = {k: v for k, v in metrics.items() if k not in final_val}
    tracking.log_metrics({**rest, "fit_seconds": fit_seconds})
    if final_val:
        # The step after the last epoch's (epochs count from 1): the run's val_accuracy
        # in MLflow is then the final model's, not the last epoch's.
        tracking.log_metrics(final_val, step=metrics["epochs_run"] + 1)
    artifacts.write_history(reports, history, outputs)
    model_sha256 = artifacts.save_model(model, models, outputs)
    model_uri = tracking.log_keras_model(model, example)
    tracking.set_tags({"model_uri": model_uri})
    artifacts.write_run_ref(
        models,
        {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "model_uri": model_uri,
            "model_sha256": model_sha256,
            "train_metrics": {k: float(v) for k, v in metrics.items()},
            "fit_seconds": round(fit_seconds, 3),
            # What params.yaml said when training began (None outside DVC): evaluate checks
            # that it still says so.
            "params_yaml": params_yaml,
        },
        outputs,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_stage(train, cfg)
