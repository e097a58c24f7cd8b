"""Each stage called in process on tiny data, as DVC would run it."""

import csv
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest

from mnist_pipeline.core import atomic
from mnist_pipeline.core.errors import DataError, PipelineError
from mnist_pipeline.stages import artifacts, download, evaluate, preprocess, train
from mnist_pipeline.stages.artifacts import (
    HEADLINE_METRICS,
    MNIST_FILES,
    load_model,
    load_processed,
    scaled,
)
from tests.helpers.config import compose_config, sha_overrides
from tests.helpers.data import TEST_SIZE, TRAIN_SIZE, synthetic_digits


def tiny_images():
    return synthetic_digits(TRAIN_SIZE, seed=1)[0]


def test_preprocess_outputs(prepared):
    out = Path(prepared.paths.processed)
    x_train = np.load(out / "x_train.npy", mmap_mode="r", allow_pickle=False)
    y_train = np.load(out / "y_train.npy", allow_pickle=False)
    # Stored as the pixels are; the network reads them scaled, with the book's bits.
    assert x_train.shape == (TRAIN_SIZE, 784) and x_train.dtype == np.uint8
    assert x_train.max() == 255
    features = scaled(x_train)
    assert features.dtype == np.float32 and features.max() == 1.0
    np.testing.assert_array_equal(features, np.asarray(x_train).astype("float32") / 255)
    assert y_train.dtype == np.uint8 and set(np.unique(y_train)) == set(range(10))
    stats = json.loads((Path(prepared.paths.reports) / "data.json").read_text())
    assert stats["train_count"] == TRAIN_SIZE and stats["test_count"] == TEST_SIZE
    assert sum(stats["class_counts"]["train"].values()) == TRAIN_SIZE
    assert stats["train_pixel_mean"] == pytest.approx(x_train.mean(), rel=1e-5)


def test_validation_split_is_seeded_and_disjoint(tiny_mirror, tiny_cfg):
    download.download(tiny_cfg)
    cfg = compose_config([*sha_overrides(tiny_mirror[1]), "data.val_split=0.25"])
    preprocess.preprocess(cfg)
    x_train, _ = load_processed(cfg.paths.processed, "train")
    x_val, _ = load_processed(cfg.paths.processed, "val")
    assert len(x_val) == TRAIN_SIZE // 4 and len(x_train) == TRAIN_SIZE - TRAIN_SIZE // 4
    # Disjoint, together the whole training set, and not simply its first or last rows.
    everything = np.concatenate([x_train, x_val])
    assert (
        np.unique(everything, axis=0).shape
        == np.unique(preprocess.to_features(tiny_images()), axis=0).shape
    )
    rows = {r.tobytes() for r in np.asarray(x_val)}
    all_rows = [r.tobytes() for r in preprocess.to_features(tiny_images())]
    assert sum(r in rows for r in all_rows[: len(rows)]) < len(rows)
    assert sum(r in rows for r in all_rows[-len(rows) :]) < len(rows)
    first = np.array(x_val)
    preprocess.preprocess(cfg)
    np.testing.assert_array_equal(load_processed(cfg.paths.processed, "val")[0], first)


def test_preprocess_refuses_mismatched_counts(prepared):
    from mnist_pipeline.stages.idx import write_idx

    raw = Path(prepared.paths.raw)
    write_idx(raw / MNIST_FILES["test_labels"], np.zeros(TEST_SIZE - 1, np.uint8))
    with pytest.raises(DataError, match=f"has {TEST_SIZE} images but .* has {TEST_SIZE - 1}"):
        preprocess.preprocess(prepared)


