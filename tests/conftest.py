"""Shared fixtures: tiny MNIST-format data, an isolated MLflow store, composed configs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from mnist_pipeline.config import CONF_DIR, MNIST_FILES, PipelineConfig, load_config
from mnist_pipeline.idx import to_idx_bytes, write_idx

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A local mirror of tiny MNIST-format data and the checksums that verify it."""
    folder = tmp_path_factory.mktemp("mirror")
    return folder, make_mirror(folder)


def sha_overrides(sha: dict[str, str]) -> list[str]:
    return [f"data.sha256.{key}={value}" for key, value in sha.items()]


def compose_config(overrides: list[str] | None = None) -> PipelineConfig:
    """conf/ composed with Hydra overrides and validated, as a stage would see it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return load_config(compose(config_name="config", overrides=overrides or []))


@pytest.fixture
def tracking_store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store for one test (never the project's own).

    MLflow's process-wide URI (set by earlier stages in this process) outranks the
    environment variable, so it is set here too and cleared afterwards.
    """
    import mlflow

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir(exist_ok=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run stages in a temporary folder: their relative output paths land there."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def tiny_cfg(tiny_mirror, tracking_store, workdir, monkeypatch) -> PipelineConfig:
    """The default config on tiny data: 1 epoch, the tiny mirror as MNIST_MIRROR."""
    folder, sha = tiny_mirror
    monkeypatch.setenv("MNIST_MIRROR", str(folder))
    return compose_config([*sha_overrides(sha), "train.epochs=1", "model.units=32"])


@pytest.fixture
def prepared(tiny_cfg) -> PipelineConfig:
    """``tiny_cfg`` with its data downloaded and preprocessed in the working folder."""
    from mnist_pipeline import download, preprocess

    download.download(tiny_cfg)
    preprocess.preprocess(tiny_cfg)
    return tiny_cfg


def start_stage(stage: str, cwd: Path, env: dict, *overrides: str, **popen) -> subprocess.Popen:
    """A stage as its own process (``python -m mnist_pipeline.<stage> overrides...``).

    Its stdout (a line per epoch) is discarded: a pipe nobody reads fills up and blocks a long
    training. Read stderr with ``communicate()``."""
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen(
        [sys.executable, "-m", f"mnist_pipeline.{stage}", *overrides], cwd=cwd, env=env, **popen
    )


@pytest.fixture(autouse=True)
def no_public_mirrors(monkeypatch):
    """Tests never reach the network: only the mirrors a test names are tried."""
    monkeypatch.setattr("mnist_pipeline.download.DEFAULT_MIRRORS", ())


@pytest.fixture
def https_mirror(tiny_mirror, tmp_path, monkeypatch):
    """A real HTTPS server on loopback serving the tiny files, good or broken by path.

    Timeouts and backoff are shortened so the failure tests take seconds."""
    import trustme

    from tests.https_mirror import MirrorServer

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.setattr("mnist_pipeline.download.TIMEOUT_S", 0.5)
    monkeypatch.setattr("mnist_pipeline.download.BACKOFF_S", 0.01)
    server = MirrorServer(tiny_mirror[0], ca_file, ca.issue_cert("127.0.0.1"))
    yield server
    server.close()


def run_pipeline(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """``python -m mnist_pipeline.pipeline args...`` (``-m`` among them for a sweep)."""
    return subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.pipeline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


#: The metrics every finished training run has.
HEADLINE = ("fit_accuracy", "train_accuracy", "test_accuracy", "accuracy_gap", "test_loss")


@pytest.fixture
def sweep(tiny_mirror, tracking_store, workdir):
    """Run a sweep on tiny data in a subprocess; return (the completed process, the sweep's
    parent run, its child runs)."""
    import mlflow

    folder, sha = tiny_mirror
    env = {**os.environ, "MNIST_MIRROR": str(folder)}

    def run(*overrides: str):
        result = run_pipeline(workdir, env, "-m", *sha_overrides(sha), "train.epochs=1", *overrides)
        parents = mlflow.search_runs(
            search_all_experiments=True,
            output_format="list",
            filter_string="tags.sweep_role = 'parent'",
        )
        assert len(parents) == 1, result.stderr[-3000:]
        parent = parents[0]
        sweep_id = parent.data.tags["sweep_parent"]
        children = mlflow.search_runs(
            search_all_experiments=True,
            output_format="list",
            filter_string=f"tags.sweep_id = '{sweep_id}'",
        )
        return result, parent, children

    return run
