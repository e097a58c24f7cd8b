"""The files that pass between stages: the one contract the four stages share.

The stages never import each other; each reads what an earlier one wrote through this module,
and ``dvc.yaml`` lists it as a code dependency of every stage that does. It owns:

- the raw MNIST files (``download`` writes, ``preprocess`` reads);
- the processed arrays, their manifest and content hash (``preprocess`` writes, ``train`` and
  ``evaluate`` read);
- the model file and its run reference ``run.json``, the MLflow run that ``evaluate`` adds its
  metrics to (``train`` writes, ``evaluate`` reads);
- the training history, the CSV that ``dvc plots`` draws.

This module does not import TensorFlow (the model's loader imports Keras when called).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mnist_pipeline.core import atomic
from mnist_pipeline.core.config import PipelineConfig, flatten, select
from mnist_pipeline.core.errors import DataError, PipelineError
from mnist_pipeline.core.project import stage_params

if TYPE_CHECKING:
    import keras

#: The four files every MNIST mirror serves, by the logical names the config uses.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
NUM_CLASSES = 10
#: What the network reads: one flattened 28x28 image, 784 values in [0, 1].
INPUT_DIM = 28 * 28

SPLITS = ("train", "val", "test")
#: How data/processed stores images: uint8 pixels, scaled where they are read (``scaled``).
#: Part of ``inputs_key``: a folder made by code that stored them otherwise is made again.
PROCESSED_FORMAT = "uint8 pixels"
#: How an output changed behind DVC's back is put back (docs/failures.md, class 10). DVC
#: trusts its read-only cache files without re-hashing them (dvc-data 3.18.3,
#: ``LocalHashFileDB.check``), so a damaged copy there comes back with each checkout; made
#: writable, they are re-hashed, a damaged one is dropped and `dvc repro` re-runs its stage.
RESTORE = (
    "restore it with: dvc checkout --force {path} (if this error comes back, DVC's cache "
    "copy is damaged too: chmod -R u+w .dvc/cache && dvc repro)"
)
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.keras"
RUN_FILE = "run.json"
HISTORY_FILE = "train_history.csv"
# The history's columns whether or not a validation split was held out (NaN then: Vega
# draws no line for it): dvc.yaml's plots name them, and DVC shows nothing for a plot whose
# field one of the compared revisions lacks.
HISTORY_COLUMNS = ("accuracy", "loss", "val_accuracy", "val_loss")
#: The six headline numbers of evaluate's reports/metrics.json (written with sorted keys):
#: what a run is judged and compared by (``val_*`` join them when ``data.val_split`` > 0).
HEADLINE_METRICS = (
    "fit_accuracy",
    "train_accuracy",
    "train_loss",
    "test_accuracy",
    "test_loss",
    "accuracy_gap",
)


# --- processed arrays -------------------------------------------------------------------


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """One SHA-256 over every array (name, dtype, shape, bytes): the data's identity."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        digest.update(a.data)
    return digest.hexdigest()


def inputs_key(cfg: PipelineConfig) -> str:
    """What the processed data is a function of: the params ``dvc.yaml`` lists for the
    download and preprocess stages (the raw data's checksums, the split, the seed) and the
    arrays' format. Equal keys mean equal outputs."""
    inputs = select(flatten(cfg), stage_params("download", "preprocess"))
    inputs["format"] = PROCESSED_FORMAT
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def write_processed(
    folder: Path, arrays: dict[str, np.ndarray], key: str, outputs: atomic.Staged
) -> str:
    """Stage the arrays (``x_<split>.npy``, ``y_<split>.npy``) and their manifest; return
    the content hash.

    The manifest says what the folder holds: a seal, removed first and put in place last, so
    a run that dies half-way never leaves an old manifest vouching for a mix of arrays."""
    digest = content_hash(arrays)
    for name, array in arrays.items():
        with open(outputs.path(folder / f"{name}.npy"), "wb") as f:
            np.save(f, array, allow_pickle=False)
    atomic.write_json(
        outputs.path(folder / MANIFEST_FILE, seal=True),
        {
            "content_sha256": digest,
            "inputs_key": key,
            "shapes": {k: list(v.shape) for k, v in arrays.items()},
        },
    )
    return digest


