"""Stage 2, preprocess: IDX files -> checked arrays, one 784-vector of pixels per image.

Writes ``.npy`` files (memory-mappable, no pickle) to ``data/processed``: the pixels stay
uint8, a quarter of float32's size on disk and in DVC's cache for every data version, and
become the network's float32 in [0, 1] where they are read (``artifacts.scaled``); labels
stay integers (one-hot encoding is the train stage's business). An optional validation split is
carved from the training set with the configured seed. Dataset statistics go to a plain
file (``dvc metrics show reports/data.json``) and to MLflow. This module does not import
TensorFlow.

Reads:    data/raw/ (the download stage's output)
Writes:   data/processed/ ({x,y}_{train,val,test}.npy, manifest.json), reports/data.json
Logs:     an MLflow run `preprocess`: pixel statistics, split sizes, the data's content hash
Main keys: data.val_split, seed
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from mnist_pipeline import tracking
from mnist_pipeline.core import atomic
from mnist_pipeline.core.config import PipelineConfig, flatten, select
from mnist_pipeline.core.errors import DataError
from mnist_pipeline.core.project import CONF_DIR, stage_params
from mnist_pipeline.stages import artifacts
from mnist_pipeline.stages.artifacts import MNIST_FILES, NUM_CLASSES
from mnist_pipeline.stages.cli import run_stage
from mnist_pipeline.stages.idx import read_idx

log = logging.getLogger(__name__)

STATS_FILE = "data.json"


def load_pair(raw: Path, images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one images/labels pair and check that they belong together."""
    images = read_idx(raw / MNIST_FILES[images_key])
    labels = read_idx(raw / MNIST_FILES[labels_key])
    name = MNIST_FILES[images_key]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{name}: expected uint8 images of shape (n, rows, cols), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(
            f"{MNIST_FILES[labels_key]}: expected a uint8 vector of labels, "
            f"got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{name} has {len(images)} images but {MNIST_FILES[labels_key]} "
            f"has {len(labels)} labels"
        )
    if len(images) == 0:
        raise DataError(f"{name}: no images")
    if labels.max() >= NUM_CLASSES:
        raise DataError(f"{MNIST_FILES[labels_key]}: label {labels.max()} outside 0-9")
    return images, labels


def to_features(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) -> uint8 (n, 784), one row per image, as the book flattens them
    (its ``/ 255`` is ``artifacts.scaled``, where the arrays are read)."""
    return images.reshape(len(images), -1)


def split(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Hold out ``fraction`` of (x, y) at random (seeded), keeping the rest in order."""
    n_val = round(len(x) * fraction)
    if fraction == 0:
        return (x, y), (x[:0], y[:0])
    if n_val == 0:
        raise DataError(f"data.val_split={fraction} of {len(x)} images holds out none")
    if n_val >= len(x):
        raise DataError(f"data.val_split={fraction} leaves no training images")
    held_out = np.zeros(len(x), dtype=bool)
    held_out[np.random.default_rng(seed).permutation(len(x))[:n_val]] = True
    return (x[~held_out], y[~held_out]), (x[held_out], y[held_out])


def statistics(images: np.ndarray, labels: dict[str, np.ndarray]) -> dict:
    """Pixel mean/std of the raw training images (0-255 scale) and class counts per split."""
    # Exact integer sums (uint64 accumulators, Python ints after), without a float64 copy of
    # the images: np.bincount, the obvious histogram, casts all 47 M pixels to int64 first
    # and took 40x longer.
    pixels = images.ravel()
    n = len(pixels)
    total = int(pixels.sum(dtype=np.uint64))
    squares = int(np.einsum("i,i->", pixels, pixels, dtype=np.uint64))
    mean = total / n
    std = math.sqrt((n * squares - total * total) / (n * n))
    return {
        "train_pixel_mean": round(float(mean), 6),
        "train_pixel_std": round(float(std), 6),
        **{f"{name}_count": len(y) for name, y in labels.items()},
        "class_counts": {
            name: {str(c): int(n) for c, n in enumerate(np.bincount(y, minlength=NUM_CLASSES))}
            for name, y in labels.items()
        },
    }


def preprocess(cfg: PipelineConfig) -> dict:
    """Write the processed arrays and statistics; return the statistics."""
    raw, out = Path(cfg.paths.raw), Path(cfg.paths.processed)
    train_images, train_labels = load_pair(raw, "train_images", "train_labels")
    test_images, test_labels = load_pair(raw, "test_images", "test_labels")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"training images are {train_images.shape[1:]} but test images are "
            f"{test_images.shape[1:]}"
        )

    (x_train, y_train), (x_val, y_val) = split(
        to_features(train_images), train_labels, cfg.data.val_split, cfg.seed
    )
    arrays = {
        "x_train": x_train,
        "y_train": y_train,
        "x_val": x_val,
        "y_val": y_val,
        "x_test": to_features(test_images),
        "y_test": test_labels,
    }
    stats = statistics(train_images, {"train": y_train, "val": y_val, "test": test_labels})

    params = select(flatten(cfg), stage_params("preprocess"))
    # Staged: the arrays, manifest and statistics are put in place together, and only once
    # the run is recorded; a full disk half-way replaces nothing.
    with atomic.staged() as outputs, tracking.start_run(cfg, "preprocess", params=params):
        digest = artifacts.write_processed(out, arrays, artifacts.inputs_key(cfg), outputs)
        atomic.write_json(outputs.path(Path(cfg.paths.reports) / STATS_FILE), stats)
        tracking.set_tags({"data.content_sha256": digest})
        tracking.log_metrics({k: v for k, v in stats.items() if not isinstance(v, dict)})
        tracking.log_dict(stats, "data_stats.json")
        tracking.log_dataset(x_train, y_train, "mnist-train", digest, context="training")
        tracking.log_dataset(arrays["x_test"], test_labels, "mnist-test", digest, context="testing")
    log.info("wrote %s (data hash %s)", out, digest[:12])
    return stats


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_stage(preprocess, cfg)
