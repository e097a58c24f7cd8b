"""Issue 14, class 4: a moved or copied project works and writes only inside itself: its
store's artifact locations follow it, and ``make setup`` rebuilds a venv built elsewhere.
(A train run missing from the store, as after a teammate's ``dvc pull``, is in
test_store_faults.py::test_train_run_deleted_or_missing_stops_evaluate_before_any_change.)"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import mlflow
import pytest

from mnist_pipeline.core.project import PROJECT_ROOT
from tests.helpers.config import sha_overrides
from tests.helpers.processes import run_stage
from tests.helpers.store import seed
from tools.workspace import copy_project


def download(project: Path, mirror, uri: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MNIST_MIRROR": str(mirror[0]), "PYTHONPATH": str(project / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    result = run_stage("download", project, env, *sha_overrides(mirror[1]), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def locations(database: Path) -> list[str]:
    with sqlite3.connect(database) as con:
        rows = con.execute(
            "select artifact_location from experiments where name = 'mnist'"
        ).fetchall()
        rows += con.execute("select artifact_uri from runs").fetchall()
    return [r[0] for r in rows]


def logged_dicts(database: Path) -> list[dict]:
    mlflow.set_tracking_uri(f"sqlite:///{database}")
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        return [mlflow.artifacts.load_dict(f"runs:/{r.info.run_id}/download.json") for r in runs]
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_a_moved_project_logs_inside_itself(tmp_path, tiny_mirror, store_template):
    """``mv`` of the whole project, default store: the old runs' artifacts load from the new
    place and new ones go there; the old folder is not recreated."""
    old = copy_project(tmp_path / "old", commit=False)
    seed(store_template, old / "mlflow.db")
    download(old, tiny_mirror)
    new = tmp_path / "new"
    old.rename(new)
    result = download(new, tiny_mirror)
    assert "this store was moved or copied" in result.stdout + result.stderr
    assert not old.exists()
    assert all(
        loc.startswith((new / "mlartifacts").as_uri()) for loc in locations(new / "mlflow.db")
    )
    assert len(logged_dicts(new / "mlflow.db")) == 2  # the moved run's artifacts load too


@pytest.mark.slow
def test_a_copied_store_never_writes_into_the_original(tmp_path, tiny_mirror, store_template):
    original = tmp_path / "original"
    seed(store_template, original / "store" / "mlflow.db")
    download(original, tiny_mirror, f"sqlite:///{original / 'store' / 'mlflow.db'}")
    before = sorted(p.relative_to(original) for p in original.rglob("*"))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    download(copy, tiny_mirror, f"sqlite:///{copy / 'store' / 'mlflow.db'}")
    assert sorted(p.relative_to(original) for p in original.rglob("*")) == before
    assert all(
        loc.startswith((copy / "store" / "mlartifacts").as_uri())
        for loc in locations(copy / "store" / "mlflow.db")
    )
    assert all(
        loc.startswith((original / "store" / "mlartifacts").as_uri())
        for loc in locations(original / "store" / "mlflow.db")
    )
    assert len(logged_dicts(copy / "store" / "mlflow.db")) == 2


@pytest.fixture
def fake_uv(tmp_path):
    """A ``uv`` that records its calls and builds a venv whose scripts name where it is."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    uv = bin_dir / "uv"
    uv.write_text(
        "#!/bin/sh\n"
        'echo "$PWD $*" >> "$UV_LOG"\n'
        "mkdir -p .venv/bin\n"
        'printf "#!%s/.venv/bin/python\\n" "$PWD" > .venv/bin/dvc\n'
    )
    uv.chmod(0o755)
    log = tmp_path / "uv.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "UV_LOG": str(log)}
    return env, log


def make_project(folder: Path, env: dict) -> None:
    folder.mkdir()
    for name in ("Makefile", "pyproject.toml", "uv.lock"):
        shutil.copy(PROJECT_ROOT / name, folder / name)
    (folder / "tools").mkdir()
    (folder / "tools" / "plots_page.py").write_text("")  # setup's other step: not this test's
    subprocess.run(["make", "-s", "setup"], cwd=folder, env=env, check=True, capture_output=True)
    (folder / ".venv" / "marker").write_text("built here\n")


def setup(folder: Path, env: dict) -> str:
    result = subprocess.run(
        ["make", "setup"], cwd=folder, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_setup_refuses_a_path_with_a_percent_sign(tmp_path, fake_uv):
    """MLflow's migrations read `%` in the path of its package as configparser syntax
    (`invalid interpolation syntax`), and `.venv` lives inside the project: refused in one
    line, before anything is installed."""
    env, log = fake_uv
    folder = tmp_path / "p%41"
    folder.mkdir()
    for name in ("Makefile", "pyproject.toml", "uv.lock"):
        shutil.copy(PROJECT_ROOT / name, folder / name)
    result = subprocess.run(
        ["make", "setup"], cwd=folder, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "holds '%'" in errors[0], result.stderr
    assert not (folder / ".venv").exists() and not log.exists()


@pytest.mark.parametrize("how", ["mv", "cp", "stay"])
def test_make_setup_rebuilds_a_venv_built_elsewhere(tmp_path, fake_uv, how):
    env, log = fake_uv
    first = tmp_path / "first"
    make_project(first, env)
    target = {"mv": tmp_path / "moved", "cp": tmp_path / "copied", "stay": first}[how]
    if how == "mv":
        first.rename(target)
    elif how == "cp":
        shutil.copytree(first, target, symlinks=True)
    calls = len(log.read_text().splitlines())
    out = setup(target, env)
    if how == "stay":
        assert len(log.read_text().splitlines()) == calls
        assert (target / ".venv" / "marker").exists()
        return
    assert f"was built for {first}/.venv (the project moved): rebuilding it" in out
    assert log.read_text().splitlines()[-1].startswith(f"{target} sync --frozen")
    assert not (target / ".venv" / "marker").exists()  # the stale venv was removed
    assert (target / ".venv" / "bin" / "dvc").read_text().startswith(f"#!{target}/.venv/")
    calls = len(log.read_text().splitlines())
    setup(target, env)  # and then it is current: nothing more to do
    assert len(log.read_text().splitlines()) == calls
    if how == "cp":
        assert (first / ".venv" / "marker").exists()  # the original is left alone
