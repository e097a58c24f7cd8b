"""Stage 4, evaluate: test-set metrics for the trained model, beside its training metrics.

Writes one metrics file with the headline train and test numbers side by side (``dvc metrics
show``, ``dvc exp show``), the per-class accuracies beside it as a plain output (too many
columns for a table), one row per test image (DVC's confusion plot in dvc.yaml), and adds it
all to the train stage's MLflow run with the confusion matrix as numbers and as a picture, so
one run in ``mlflow ui`` holds the whole result. Every form of the confusion matrix has the
same orientation: rows (y) are the actual class, columns (x) the predicted class.

Reads:    models/ (the train stage's model and run.json), data/processed/ (the test split)
Writes:   reports/metrics.json, reports/per_class.json, reports/test_predictions.csv
Logs:     to the train stage's MLflow run: test_accuracy, test_loss, accuracy_gap,
          per-class accuracy, confusion_matrix.{json,png}
Main keys: none of its own (paths.*); it evaluates whatever the train stage saved
"""

from __future__ import annotations

import csv
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import numpy as np
from omegaconf import DictConfig

from mnist_pipeline import tracking
from mnist_pipeline.core import atomic, figures, log_filter
from mnist_pipeline.core.config import PipelineConfig
from mnist_pipeline.core.params import ParamsGuard
from mnist_pipeline.core.project import CONF_DIR, stage_params
from mnist_pipeline.stages import artifacts
from mnist_pipeline.stages.artifacts import NUM_CLASSES
from mnist_pipeline.stages.cli import run_stage

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.json"
CONFUSION_JSON = "confusion_matrix.json"
PREDICTIONS_FILE = "test_predictions.csv"
CONFUSION_PNG = "confusion_matrix.png"


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Counts, rows = actual class, columns = predicted class."""
    index = actual.astype(np.int64) * NUM_CLASSES + predicted
    return np.bincount(index, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def predict_with_loss(
    model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 1024
) -> tuple[np.ndarray, float]:
    """One pass over ``x``: the class probabilities, and the loss exactly as
    ``model.evaluate`` computes it, so test_loss compares with train_loss.

    Each batch runs what Keras's own test step runs, in a graph: the forward pass, then the
    compiled loss (L2 penalty included) on its output. In a graph Keras takes the loss from
    the softmax's logits; from the probabilities alone, in NumPy or eagerly, it would differ
    in the last bits. The batch losses are averaged weighted by batch size, as Keras does.
    Bit-identical to ``model.evaluate`` and ``model.predict`` (a test checks), in one pass
    instead of two."""
    import keras  # seconds to import: only when evaluating
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def step(x_batch: tf.Tensor, y_batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        y_pred = model(x_batch, training=False)
        return y_pred, model.compute_loss(y=y_batch, y_pred=y_pred, training=False)

    onehot = keras.utils.to_categorical(y, NUM_CLASSES)
    loss = keras.metrics.Mean()
    probabilities = []
    for start in range(0, len(x), batch_size):
        y_pred, batch_loss = step(
            tf.convert_to_tensor(x[start : start + batch_size]),
            tf.convert_to_tensor(onehot[start : start + batch_size]),
        )
        loss.update_state(batch_loss, sample_weight=y_pred.shape[0])
        probabilities.append(y_pred.numpy())
    return np.concatenate(probabilities), float(loss.result())


def evaluate(cfg: PipelineConfig) -> dict:
    """Evaluate the saved model on the test set; return the metrics file's content.

    Everything that can refuse (the run, params.yaml, the arrays, the model file's hash) is
    checked before Keras is imported: a refusal takes a second, not TensorFlow's import."""
    models, reports = Path(cfg.paths.models), Path(cfg.paths.reports)
    run = artifacts.read_run_ref(models)
    tracking.require_train_run(run["run_id"], str(models / artifacts.RUN_FILE))
    # The last stage: params.yaml must still say what the model was trained with when DVC
    # records the experiment; checked now and again just before the reports are put in place.
    guard = ParamsGuard(stage_params("train"))
    guard.check(run.get("params_yaml"), what="the model was trained")
    # Only the files the train and preprocess stages wrote: one changed behind DVC's back
    # (by hand, or a damaged copy from .dvc/cache) is refused before any metric is computed.
    x_test, y_test = artifacts.load_processed(cfg.paths.processed, "test")
    artifacts.verify_processed(cfg.paths.processed, {"test": (x_test, y_test)})
    model = artifacts.load_model(models, run.get("model_sha256"))
    log_filter.quiet_progress()
    probabilities, test_loss = predict_with_loss(model, artifacts.scaled(x_test), y_test)
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y_test, predicted)
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)

    train_metrics = run["train_metrics"]
    test_accuracy = float((predicted == y_test).mean())
    headline = {
        "fit_accuracy": train_metrics["fit_accuracy"],
        "train_accuracy": train_metrics["train_accuracy"],
        "train_loss": train_metrics["train_loss"],
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "accuracy_gap": train_metrics["train_accuracy"] - test_accuracy,
        # With data.val_split > 0: the held-out part of the training set (what searches use).
        **{k: train_metrics[k] for k in ("val_accuracy", "val_loss") if k in train_metrics},
    }
    result = {k: round(v, 6) for k, v in headline.items()}
    per_class_report = {
        "test_accuracy": {str(c): round(float(a), 6) for c, a in enumerate(per_class)},
        "test_count": {str(c): int(n) for c, n in enumerate(matrix.sum(axis=1))},
    }

    # Reports are staged and put in place only once the run has them all: a full disk or a
    # store that fails half-way leaves the last good reports as they were.
    with atomic.staged() as outputs, tracking.start_run(cfg, "evaluate", run_id=run["run_id"]):
        metrics_file = outputs.path(reports / METRICS_FILE)
        per_class_file = outputs.path(reports / PER_CLASS_FILE)
        atomic.write_json(metrics_file, result)
        atomic.write_json(per_class_file, per_class_report)
        write_predictions(outputs.path(reports / PREDICTIONS_FILE), y_test, predicted)
        tracking.log_metrics({k: v for k, v in headline.items() if k.startswith(("test", "acc"))})
        tracking.log_metrics({f"test_accuracy_class_{c}": a for c, a in enumerate(per_class)})
        tracking.log_dict(confusion_json(matrix), CONFUSION_JSON)
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / CONFUSION_PNG
            plot_confusion(png, matrix, test_accuracy)
            tracking.log_artifact(png)
        tracking.log_artifact(metrics_file)
        tracking.log_artifact(per_class_file)
        guard.check(run.get("params_yaml"), what="the model was trained")
    log.info("test_accuracy %.4f, gap %.4f", test_accuracy, headline["accuracy_gap"])
    return result


