"""Tiny MNIST-format data: learnable, all ten classes, in the real file format."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mnist_pipeline.stages.artifacts import MNIST_FILES
from mnist_pipeline.stages.idx import to_idx_bytes, write_idx

TRAIN_SIZE, TEST_SIZE = 240, 80


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable stand-ins for digits: one fixed noisy template per class, all ten classes."""
    templates = np.random.default_rng(0).random((10, 28, 28)) > 0.7
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    noise = rng.random((n, 28, 28)) > 0.9
    images = np.where(templates[labels] ^ noise, 255, 0).astype(np.uint8)
    return images, labels


def make_mirror(folder: Path, train_size: int = TRAIN_SIZE) -> dict[str, str]:
    """Write the four gzipped IDX files into ``folder``; return their content SHA-256s."""
    folder.mkdir(parents=True, exist_ok=True)
    train = synthetic_digits(train_size, seed=1)
    test = synthetic_digits(TEST_SIZE, seed=2)
    arrays = {
        "train_images": train[0],
        "train_labels": train[1],
        "test_images": test[0],
        "test_labels": test[1],
    }
    sha = {}
    for key, array in arrays.items():
        write_idx(folder / MNIST_FILES[key], array)
        sha[key] = hashlib.sha256(to_idx_bytes(array)).hexdigest()
    return sha
