"""Issue 14, class 2: the data disk fills during preprocess, train or evaluate. Through the
real stage commands on a real full file system (a small tmpfs): one ``error:`` line, no output
replaced by the failed run's, the run FAILED with the reason, and a rerun after freeing space
that just works (the good runs are in-process: a subprocess pays seconds of imports)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from mnist_pipeline.stages import download, evaluate, preprocess, train
from tests.helpers.config import compose_config, sha_overrides
from tests.helpers.faults import digests, fill, one_error_line, tmpfs
from tests.helpers.processes import run_stage

#: Every test here runs the real commands in subprocesses (make test-fast skips them).
pytestmark = pytest.mark.slow


@pytest.fixture
def disk(tmp_path):
    with tmpfs(tmp_path / "disk", "3m") as mount:
        yield mount


def run(name: str, work: Path, sha: dict, *overrides: str):
    return run_stage(name, work, dict(os.environ), *sha_overrides(sha), *overrides)


def last_run(stage: str):
    return mlflow.search_runs(
        search_all_experiments=True,
        output_format="list",
        filter_string=f"tags.stage = '{stage}'",
        order_by=["attributes.start_time DESC"],
    )[0]


def no_staging_left(folder: Path) -> bool:
    return not list(folder.rglob(".*.tmp"))


def test_preprocess_on_a_full_disk_replaces_nothing(tiny_cfg, tiny_mirror, workdir, disk):
    download.download(tiny_cfg)
    sha = tiny_mirror[1]
    where = [f"paths.processed={disk / 'processed'}", f"paths.reports={disk / 'reports'}"]
    preprocess.preprocess(compose_config([*sha_overrides(sha), *where]))
    before = digests(disk)
    filler = fill(disk)
    result = run("preprocess", workdir, sha, *where, "data.val_split=0.25")
    one_error_line(result, "no space left on", "free space", "no output was replaced")
    assert digests(disk) == before  # the old arrays, manifest and statistics
    assert no_staging_left(disk)
    assert last_run("preprocess").info.status == "FAILED"
    filler.unlink()
    preprocess.preprocess(compose_config([*sha_overrides(sha), *where, "data.val_split=0.25"]))
    assert digests(disk) != before


def test_preprocess_when_the_arrays_do_not_fit_replaces_nothing(
    tiny_cfg, tiny_mirror, workdir, disk
):
    """Room for a header but not for an array: NumPy raises an OSError with no errno ("N
    requested and M written", or "Not enough free space to write ...") that names no file.
    Still one line that names the disk, and nothing replaced."""
    download.download(tiny_cfg)
    sha = tiny_mirror[1]
    where = [f"paths.processed={disk / 'processed'}", f"paths.reports={disk / 'reports'}"]
    preprocess.preprocess(compose_config([*sha_overrides(sha), *where]))
    before = digests(disk)
    filler = fill(disk, leave=64 * 1024)  # a few pages: less than x_train.npy
    result = run("preprocess", workdir, sha, *where, "data.val_split=0.25")
    line = one_error_line(result, "no space left on", str(disk / "processed"), "free space")
    assert ".npy" in line, line
    assert digests(disk) == before
    assert no_staging_left(disk)
    assert last_run("preprocess").info.status == "FAILED"
    filler.unlink()


def test_train_and_evaluate_on_a_full_disk_replace_nothing(prepared, tiny_mirror, workdir, disk):
    sha = tiny_mirror[1]
    where = [f"paths.models={disk / 'models'}", f"paths.reports={disk / 'reports'}"]
    common = ["train.epochs=1", "model.units=32", *where]
    (disk / "reports").mkdir()
    (disk / "models").mkdir()
    for name, folder in (("train_history.csv", "reports"), ("model.keras", "models")):
        (disk / folder / name).write_text("the last good run's\n")
    before = digests(disk)

    filler = fill(disk)
    result = run("train", workdir, sha, *common)
    one_error_line(result, "no space left on", "free space", "no output was replaced")
    assert digests(disk) == before and no_staging_left(disk)
    failed = last_run("train")
    assert failed.info.status == "FAILED" and "No space left" in failed.data.tags["error"]

    filler.unlink()
    cfg = compose_config([*sha_overrides(sha), *common])
    train.train(cfg)
    trained = digests(disk)
    assert trained["models/model.keras"] != before["models/model.keras"]

    (disk / "reports" / "metrics.json").write_text("the last good run's\n")
    trained = digests(disk)
    filler = fill(disk)
    result = run("evaluate", workdir, sha, *common)
    one_error_line(result, "no space left on", "free space", "no output was replaced")
    assert digests(disk) == trained and no_staging_left(disk)
    # evaluate adds to the train run: the failure is recorded there
    assert "No space left" in last_run("train").data.tags["error"]
    filler.unlink()
    evaluate.evaluate(cfg)
    assert digests(disk)["reports/metrics.json"] != trained["reports/metrics.json"]