def test_train_then_evaluate_fill_one_mlflow_run(prepared):
    train_metrics = train.train(prepared)
    result = evaluate.evaluate(prepared)

    models, reports = Path(prepared.paths.models), Path(prepared.paths.reports)
    assert (models / "model.keras").exists()
    run_ref = json.loads((models / "run.json").read_text())
    metrics = json.loads((reports / "metrics.json").read_text())
    for key in HEADLINE_METRICS:
        assert key in metrics
    assert metrics["accuracy_gap"] == pytest.approx(
        metrics["train_accuracy"] - metrics["test_accuracy"], abs=2e-6
    )
    assert metrics["train_accuracy"] == pytest.approx(train_metrics["train_accuracy"], abs=1e-6)
    assert len((reports / "test_predictions.csv").read_text().splitlines()) == TEST_SIZE + 1
    # metrics.json holds the headline numbers only (a readable `dvc exp show`); per-class
    # numbers go to their own plain output.
    assert set(result) == set(metrics) == set(HEADLINE_METRICS)
    per_class = json.loads((reports / "per_class.json").read_text())
    assert len(per_class["test_accuracy"]) == 10
    assert sum(per_class["test_count"].values()) == TEST_SIZE
    assert sorted(p.name for p in reports.iterdir()) == [
        "data.json",
        "metrics.json",
        "per_class.json",
        "test_predictions.csv",
        "train_history.csv",
    ]

    run = mlflow.get_run(run_ref["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.units"] == "32"
    assert run.data.params["train.epochs"] == "1"
    for key in ("fit_accuracy", "train_accuracy", "test_accuracy", "accuracy_gap", "test_loss"):
        assert run.data.metrics[key] == pytest.approx(metrics[key], abs=1e-6)
    for tag in (
        "git.commit",
        "git.dirty",
        "data.content_sha256",
        "version.tensorflow",
        "version.keras",
    ):
        assert tag in run.data.tags
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "confusion_matrix.json", "metrics.json"} <= artifacts
    # The JSON says its orientation, the same as the PNG's: rows actual, columns predicted.
    confusion = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/confusion_matrix.json")
    assert (confusion["rows"], confusion["columns"]) == ("actual", "predicted")
    predictions = np.loadtxt(reports / "test_predictions.csv", delimiter=",", skiprows=1, dtype=int)
    expected = np.zeros((10, 10), dtype=int)
    np.add.at(expected, (predictions[:, 0], predictions[:, 1]), 1)
    np.testing.assert_array_equal(confusion["matrix"], expected)
    dataset = run.inputs.dataset_inputs[0].dataset
    assert dataset.name == "mnist-train"
    # The schema MLflow infers with SciPy, built without it (.venv has none).
    schema = {k: json.loads(v) for k, v in json.loads(dataset.schema)["mlflow_tensorspec"].items()}
    assert schema == {"features": tensors("uint8", 784), "targets": tensors("uint8")}

    # The logged model loads back through MLflow and predicts the same classes.
    x_test, _ = load_processed(prepared.paths.processed, "test")
    logged = mlflow.pyfunc.load_model(run_ref["model_uri"])
    keras_model = mlflow.keras.load_model(run_ref["model_uri"])
    x_test = scaled(x_test)
    predicted = np.asarray(logged.predict(x_test)).argmax(axis=1)
    np.testing.assert_array_equal(predicted, keras_model.predict(x_test, verbose=0).argmax(1))
    signature = logged.metadata.signature
    assert json.loads(signature.inputs.to_json()) == tensors("float32", 784)
    assert json.loads(signature.outputs.to_json()) == tensors("float32", 10)


def tensors(dtype: str, *shape: int) -> list[dict]:
    """MLflow's JSON for a batch of ``dtype`` tensors of ``shape``."""
    return [{"type": "tensor", "tensor-spec": {"dtype": dtype, "shape": [-1, *shape]}}]


def test_training_is_deterministic(prepared):
    path = Path(prepared.paths.models)
    train.train(prepared)
    first = [w.copy() for w in load_model(path).get_weights()]
    train.train(prepared)
    second = load_model(path).get_weights()
    assert len(first) == len(second) == 4
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_stages_out_of_order_say_what_to_run(tiny_cfg):
    with pytest.raises(DataError, match="run the preprocess stage first"):
        train.train(tiny_cfg)
    with pytest.raises(PipelineError, match="run the train stage first"):
        evaluate.evaluate(tiny_cfg)


def test_corrupt_model_is_refused(prepared):
    train.train(prepared)
    (Path(prepared.paths.models) / "model.keras").write_bytes(b"not a zip")
    # Its hash differs from the one run.json records: refused before Keras reads it.
    with pytest.raises(PipelineError, match="is not the model the train stage saved"):
        evaluate.evaluate(prepared)


def test_steps_per_execution_changes_speed_not_results(prepared, tiny_mirror):
    path = Path(prepared.paths.models)
    weights = []
    for steps in (1, 50):
        cfg = compose_config(
            [
                *sha_overrides(tiny_mirror[1]),
                "train.epochs=2",
                "model.units=32",
                f"train.steps_per_execution={steps}",
            ]
        )
        metrics = train.train(cfg)
        weights.append((metrics, load_model(path).get_weights()))
    (m1, w1), (m50, w50) = weights
    assert m1 == m50
    for a, b in zip(w1, w50, strict=True):
        np.testing.assert_array_equal(a, b)


