"""Stage 3, train: fit the network on the processed training set and save it.

Records two training accuracies that are easy to confuse: ``fit_accuracy``, Keras's running
average over the last epoch (what the book prints), and ``train_accuracy``, the final model
evaluated on the whole training set. The MLflow run id goes to ``models/run.json`` so the
evaluate stage (another process) adds its metrics to the same run.
"""

from __future__ import annotations

import csv
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from mnist_pipeline import distribute, files, tracking
from mnist_pipeline.cli import run_stage
from mnist_pipeline.config import CONF_DIR, PipelineConfig
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.preprocess import data_hash, load_processed

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
RUN_FILE = "run.json"
HISTORY_FILE = "train_history.csv"


def train(cfg: PipelineConfig) -> dict[str, float]:
    """Train, save the model and its run reference; return the training metrics.

    Under ``train.strategy=multi_worker`` every worker runs this; only the chief saves,
    writes reports and logs to MLflow (see ``distribute``).
    """
    import keras
    import tensorflow as tf

    from mnist_pipeline.model import NUM_CLASSES, build_model, seed_everything

    # First of all: MultiWorkerMirroredStrategy must exist before any other TensorFlow op.
    dist = distribute.setup(cfg.train.strategy)
    # No run reference from an earlier training may outlive a failed one: evaluate would
    # add its metrics to the wrong run.
    if dist.chief:
        (Path(cfg.paths.models) / RUN_FILE).unlink(missing_ok=True)
    x_mapped, y_train = load_processed(cfg, "train")
    x_val, y_val = load_processed(cfg, "val")
    digest = data_hash(cfg)
    example = np.array(x_mapped[:5])
    seed_everything(cfg.seed)
    steps_per_execution = dist.steps_per_execution(cfg.train.steps_per_execution)

    def build() -> keras.Model:
        return build_model(cfg.model, cfg.optimizer, steps_per_execution)

    with dist.scope():
        model = build()

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[tf.Tensor, tf.Tensor]:
        # One copy, in TensorFlow's memory, shared by fit and evaluate: NumPy inputs would be
        # converted again by each call (about 250 MB more at the peak, and slower).
        return tf.convert_to_tensor(x), tf.convert_to_tensor(
            keras.utils.to_categorical(y, NUM_CLASSES)
        )

    x_train, y_onehot = tensors(x_mapped, y_train)
    validation = tensors(x_val, y_val) if len(x_val) else None
    if dist.strategy is None:
        data = {"x": x_train, "y": y_onehot, "batch_size": cfg.train.batch_size}
    else:  # global batches, split across replicas by the strategy
        batches = distribute.batches(x_train, y_onehot, cfg.train.batch_size, cfg.seed)
        data = {"x": batches, "shuffle": False}  # shuffled by the pipeline, per epoch
        if validation is not None:
            validation = distribute.batches(*validation, cfg.train.batch_size)

    with tracking.start_run(cfg, "train") if dist.chief else nullcontext() as run:
        if dist.chief:
            tracking.log_run_spec(cfg, digest)
            tracking.log_dataset(x_mapped, y_train, "mnist-train", digest, context="training")
            tracking.set_tags(
                {"distribute.workers": dist.workers, "distribute.replicas": dist.replicas}
            )
        del x_mapped  # release the memory-mapped file; training reads the tensor
        # TerminateOnNaN stops at the first NaN batch instead of training on garbage.
        callbacks: list[keras.callbacks.Callback] = [
            *([EpochLogger()] if dist.chief else []),
            keras.callbacks.TerminateOnNaN(),
        ]
        if cfg.train.early_stopping_patience > 0:
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    patience=cfg.train.early_stopping_patience, restore_best_weights=True
                )
            )
        fit_started = time.perf_counter()
        with distribute.keras_multi_worker_fixes(model, dist):
            history = model.fit(
                **data,
                epochs=cfg.train.epochs,
                validation_data=validation,
                callbacks=callbacks,
                verbose=1 if sys.stdout.isatty() else 2,  # one line per epoch in logs
            ).history
        fit_seconds = time.perf_counter() - fit_started
        if not np.isfinite(history["loss"]).all():
            raise PipelineError(
                "training diverged (loss is NaN or infinite); the model was "
                "not saved: lower optimizer.learning_rate"
            )
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
        tracking.log_metrics({**metrics, "fit_seconds": fit_seconds})

        models, reports = Path(cfg.paths.models), Path(cfg.paths.reports)
        write_history(reports / HISTORY_FILE, history)
        with files.atomic_path(models / MODEL_FILE, suffix=".keras") as tmp:
            model.save(tmp)
        model_uri = tracking.log_keras_model(model, example)
        tracking.set_tags({"model_uri": model_uri})
        files.write_json(
            models / RUN_FILE,
            {
                "run_id": run.info.run_id,
                "experiment_id": run.info.experiment_id,
                "model_uri": model_uri,
                "train_metrics": {k: float(v) for k, v in metrics.items()},
                "fit_seconds": round(fit_seconds, 3),
            },
        )
    log.info("fit_accuracy %.4f, train_accuracy %.4f", metrics["fit_accuracy"], train_accuracy)
    return metrics


class _EpochLoggerBase:
    """Sends each epoch's loss and accuracy to MLflow as it ends (step = epoch, from 1)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        tracking.log_metrics(logs or {}, step=epoch + 1)


def EpochLogger():
    import keras

    return type("EpochLogger", (_EpochLoggerBase, keras.callbacks.Callback), {})()


def write_history(path: Path, history: dict[str, list[float]]) -> None:
    """Per-epoch curves as CSV, the format DVC plots read."""
    keys = sorted(history)
    with files.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", *keys])
        for i in range(len(history[keys[0]])):
            writer.writerow([i + 1, *(f"{history[k][i]:.6f}" for k in keys)])


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_stage(train, cfg)


if __name__ == "__main__":
    main()
