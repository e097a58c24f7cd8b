"""A runnable copy of the project in a fresh git repository: what the end-to-end tests and the
benchmark run `dvc repro` in, so they never touch the real workspace, its data or its store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mnist_pipeline.core.params import compose_params
from mnist_pipeline.core.project import PROJECT_ROOT
from tests.helpers.config import edit_yaml

#: A git identity for the commits tests make (and `dvc exp run` makes): a CI machine may
#: have none configured.
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}

#: What a copy needs to run the pipeline (uncommitted edits included).
PROJECT_FILES = (
    "dvc.yaml",
    "params.yaml",
    "conf",
    "src",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
)


def copy_project(dest: Path, env: dict[str, str] | None = None, commit: bool = True) -> Path:
    """Copy the project's files to ``dest`` and make it a git repository with one commit."""
    for name in PROJECT_FILES:
        src, dst = PROJECT_ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    if commit:
        git_commit(dest, env)
    return dest


def git_commit(repo: Path, env: dict[str, str] | None = None, message: str = "copy") -> None:
    """``git init`` (if needed), add everything, commit: DVC experiments need a commit."""
    env = {**(os.environ if env is None else env), **GIT_IDENTITY}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", message]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)


def tiny_dvc_project(
    tmp_path: Path, mirror: Path, sha: dict[str, str]
) -> tuple[Path, dict[str, str]]:
    """A git repository under ``tmp_path`` holding the project set up for the tiny data set
    (``mirror``, with its ``sha`` checksums) and a 1-epoch, 32-unit training, committed; and
    the environment to run `dvc` in there: the tiny mirror, a store of its own, this
    interpreter's tools first on PATH, a git identity (`dvc exp run` makes commits)."""
    repo = copy_project(tmp_path / "repo", commit=False)
    edit_yaml(repo / "conf/data/mnist.yaml", **{f"sha256.{k}": v for k, v in sha.items()})
    edit_yaml(repo / "conf/train/default.yaml", epochs=1)
    edit_yaml(repo / "conf/model/mlp.yaml", units=32)
    (repo / "params.yaml").write_text(compose_params(config_dir=str(repo / "conf")))
    env = {
        **os.environ,
        "MNIST_MIRROR": str(mirror),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **GIT_IDENTITY,
    }
    git_commit(repo, env)
    return repo, env