def load_processed(
    folder: str | Path, split_name: str, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split (memory-mapped), with a clear error if it is missing or damaged."""
    folder = Path(folder)
    paths = [atomic.require(folder / f"{v}_{split_name}.npy", "preprocess") for v in "xy"]
    try:
        x, y = (np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False) for p in paths)
    except ValueError as exc:
        raise DataError(
            f"{folder}: corrupt array file ({exc}); {RESTORE.format(path=folder)}"
        ) from None
    return x, y


def scaled(x: np.ndarray) -> np.ndarray:
    """Stored pixels (uint8, 0-255) -> the network's input, float32 in [0, 1]: the book's
    ``astype("float32") / 255``, the same bits. Other arrays are refused: a folder written
    by an earlier preprocess stage, which stored them scaled already."""
    if x.dtype != np.uint8:
        raise DataError(
            f"the processed arrays hold {x.dtype}, not uint8 pixels: an earlier version of the "
            "preprocess stage wrote them; run `dvc repro` to write them again"
        )
    features = x.astype(np.float32)
    features /= 255.0  # in place: the same values as ``/ 255.0``, without a second copy
    return features


def verify_processed(
    folder: str | Path, loaded: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
) -> str:
    """The processed arrays' content hash, refused unless it is the one preprocess recorded
    in the manifest: an array replaced, truncated or edited after preprocess (by hand, or a
    damaged copy that ``dvc checkout`` brought back from ``.dvc/cache``) would otherwise give
    a model or metrics that ``dvc.lock`` records under the data it replaced. ``loaded`` as
    for ``recompute_hash``: the arrays the caller uses are the ones checked."""
    digest = recompute_hash(folder, loaded)
    recorded = data_hash(folder)
    if digest != recorded:
        raise DataError(
            f"{folder} is not what the preprocess stage wrote (its arrays hash to "
            f"{digest[:12]}, its manifest records {recorded[:12]}): a file there was changed "
            f"after preprocess, so nothing was computed from it; {RESTORE.format(path=folder)}"
        )
    return digest


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_hash(folder: str | Path) -> str:
    """The processed data's content hash, as its manifest records it."""
    return atomic.read_json(Path(folder) / MANIFEST_FILE, "preprocess")["content_sha256"]


def recompute_hash(
    folder: str | Path, loaded: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
) -> str:
    """The content hash of the processed arrays as they are now (not as recorded).

    ``loaded``: splits already in memory (``{"train": (x, y)}``), hashed as they are, so the
    hash is that of the arrays a caller actually uses; other splits are read from disk."""
    loaded = loaded or {}
    arrays = {}
    for split_name in SPLITS:
        x, y = loaded[split_name] if split_name in loaded else load_processed(folder, split_name)
        arrays[f"x_{split_name}"], arrays[f"y_{split_name}"] = x, y
    return content_hash(arrays)


def manifest_key(folder: Path) -> str | None:
    """The inputs key a folder's manifest records; None when there is no complete folder."""
    try:
        return json.loads((folder / MANIFEST_FILE).read_text()).get("inputs_key")
    except (OSError, ValueError):
        return None


# --- the model and its run reference ----------------------------------------------------


def save_model(model: keras.Model, folder: Path, outputs: atomic.Staged) -> str:
    """Stage the model file; return its SHA-256, which ``run.json`` records so that evaluate
    can tell the file is still the one saved (``load_model``)."""
    path = outputs.path(folder / MODEL_FILE)
    model.save(path)
    return file_sha256(path)


def load_model(folder: str | Path, sha256: str | None = None) -> keras.Model:
    """Load the saved model in Keras safe mode (no arbitrary code from the file is run), for
    evaluation: it must be the file the train stage saved (``sha256``, from ``run.json``),
    fit the pipeline and carry its loss (``compile``).

    The file's hash is checked first: a model edited or replaced after training (or a damaged
    copy from ``.dvc/cache``) may still load, and its metrics would then be added to the
    training run of another model."""
    path = Path(folder) / MODEL_FILE
    if sha256 is not None:
        actual = file_sha256(atomic.require(path, "train"))
        if actual != sha256:
            raise PipelineError(
                f"{path} is not the model the train stage saved (sha256 {actual[:12]}, "
                f"{RUN_FILE} records {sha256[:12]}): it was changed after training, so no "
                f"metric was computed from it; {RESTORE.format(path=folder)}"
            )
    model = load_model_file(path)
    if not getattr(model, "compiled", True) or getattr(model, "loss", None) is None:
        raise PipelineError(
            f"{path} was saved without a loss (not compiled), so its test loss cannot be "
            "computed; re-run the train stage"
        )
    return model


def load_model_file(path: str | Path) -> keras.Model:
    """Load any ``.keras`` file the way ``load_model`` does (``predict --model FILE``), and
    refuse, in one line, one this pipeline cannot use (``check_shape``)."""
    import keras

    path = atomic.require(Path(path), "train")
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a damaged or foreign file
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise PipelineError(
            f"{path} is not a loadable Keras model ({reason}); re-run the train stage"
        ) from None
    check_shape(model, path)
    return model


def check_shape(model: keras.Model, path: str | Path) -> None:
    """The pipeline feeds one (batch, 784) input of flattened images and reads ten class
    probabilities; another network (other shapes, several inputs) would fail deep in Keras."""

    def shapes(tensors: list) -> str:
        return ", ".join(str(tuple(t.shape)) for t in tensors) or "none"

    try:
        inputs, outputs = list(model.inputs or []), list(model.outputs or [])
    except (AttributeError, ValueError):  # a subclassed model that was never built
        inputs, outputs = [], []
    fits_in = len(inputs) == 1 and tuple(inputs[0].shape[1:]) == (INPUT_DIM,)
    fits_out = len(outputs) == 1 and tuple(outputs[0].shape[1:]) == (NUM_CLASSES,)
    if not (fits_in and fits_out):
        raise PipelineError(
            f"{path} does not fit this pipeline: it takes {shapes(inputs)} and gives "
            f"{shapes(outputs)}, but the pipeline feeds (None, {INPUT_DIM}) flattened images "
            f"and reads (None, {NUM_CLASSES}) class probabilities; re-run the train stage"
        )


def write_run_ref(folder: Path, ref: dict[str, Any], outputs: atomic.Staged) -> None:
    """``run.json``: the MLflow run (and logged model) the saved model belongs to."""
    atomic.write_json(outputs.path(folder / RUN_FILE), ref)


def read_run_ref(folder: str | Path) -> dict[str, Any]:
    return atomic.read_json(Path(folder) / RUN_FILE, "train")


def clear_run_ref(folder: Path) -> None:
    """No run reference from an earlier training may outlive a failed one: evaluate would
    add its metrics to the wrong run."""
    (folder / RUN_FILE).unlink(missing_ok=True)


# --- the training history ---------------------------------------------------------------


def write_history(folder: Path, history: dict[str, list[float]], outputs: atomic.Staged) -> None:
    """Per-epoch curves as CSV, the format DVC plots read: ``HISTORY_COLUMNS``, then any
    other metric Keras recorded."""
    keys = [*HISTORY_COLUMNS, *sorted(set(history) - set(HISTORY_COLUMNS))]
    with open(outputs.path(folder / HISTORY_FILE), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", *keys])
        for i in range(len(history["loss"])):
            writer.writerow(
                [i + 1, *(f"{history[k][i]:.6f}" if k in history else "NaN" for k in keys)]
            )
