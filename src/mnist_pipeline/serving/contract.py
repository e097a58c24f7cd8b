"""The serving contract: what a service sends the model and what it gets back.

**In:** a batch of flattened 28x28 images, ``float32`` of shape ``(n, 784)``, row by row, with
values in ``[0, 1]`` (MNIST's grey levels divided by 255, white digit on black) — exactly
what the network was trained on. **Out:** one record per image: ``digit`` (the most probable
class), ``probability`` (its probability) and ``probabilities`` (all ten, by digit).

Anything else is refused, never guessed at: MLflow's schema enforcement turns a wrong shape
(a ``(1, 28, 28)`` array, 783 values) or a non-number into a 400 before the network runs, and
``check_pixels`` refuses values outside ``[0, 1]`` (raw 0-255 pixels), NaN and infinity with
a 400 that says how to fix the request. Scaling is refused at the door rather than done here:
a request of 0-255 pixels and one of [0, 1] values cannot always be told apart (a faint image
has no pixel above 1), so silent rescaling would sometimes guess wrong.

This file is also the MLflow model itself ("models from code"): ``register`` logs it with the
trained ``.keras`` file as an artifact, and MLflow runs it on load. It imports only NumPy,
pandas, MLflow and Keras, so a served model does not depend on the rest of this package.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.types.schema import Array

PIXELS = 28 * 28
NUM_CLASSES = 10
#: The name of the Keras file among the logged model's artifacts.
KERAS_ARTIFACT = "keras_model"

SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, PIXELS))]),
    outputs=Schema(
        [
            ColSpec("long", "digit"),
            ColSpec("double", "probability"),
            ColSpec(Array("double"), "probabilities"),
        ]
    ),
)


def refuse(message: str) -> MlflowException:
    """An input error: MLflow's scoring server answers it with HTTP 400 and this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def check_pixels(model_input: Any) -> np.ndarray:
    """The input as float32 ``(n, 784)`` in [0, 1], or a ``refuse`` error saying what is wrong."""
    try:
        x = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise refuse(f"pixel values must be numbers: {exc}") from None
    if x.ndim != 2 or x.shape[1] != PIXELS:
        raise refuse(
            f"expected a batch of flattened 28x28 images, shape (n, {PIXELS}); got shape "
            f"{x.shape} (flatten each image row by row: reshape(-1, {PIXELS}))"
        )
    if not np.isfinite(x).all():
        raise refuse("pixel values must be finite numbers; got NaN or infinity")
    low, high = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if low < 0.0 or high > 1.0:
        hint = " (raw 0-255 grey levels? divide them by 255)" if high > 1.0 else ""
        raise refuse(
            f"pixel values must be in [0, 1], white digit on black; got values from "
            f"{low:g} to {high:g}{hint}"
        )
    return x


def summarize(probabilities: Any) -> pd.DataFrame:
    """Ten class probabilities per image -> digit, its probability and all ten."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != NUM_CLASSES:
        raise MlflowException(f"the model returned shape {p.shape}, not (n, {NUM_CLASSES})")
    digits = p.argmax(axis=1)
    return pd.DataFrame(
        {
            "digit": digits.astype(np.int64),
            "probability": p[np.arange(len(p)), digits],
            "probabilities": [row.tolist() for row in p],
        }
    )


#: Images per call of the network: bounds the activations' memory for a large request.
BATCH = 1024


def classify(model: Any, model_input: Any) -> pd.DataFrame:
    """Check the input and run a Keras model on it: the whole contract, used by the served
    model and by ``predict`` on a local ``.keras`` file alike.

    ``predict_on_batch``, not ``predict``: ``predict`` builds a dataset and an iterator on
    every call, about 40 ms whatever the size (tensorflow/tensorflow#40261), which was
    nearly all of a one-image request. Both run the same compiled step on the same batches
    of ``BATCH`` images, so the probabilities are the same bits (tests/test_serving.py)."""
    x = check_pixels(model_input)
    if len(x) == 0:
        return summarize(np.zeros((0, NUM_CLASSES)))
    parts = [model.predict_on_batch(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    return summarize(np.concatenate(parts) if len(parts) > 1 else parts[0])


class DigitClassifier(PythonModel):
    """The served model: the trained Keras network behind the contract above."""

    def load_context(self, context: Any) -> None:
        import keras

        # Safe mode: loading a model never runs code stored in the file.
        self.model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], safe_mode=True)
        # The first call traces the model's function (a few hundred ms): at load, not in
        # the first request.
        self.model.predict_on_batch(np.zeros((1, PIXELS), np.float32))

    # np.ndarray is a type hint MLflow infers no schema from: the signature above stays the
    # one contract (other hints would make MLflow derive a second, conflicting one).
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict | None = None
    ) -> pd.DataFrame:
        return classify(self.model, model_input)


# MLflow loads this file as the model's code under a generated module name and takes the
# model from set_model; imported as part of the package, it defines the contract only.
if __name__ != "mnist_pipeline.serving":
    set_model(DigitClassifier())
