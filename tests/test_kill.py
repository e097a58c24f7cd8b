"""SIGKILL at the worst moment: while an output file is being written. No output path may
then hold a partial file, and running the stage again must complete with the same result."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mnist_pipeline.stages.artifacts import MNIST_FILES
from mnist_pipeline.stages.download import content_sha256
from tests.helpers.config import sha_overrides
from tests.helpers.data import make_mirror
from tests.helpers.processes import kill_when, start_stage

pytestmark = pytest.mark.slow


def finish(stage: str, cwd: Path, env: dict, *overrides: str) -> None:
    """Run a stage to the end; it must succeed."""
    proc = start_stage(stage, cwd, env, *overrides)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def writing(folder: Path) -> bool:
    """A temporary file is open in ``folder``: a write is under way."""
    return folder.exists() and any(folder.glob(".*.tmp*"))


def visible(folder: Path) -> list[Path]:
    return (
        sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []
    )


@pytest.fixture
def env(tracking_store, workdir):
    return dict(os.environ)


def test_kill_download_mid_file(tiny_cfg, tiny_mirror, https_mirror, workdir, env):
    env["MNIST_MIRROR"] = https_mirror.url("slow")
    proc = start_stage("download", workdir, env, *sha_overrides(tiny_mirror[1]))
    raw = workdir / "data/raw"
    kill_when(proc, lambda: writing(raw))
    for path in visible(raw):  # whatever is at an output path is whole and verified
        key = next(k for k, v in MNIST_FILES.items() if v == path.name)
        assert content_sha256(path) == tiny_mirror[1][key]
    finish("download", workdir, env, *sha_overrides(tiny_mirror[1]))
    assert [p.name for p in visible(raw)] == sorted(MNIST_FILES.values())


def test_kill_preprocess_mid_array(workdir, env, tmp_path):
    mirror = tmp_path / "big"
    sha = make_mirror(mirror, train_size=30000)  # large enough to catch it writing
    env["MNIST_MIRROR"] = str(mirror)
    overrides = sha_overrides(sha)
    finish("download", workdir, env, *overrides)
    out = workdir / "data/processed"
    kill_when(start_stage("preprocess", workdir, env, *overrides), lambda: writing(out))
    for path in visible(out):
        if path.suffix == ".npy":
            np.load(path, allow_pickle=False)  # a partial .npy would fail to load
    assert not (out / "manifest.json").exists()  # no manifest vouches for a half-written set
    finish("preprocess", workdir, env, *overrides)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shapes"]["x_train"] == [30000, 784]


def test_kill_train_mid_fit_then_same_result(tiny_cfg, tiny_mirror, workdir, env):
    from mnist_pipeline.stages import download, preprocess, train

    download.download(tiny_cfg)
    preprocess.preprocess(tiny_cfg)
    overrides = [*sha_overrides(tiny_mirror[1]), "train.epochs=1", "model.units=32"]
    history = workdir / "reports/train_history.csv"
    proc = start_stage(
        "train", workdir, env, *overrides[:-2], "train.epochs=100000", "model.units=32"
    )
    import mlflow

    def fitting() -> bool:
        return bool(
            mlflow.search_runs(
                search_all_experiments=True,
                output_format="list",
                filter_string="tags.stage = 'train' and attributes.status = 'RUNNING'",
            )
        )

    kill_when(proc, fitting)
    assert not (workdir / "models/model.keras").exists()
    assert not (workdir / "models/run.json").exists()
    assert not history.exists()

    finish("train", workdir, env, *overrides)
    rerun = json.loads((workdir / "models/run.json").read_text())["train_metrics"]
    uninterrupted = train.train(tiny_cfg)  # same config, in this process
    assert rerun == {k: float(v) for k, v in uninterrupted.items()}
    killed = mlflow.search_runs(
        search_all_experiments=True,
        output_format="list",
        filter_string="attributes.status = 'KILLED'",
    )
    assert len(killed) == 1  # the dead run was closed when the next one started
