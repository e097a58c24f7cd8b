"""Issue 14, class 1: the tracking store's storage fails. Through the real stage command, on a
real full disk (a small tmpfs), a read-only mount, a corrupt file, a held lock, a foreign
schema and an experiment or run deleted in the UI: one ``error:`` line naming the cause and
the recovery, no output changed, no run left RUNNING once the store can be written, and a
rerun after the fix that just works."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest

from mnist_pipeline.stages import download
from mnist_pipeline.tracking.address import sqlite_path
from tests.helpers.config import compose_config, sha_overrides
from tests.helpers.data import make_mirror
from tests.helpers.faults import digests, fill, one_error_line, tmpfs
from tests.helpers.processes import run_stage
from tests.helpers.store import seed

#: Every test here runs the real commands in subprocesses (make test-fast skips them).
pytestmark = [pytest.mark.slow, pytest.mark.heavy]


@pytest.fixture
def disk(tmp_path):
    with tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


def stage(name: str, work: Path, uri: str, mirror: Path, sha: dict, *extra: str):
    env = {**os.environ, "MNIST_MIRROR": str(mirror), "MLFLOW_TRACKING_URI": uri}
    return run_stage(name, work, env, *sha_overrides(sha), *extra, timeout=300)


def runs(uri: str) -> list:
    return mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(tracking_uri=uri).search_experiments()]
    )


@pytest.fixture
def project(tmp_path, tiny_mirror, store_template, monkeypatch):
    """A working folder after one good download run into a store at the given path.

    The good run is in-process (a subprocess pays seconds of imports); every fault meets
    the real command. MLflow's engine for the store, cached for the process, takes NullPool:
    no connection stays open between calls, so a test can remount the store's disk read-only."""
    folder, sha = tiny_mirror

    def first_run(store: Path, work: Path = tmp_path / "work") -> tuple[Path, str]:
        seed(store_template, store)
        uri = f"sqlite:///{store}"
        work.mkdir()
        with monkeypatch.context() as scope:
            scope.chdir(work)
            scope.setenv("MLFLOW_TRACKING_URI", uri)
            scope.setenv("MNIST_MIRROR", str(folder))
            scope.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")  # MLflow caches it
            mlflow.set_tracking_uri(uri)
            try:
                download.download(compose_config(sha_overrides(sha)))
            finally:
                mlflow.set_tracking_uri(None)
        return work, uri

    return first_run


def test_full_disk_under_the_store(project, disk, tiny_mirror):
    work, uri = project(disk / "mlflow.db")
    before = digests(work / "data")
    filler = fill(disk)
    result = stage("download", work, uri, *tiny_mirror)
    one_error_line(result, "no space left on the disk holding", "free space")
    assert digests(work / "data") == before
    filler.unlink()
    result = stage("download", work, uri, *tiny_mirror)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [r for r in runs(uri) if r.info.status == "RUNNING"]


def test_full_artifact_disk_ends_the_run_failed_with_the_reason(project, disk, tmp_path):
    """The database can still be written, its artifact folder cannot: the run ends FAILED
    with the reason (nothing is left RUNNING for a later run to guess about)."""
    work, uri = project(tmp_path / "store" / "mlflow.db")
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("full", artifact_location=disk.as_uri())
    fill(disk)
    mirror = tmp_path / "mirror2"
    sha = make_mirror(mirror)
    result = stage("download", work, uri, mirror, sha, "tracking.experiment_name=full")
    # The OS does not always name the file (a write in the middle of a copy): the line then
    # names the kinds of place instead.
    one_error_line(result, "no space left on", "free space there")
    (failed,) = [r for r in runs(uri) if r.info.status != "FINISHED"]
    assert failed.info.status == "FAILED"
    assert "No space left on device" in failed.data.tags["error"]


def test_read_only_store(project, disk, tiny_mirror):
    work, uri = project(disk / "mlflow.db")
    before = digests(work / "data")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    result = stage("download", work, uri, *tiny_mirror)
    one_error_line(result, "is read-only", "make it writable")
    assert result.seconds < 150 and digests(work / "data") == before
    subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    result = stage("download", work, uri, *tiny_mirror)
    assert result.returncode == 0, result.stderr[-3000:]


