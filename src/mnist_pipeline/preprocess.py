"""Stage 2, preprocess: IDX files -> float32 arrays in [0, 1], one 784-vector per image.

Writes ``.npy`` files (memory-mappable, no pickle) to ``data/processed``; labels stay
integers (one-hot encoding is the train stage's business). An optional validation split is
carved from the training set with the configured seed. Dataset statistics go to a DVC
metrics file and to MLflow. This module does not import TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from mnist_pipeline import files, tracking
from mnist_pipeline.cli import run_stage
from mnist_pipeline.config import CONF_DIR, MNIST_FILES, NUM_CLASSES, PipelineConfig
from mnist_pipeline.errors import DataError
from mnist_pipeline.idx import read_idx

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


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
    """uint8 (n, 28, 28) -> float32 (n, 784) in [0, 1], as the book does."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


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
    # A histogram of the 256 pixel values gives exact moments without a float64 copy.
    counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64)
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    return {
        "train_pixel_mean": round(float(mean), 6),
        "train_pixel_std": round(float(std), 6),
        **{f"{name}_count": len(y) for name, y in labels.items()},
        "class_counts": {
            name: {str(c): int(n) for c, n in enumerate(np.bincount(y, minlength=NUM_CLASSES))}
            for name, y in labels.items()
        },
    }


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """One SHA-256 over every array (name, dtype, shape, bytes): the data's identity."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        digest.update(a.data)
    return digest.hexdigest()


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
    digest = content_hash(arrays)

    # The manifest says what the folder holds; remove it first, so a run that dies half-way
    # never leaves an old manifest vouching for a mix of old and new arrays.
    (out / "manifest.json").unlink(missing_ok=True)
    with tracking.start_run(
        cfg, "preprocess", params={"data.val_split": cfg.data.val_split, "seed": cfg.seed}
    ):
        for name, array in arrays.items():
            with files.atomic_path(out / f"{name}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
        files.write_json(
            out / "manifest.json",
            {
                "content_sha256": digest,
                "inputs_key": inputs_key(cfg),
                "shapes": {k: list(v.shape) for k, v in arrays.items()},
            },
        )
        files.write_json(Path(cfg.paths.reports) / "data.json", stats)
        tracking.set_tags({"data.content_sha256": digest})
        tracking.log_metrics({k: v for k, v in stats.items() if not isinstance(v, dict)})
        tracking.log_dict(stats, "data_stats.json")
        tracking.log_dataset(x_train, y_train, "mnist-train", digest, context="training")
        tracking.log_dataset(arrays["x_test"], test_labels, "mnist-test", digest, context="testing")
    log.info("wrote %s (data hash %s)", out, digest[:12])
    return stats


def inputs_key(cfg: PipelineConfig) -> str:
    """What the processed data is a function of: the raw data's checksums and this stage's
    params (the same things dvc.yaml lists for it). Equal keys mean equal outputs."""
    inputs = {"sha256": vars(cfg.data.sha256), "val_split": cfg.data.val_split, "seed": cfg.seed}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def ensure_processed(cfg: PipelineConfig) -> PipelineConfig:
    """Processed data for ``cfg``, reused by content the way DVC would, for in-process runs.

    ``paths.processed`` is used when its manifest says it was made from the same inputs;
    otherwise the data goes to ``data/cache/processed-<key>``. A file lock makes parallel
    sweep jobs wait for one another instead of writing the same files at once.
    """
    import dataclasses

    from filelock import FileLock

    from mnist_pipeline.download import download

    key = inputs_key(cfg)
    raw = Path(cfg.paths.raw)
    raw.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(raw.parent / ".prepare.lock"):
        for candidate in (
            Path(cfg.paths.processed),
            raw.parent / "cache" / f"processed-{key[:16]}",
        ):
            if _manifest_key(candidate) == key:
                break
        else:
            download(cfg)
            # Statistics go beside the cached arrays, not over DVC's reports/data.json.
            paths = dataclasses.replace(cfg.paths, processed=str(candidate), reports=str(candidate))
            preprocess(dataclasses.replace(cfg, paths=paths))
    if str(candidate) == cfg.paths.processed:
        return cfg
    return dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, processed=str(candidate)))


def _manifest_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / "manifest.json").read_text()).get("inputs_key")
    except (OSError, ValueError):
        return None


def load_processed(
    cfg: PipelineConfig, split_name: str, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split written by this stage (memory-mapped), with a clear error if missing."""
    out = Path(cfg.paths.processed)
    paths = [files.require(out / f"{v}_{split_name}.npy", "preprocess") for v in "xy"]
    try:
        return tuple(np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False) for p in paths)
    except ValueError as exc:
        raise DataError(f"{out}: corrupt array file ({exc}); re-run the preprocess stage") from None


def recompute_hash(cfg: PipelineConfig) -> str:
    """The content hash of the processed arrays as they are on disk now (not as recorded)."""
    arrays = {}
    for split_name in SPLITS:
        arrays[f"x_{split_name}"], arrays[f"y_{split_name}"] = load_processed(cfg, split_name)
    return content_hash(arrays)


def data_hash(cfg: PipelineConfig) -> str:
    """The processed data's content hash, as recorded by this stage."""
    manifest = files.read_json(Path(cfg.paths.processed) / "manifest.json", "preprocess")
    return manifest["content_sha256"]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_stage(preprocess, cfg)


if __name__ == "__main__":
    main()
