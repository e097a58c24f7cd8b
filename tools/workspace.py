"""A runnable copy of the project in a fresh git repository: what the end-to-end tests and the
benchmark run `dvc repro` in, so they never touch the real workspace, its data or its store."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from mnist_pipeline.core.project import PROJECT_ROOT

#: A git identity for the commits tests make (and `dvc exp run` makes): a CI machine may
#: have none configured.
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}

#: What every Python process of a test run loads at start-up (``tools/testrun``: the network
#: audit, on while its log is named in the environment, and coverage's cost cut).
TESTRUN = Path(__file__).parent / "testrun"
NETAUDIT_ENV = "MNIST_NETAUDIT_LOG"

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
    if os.environ.get(NETAUDIT_ENV):  # a test run: its DVC stages load the same start-up
        for module in TESTRUN.glob("*.py"):
            shutil.copy(module, dest / "src" / module.name)
    if commit:
        git_commit(dest, env)
    return dest


def git_commit(repo: Path, env: dict[str, str] | None = None, message: str = "copy") -> None:
    """``git init`` (if needed), add everything, commit: DVC experiments need a commit."""
    env = {**(os.environ if env is None else env), **GIT_IDENTITY}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", message]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
