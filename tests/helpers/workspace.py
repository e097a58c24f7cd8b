"""The project set up for the tiny data set in a fresh git repository (``tools.workspace`` makes
the copy; the benchmark uses that too), and the same project reproduced once per test session
(``reproduce_template``), copied for each module that needs a trained project
(``copy_reproduced``): a cold `dvc repro` costs about 23 s of CPU, a copy well under one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mnist_pipeline.core.params import compose_params
from mnist_pipeline.core.project import PROJECT_ROOT
from mnist_pipeline.tracking.address import sqlite_uri
from mnist_pipeline.tracking.store import _follow_moved_store
from tests.helpers.config import edit_yaml
from tools.workspace import GIT_IDENTITY, copy_project, git_commit


def tiny_dvc_project(
    tmp_path: Path, mirror: Path, sha: dict[str, str]
) -> tuple[Path, dict[str, str]]:
    """A git repository under ``tmp_path`` holding the project set up for the tiny data set
    (``mirror``, with its ``sha`` checksums) and a 1-epoch, 32-unit training, committed; and
    the environment to run `dvc` in there: the tiny mirror, a store of its own, this
    interpreter's tools first on PATH, a git identity (`dvc exp run` makes commits)."""
    repo = copy_project(tmp_path / "repo", commit=False)
    use_tiny_data(repo, sha)
    env = project_env(mirror, tmp_path / STORE)
    git_commit(repo, env)
    return repo, env


#: The MLflow store's database and its artifacts' folder (``tracking.store.artifact_folder``),
#: side by side: beside the repository in ``tiny_dvc_project``, in it for the project's default.
STORE, ARTIFACTS = "mlflow.db", "mlartifacts"


def project_env(mirror: Path, database: Path) -> dict[str, str]:
    """The environment to run `dvc` in a tiny project: the tiny ``mirror``, the store at
    ``database`` (an absolute URI), this interpreter's tools first on PATH, a git identity."""
    return {
        **os.environ,
        "MNIST_MIRROR": str(mirror),
        "MLFLOW_TRACKING_URI": sqlite_uri(database),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **GIT_IDENTITY,
    }


def reproduce_template(folder: Path, mirror: Path, sha: dict[str, str]) -> str:
    """The tiny project reproduced in ``folder`` (``repo/``, its store beside it): a cold
    `dvc repro` with the stages' own log settings (as a user runs it), its results committed
    (as in the real repository after `make repro`). Returns what that repro printed
    (stdout, then stderr): the one cold repro of a test session, which tests read."""
    repo, env = tiny_dvc_project(folder, mirror, sha)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    first = subprocess.run(
        ["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    said = first.stdout + first.stderr
    if first.returncode != 0:
        raise AssertionError(f"the template's dvc repro failed:\n{said[-5000:]}")
    git_commit(repo, env, message="results")
    return said


def copy_reproduced(
    template: Path, repo: Path, mirror: Path, store_in_repo: bool = False
) -> tuple[Path, dict[str, str]]:
    """A copy at ``repo`` of the project ``reproduce_template`` made in ``template``: git
    history, DVC cache, outputs and MLflow store, files' times kept (DVC and git re-hash a
    file whose times changed). The store goes beside ``repo``, as ``tiny_dvc_project`` lays
    it out, or in it (``store_in_repo``: where a plain `mlflow ui` there finds it). The
    store's artifact locations are absolute: the project's own relocation of a copied store
    points them at the copy now, so no later command warns, or writes to the template. DVC's
    ``.dvc/tmp`` (locks, queue, experiments' state) is the template's own: not copied. Returns
    the repository and the environment to run `dvc` there (the tiny ``mirror``)."""
    shutil.copytree(template / "repo", repo, ignore=_dvc_tmp)
    store = repo if store_in_repo else repo.parent
    for name in os.listdir(template):
        if name.startswith(STORE) and not name.endswith(".lock"):
            shutil.copy2(template / name, store / name)
    shutil.copytree(template / ARTIFACTS, store / ARTIFACTS)
    old, new = ((folder / ARTIFACTS).as_uri() for folder in (template, store))
    _follow_moved_store(store / STORE, old, new)
    return repo, project_env(mirror, store / STORE)


def _dvc_tmp(folder: str, names: list[str]) -> list[str]:
    return ["tmp"] if Path(folder).name == ".dvc" else []


def use_tiny_data(repo: Path, sha: dict[str, str]) -> None:
    """Set the project at ``repo`` up for the tiny data set (its ``sha`` checksums) and a
    1-epoch, 32-unit training, params.yaml composed again as `make params` would."""
    edit_yaml(repo / "conf/data/mnist.yaml", **{f"sha256.{k}": v for k, v in sha.items()})
    edit_yaml(repo / "conf/train/default.yaml", epochs=1)
    edit_yaml(repo / "conf/model/mlp.yaml", units=32)
    (repo / "params.yaml").write_text(compose_params(config_dir=str(repo / "conf")))


def clone_project(origin: Path, dest: Path) -> Path:
    """``git clone`` of the project's working tree, as a user's fresh clone: its files as
    they are now (uncommitted edits and new files included, ignored ones not) are committed
    in a repository at ``origin``, which is cloned to ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        if (PROJECT_ROOT / name).is_file():  # a file deleted but not yet staged is listed
            (origin / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, origin / name)
    git_commit(origin)
    env = {**os.environ, **GIT_IDENTITY}
    subprocess.run(["git", "clone", "-q", str(origin), str(dest)], env=env, check=True)
    return dest