def confusion_json(matrix: np.ndarray) -> dict:
    """The matrix with its orientation spelled out: ``matrix[actual][predicted]``."""
    return {
        "rows": "actual",
        "columns": "predicted",
        "labels": list(range(NUM_CLASSES)),
        "matrix": matrix.tolist(),
    }


def write_predictions(path: Path, actual: np.ndarray, predicted: np.ndarray) -> None:
    """One row per test image; DVC's confusion template draws the matrix from it."""
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows(zip(actual.tolist(), predicted.tolist(), strict=True))


def plot_confusion(path: Path, matrix: np.ndarray, accuracy: float) -> None:
    """The matrix as confusion_matrix.json has it (row: actual class, column: predicted),
    each count in its cell, for the MLflow run's artifacts (DVC draws its own from
    test_predictions.csv)."""
    cells = [
        {"actual": a, "predicted": p, "count": int(matrix[a, p])}
        for a in range(NUM_CLASSES)
        for p in range(NUM_CLASSES)
    ]
    axis = {"type": "ordinal", "axis": {"labelAngle": 0}}
    encoding = {"x": {"field": "predicted", **axis}, "y": {"field": "actual", **axis}}
    spec = {
        "title": f"Test confusion matrix (accuracy {accuracy:.4f})",
        "data": {"values": cells},
        "transform": [{"joinaggregate": [{"op": "max", "field": "count", "as": "most"}]}],
        "width": 400,
        "height": 400,
        "encoding": encoding,
        "layer": [
            {"mark": "rect", "encoding": {"color": {"field": "count", "type": "quantitative"}}},
            {
                "mark": {"type": "text", "fontSize": 10},
                "encoding": {
                    "text": {"field": "count"},
                    # White on the dark cells (more than half the largest count).
                    "color": {
                        "condition": {"test": "datum.count > datum.most / 2", "value": "white"},
                        "value": "black",
                    },
                },
            },
        ],
    }
    figures.save_png(spec, path, scale=1)  # MLflow shows it at its size: all of it in sight


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_stage(evaluate, cfg)