def test_early_stopping_ends_training_early(prepared, tiny_mirror):
    cfg = compose_config(
        [
            *sha_overrides(tiny_mirror[1]),
            "data.val_split=0.25",
            "model.units=32",
            "train.epochs=300",
            "train.early_stopping_patience=2",
            "optimizer.learning_rate=0.5",  # large steps: validation loss bounces
        ]
    )
    preprocess.preprocess(cfg)
    metrics = train.train(cfg)
    assert metrics["epochs_run"] < 300
    history = (Path(cfg.paths.reports) / "train_history.csv").read_text().splitlines()
    assert history[0].split(",") == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
    assert len(history) - 1 == metrics["epochs_run"]


@pytest.mark.parametrize("l2, dropout", [(0.0, 0.0), (1e-3, 0.3)])
def test_evaluate_one_pass_loss_is_keras_evaluate_bit_for_bit(l2, dropout):
    """evaluate takes test_loss from its one predict pass; it must be exactly the number
    model.evaluate gives (the L2 penalty included, a last batch smaller than the others)."""
    from mnist_pipeline.stages.model import build_model, seed_everything

    cfg = compose_config([f"model.l2={l2}", f"model.dropout={dropout}", "model.units=64"])
    seed_everything(0)
    model = build_model(cfg.model, cfg.optimizer)
    rng = np.random.default_rng(0)
    x = rng.random((2500, 784), dtype=np.float32)
    y = rng.integers(0, 10, 2500).astype(np.uint8)
    model.fit(x[:500], np.eye(10)[y[:500]], epochs=1, verbose=0)  # weights off their init
    for batch_size in (1024, 7):
        probabilities, loss = evaluate.predict_with_loss(model, x, y, batch_size)
        expected, _ = model.evaluate(x, np.eye(10)[y], batch_size=batch_size, verbose=0)
        assert loss == expected  # bit for bit, not approximately
        np.testing.assert_array_equal(
            probabilities, model.predict(x, batch_size=batch_size, verbose=0)
        )


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


@pytest.mark.parametrize("held_out", [False, True])
def test_history_csv_has_the_same_columns_with_or_without_validation(tmp_path, held_out):
    """train_history.csv, what dvc.yaml's curves read: one row per epoch, the history's
    numbers, and val_* columns even without a validation split (NaN: DVC would otherwise
    show nothing for a plot that names them)."""
    history = {"accuracy": [0.9, 0.95, 0.97], "loss": [0.3, 0.15, 0.1]}
    if held_out:
        history |= {"val_accuracy": [0.91, 0.94, 0.95], "val_loss": [0.28, 0.2, 0.18]}
    with atomic.staged() as outputs:
        artifacts.write_history(tmp_path, history, outputs)
    rows = list(csv.DictReader((tmp_path / "train_history.csv").open()))
    assert list(rows[0]) == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for key in rows[0]:
        if key != "epoch":
            expected = history.get(key, [math.nan] * 3)
            assert [float(r[key]) for r in rows] == pytest.approx(expected, nan_ok=True)


def test_confusion_png_has_actual_rows_and_predicted_columns(tmp_path):
    """The picture has the orientation of confusion_matrix.json and evaluate.confusion_matrix:
    row i is actual class i (from the top), column j predicted class j (from the left)."""
    actual = np.array([0] * 50 + list(range(10)))
    predicted = np.array([9] * 50 + list(range(10)))
    matrix = evaluate.confusion_matrix(actual, predicted)
    assert matrix[0, 9] == 50 and matrix.max() == 50  # (actual 0, predicted 9)
    evaluate.plot_confusion(tmp_path / "confusion_matrix.png", matrix, 0.5)
    image = pixels(tmp_path / "confusion_matrix.png")
    # The dark blue cell, the largest count (actual 0, predicted 9), is at the top right (the
    # diagonal's counts of 1 are pale). The colour legend, right of the grid, is left out.
    image = image[:, : int(image.shape[1] * 0.85)]
    rows, cols = np.nonzero(image[..., 2] - image[..., 0] > 90)
    assert len(rows) > 500
    height, width = image.shape[:2]
    assert rows.max() < height * 0.3 and cols.min() > width * 0.6, (rows.max(), cols.min())
    # Counts are written: white text inside the dark cell.
    cell = image[rows.min() : rows.max(), cols.min() : cols.max()]
    assert (cell.min(axis=2) > 200).any()


def test_arrays_stored_scaled_by_an_earlier_preprocess_are_refused(prepared):
    """data/processed from before the arrays were stored as pixels (float32 in [0, 1]):
    one line that says to run the stage again, not a network fed pixels divided twice."""
    out = Path(prepared.paths.processed)
    x_test = np.load(out / "x_test.npy")
    np.save(out / "x_test.npy", x_test.astype(np.float32) / 255, allow_pickle=False)
    with pytest.raises(DataError, match=r"float32, not uint8 pixels: .* run `dvc repro`"):
        scaled(load_processed(out, "test")[0])