def test_corrupt_store(project, tmp_path, tiny_mirror):
    work, uri = project(tmp_path / "store" / "mlflow.db")
    before = digests(work / "data")
    database = tmp_path / "store" / "mlflow.db"
    with open(database, "r+b") as f:
        f.write(b"\x00garbage" * 16)
    result = stage("download", work, uri, *tiny_mirror)
    one_error_line(result, "is corrupt", "restore a backup")
    assert digests(work / "data") == before
    database.rename(tmp_path / "store" / "mlflow.db.broken")  # the recovery the line gives
    result = stage("download", work, uri, *tiny_mirror)
    assert result.returncode == 0, result.stderr[-3000:]


HOLDER = """
import sqlite3, sys, time

con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute(sys.argv[2])
con.execute("select count(*) from runs").fetchone()
print("holding", flush=True)
time.sleep(300)
"""


#: Three ways another process holds the store (each met by its own stage, all at once: the
#: stages wait out the lock timeout side by side).
HOLDS = (
    "begin exclusive",
    "begin immediate",  # a writer's transaction left open
    "begin",  # a notebook's read transaction: a writer cannot commit past it
)


def test_store_held_by_another_process(project, tmp_path, tiny_mirror):
    cases = [
        project(tmp_path / f"store{i}" / "mlflow.db", tmp_path / f"work{i}") for i in (0, 1, 2)
    ]
    before = [digests(work / "data") for work, _ in cases]
    holders = []
    try:
        for (_, uri), begin in zip(cases, HOLDS, strict=True):
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLDER, sqlite_path(uri), begin],
                stdout=subprocess.PIPE,
                text=True,
            )
            holders.append(holder)
            assert holder.stdout.readline().strip() == "holding"
        with ThreadPoolExecutor(len(cases)) as pool:
            stages = list(
                pool.map(lambda case: stage("download", case[0], case[1], *tiny_mirror), cases)
            )
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    for begin, result, (work, _), then in zip(HOLDS, stages, cases, before, strict=True):
        one_error_line(result, "is locked by another process", "close it")
        assert result.seconds < 150 and digests(work / "data") == then, begin
    result = stage("download", *cases[2], *tiny_mirror)  # the lock gone, the stage just works
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    ("revision", "words"),
    [
        ("0a8213491aaa", ("made by an older MLflow", "mlflow db upgrade")),
        ("ffffffffffff", ("made by a newer MLflow",)),
    ],
)
def test_store_from_another_mlflow_version(project, tmp_path, tiny_mirror, revision, words):
    work, uri = project(tmp_path / "store" / "mlflow.db")
    with sqlite3.connect(tmp_path / "store" / "mlflow.db") as con:
        con.execute("update alembic_version set version_num = ?", (revision,))
    result = stage("download", work, uri, *tiny_mirror)
    one_error_line(result, *words)


def test_experiment_deleted_in_the_ui(project, tmp_path, tiny_mirror):
    work, uri = project(tmp_path / "store" / "mlflow.db")
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("mnist").experiment_id
    client.delete_experiment(experiment)
    result = stage("download", work, uri, *tiny_mirror)
    one_error_line(
        result, "was deleted", f"mlflow experiments restore --experiment-id {experiment}"
    )
    client.restore_experiment(experiment)
    result = stage("download", work, uri, *tiny_mirror)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("case", ["deleted", "missing"])
def test_train_run_deleted_or_missing_stops_evaluate_before_any_change(
    project, tmp_path, tiny_mirror, case
):
    """The run models/run.json names was deleted in the UI, or is not in this store at all
    (models/ came by `dvc pull`): one line, before any report is touched."""
    work, uri = project(tmp_path / "store" / "mlflow.db")
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.get_experiment_by_name("mnist").experiment_id).info.run_id
    if case == "deleted":
        client.delete_run(run_id)
    else:
        run_id = "f" * 32
    (work / "models").mkdir()
    (work / "models" / "run.json").write_text(json.dumps({"run_id": run_id}))
    (work / "reports").mkdir()
    (work / "reports" / "metrics.json").write_text("{}\n")
    result = stage("evaluate", work, uri, *tiny_mirror)
    if case == "deleted":
        one_error_line(result, "was deleted", f"mlflow runs restore --run-id {run_id}")
    else:
        one_error_line(result, "is not in the MLflow store", "dvc repro -f train")
    assert (work / "reports" / "metrics.json").read_text() == "{}\n"
    assert sorted(os.listdir(work / "reports")) == ["metrics.json"]
