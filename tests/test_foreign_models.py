"""Issue 14, class 7: a model that does not fit the pipeline (other shapes, several inputs,
another framework's file, no loss) ends evaluate, and ``predict --model``, with one line,
before any report is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers.config import sha_overrides
from tests.helpers.processes import run_stage


def keras_model(inputs: list[int], outputs: int, compiled: bool = True):
    import keras

    tensors = [keras.Input(shape=(n,)) for n in inputs]
    joined = tensors[0] if len(tensors) == 1 else keras.layers.Concatenate()(tensors)
    model = keras.Model(tensors, keras.layers.Dense(outputs, activation="softmax")(joined))
    if compiled:
        model.compile(loss="categorical_crossentropy")
    return model


def write_model(kind: str, path: Path) -> None:
    if kind == "ten_inputs":  # the example seen: a valid .keras with 10 inputs
        keras_model([10], 10).save(path)
    elif kind == "three_outputs":
        keras_model([784], 3).save(path)
    elif kind == "two_inputs":
        keras_model([392, 392], 10).save(path)
    elif kind == "not_compiled":
        keras_model([784], 10, compiled=False).save(path)
    elif kind == "torch_file":  # what torch.save writes: a zip with a pickle inside
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
            archive.writestr("archive/version", "3\n")


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("ten_inputs", "does not fit this pipeline: it takes (None, 10)"),
        ("three_outputs", "gives (None, 3)"),
        ("two_inputs", "it takes (None, 392), (None, 392)"),
        ("not_compiled", "was saved without a loss"),
        ("torch_file", "is not a loadable Keras model"),
    ],
)
def test_a_model_that_does_not_fit_is_one_line(
    prepared, tiny_mirror, workdir, capsys, kind, reason
):
    """The stage's error path in this process (``cli.run_stage``'s translation); the first
    case through the real command as well, for its exit status and stderr."""
    import mlflow

    from mnist_pipeline import tracking
    from mnist_pipeline.core.errors import exit_on_error
    from mnist_pipeline.stages import evaluate

    models, reports = workdir / "models", workdir / "reports"
    models.mkdir()
    write_model(kind, models / "model.keras")
    experiment = tracking.ensure_experiment("mnist")  # made by the data stages already
    run = mlflow.MlflowClient().create_run(experiment, tags={"stage": "train"})
    metrics = {"fit_accuracy": 0.9, "train_accuracy": 0.9, "train_loss": 0.1}
    (models / "run.json").write_text(
        json.dumps({"run_id": run.info.run_id, "train_metrics": metrics})
    )
    before = sorted(p.name for p in reports.iterdir())
    if kind == "ten_inputs":  # the example seen, as the shell runs it
        result = run_stage("evaluate", workdir, dict(os.environ), *sha_overrides(tiny_mirror[1]))
        code, err = result.returncode, result.stderr
    else:
        with pytest.raises(SystemExit) as exited, exit_on_error(store=tracking.store_label):
            evaluate.evaluate(prepared)
        code, err = exited.value.code, capsys.readouterr().err
    assert code == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: models/model.keras") and reason in last, err[-3000:]
    assert "Traceback" not in err
    assert sorted(p.name for p in reports.iterdir()) == before  # no report written


def test_predict_refuses_a_model_with_other_inputs(tmp_path):
    from PIL import Image

    write_model("ten_inputs", tmp_path / "other.keras")
    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnist_pipeline.predict",
            "--model",
            str(tmp_path / "other.keras"),
            str(tmp_path / "digit.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "does not fit this pipeline" in last, last
    assert "Traceback" not in result.stderr
