"""Ask the model what digit a picture shows: one line per file, ``file digit probability``.

    python -m mnist_pipeline.predict digit.png scans/              # files and folders
    python -m mnist_pipeline.predict --model models:/mnist@champion digit.png

Pictures of any size and colour (PNG, JPEG, anything Pillow reads) are turned into MNIST's
format first (``images.to_mnist``). ``--model`` takes a local ``.keras`` file (default: the
pipeline's ``models/model.keras``) or any MLflow model URI (``models:/mnist@champion``,
``runs:/<id>/model``), read from the project's MLflow store or ``MLFLOW_TRACKING_URI``. A
file that cannot be read gets an ``error:`` line and the others still run; the exit status
is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mnist_pipeline.core import log_filter
from mnist_pipeline.core.errors import PipelineError, exit_on_error
from mnist_pipeline.stages.artifacts import MODEL_FILE
from mnist_pipeline.tracking.address import redact

DEFAULT_MODEL = f"models/{MODEL_FILE}"

Classifier = Callable[[np.ndarray], Any]


def is_uri(model: str) -> bool:
    return ":/" in model


def load_classifier(model: str) -> Classifier:
    """A function from (n, 784) pixels to the serving contract's records, for a local Keras
    file or an MLflow model URI (the registered serving model, or a plain logged Keras model,
    whose ten probabilities get the same digit/probability summary)."""
    from mnist_pipeline.serving import contract

    if not is_uri(model):
        from mnist_pipeline.stages.artifacts import load_model_file

        keras_model = load_model_file(model)
        return lambda x: contract.classify(keras_model, x)
    from mnist_pipeline import tracking

    if model.startswith(("models:/", "runs:/")):
        tracking.require_existing_store()  # predicting never creates a store
    mlflow = tracking.configured_mlflow()
    try:
        pyfunc = mlflow.pyfunc.load_model(model)
    except Exception as exc:  # MLflow raises many types for a missing or broken model
        reason = str(getattr(exc, "message", exc)).splitlines()[0]
        raise PipelineError(
            f"cannot load model {model} from {redact(tracking.tracking_uri())}: {reason}"
        ) from None

    def classify(x: np.ndarray) -> Any:
        try:
            out = pyfunc.predict(contract.check_pixels(x))
            return out if "digit" in getattr(out, "columns", ()) else contract.summarize(out)
        except mlflow.exceptions.MlflowException as exc:  # not an MNIST model, say
            reason = exc.message.strip().splitlines()[-1]
            raise PipelineError(f"model {model} cannot classify digits: {reason}") from None

    return classify


def expand(paths: Iterable[str]) -> Iterator[tuple[str, Path | None]]:
    """Each file named, and each visible file in a folder named (sorted); (name, None) for a
    path that does not exist or a folder with no files."""
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not found:
                yield name, None
            for p in found:
                yield str(p), p
        else:
            yield name, path if path.exists() else None


def predict_files(paths: list[str], classify: Classifier | None) -> tuple[list[str], list[str]]:
    """(result lines, error lines): every readable picture is classified in one batch."""
    from mnist_pipeline.serving.images import image_to_pixels

    names, pixels, errors = [], [], []
    for name, path in expand(paths):
        if path is None:
            what = "folder has no files" if Path(name).is_dir() else "no such file"
            errors.append(f"error: {name}: {what}")
            continue
        try:
            pixels.append(image_to_pixels(path))
            names.append(name)
        except PipelineError as exc:
            errors.append(f"error: {name}: {exc}")
    lines = []
    if pixels:
        records = classify(np.stack(pixels))
        for name, digit, probability in zip(
            names, records["digit"], records["probability"], strict=True
        ):
            lines.append(f"{name} {int(digit)} {float(probability):.4f}")
    return lines, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_pipeline.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_FOLDER")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a .keras file or an MLflow model URI (default: {DEFAULT_MODEL})",
    )
    args = parser.parse_args(argv)
    log_filter.quiet_command(level=logging.WARNING)
    if all(path is None for _, path in expand(args.paths)):  # said before seconds of imports
        lines, errors = predict_files(args.paths, classify=None)
    else:
        with exit_on_error():
            classify = load_classifier(args.model)
            lines, errors = predict_files(args.paths, classify)
    for line in errors:
        print(line, file=sys.stderr)
    for line in lines:
        print(line)
    return 1 if errors else 0
