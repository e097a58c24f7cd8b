"""The project set up for the tiny data set in a fresh git repository (``tools.workspace`` makes
the copy; the benchmark uses that too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mnist_pipeline.core.params import compose_params
from mnist_pipeline.core.project import PROJECT_ROOT
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
    env = {
        **os.environ,
        "MNIST_MIRROR": str(mirror),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **GIT_IDENTITY,
    }
    git_commit(repo, env)
    return repo, env


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
