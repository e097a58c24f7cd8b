"""Issue 14, class 8: when git cannot name the commit (not a repository, no git at all, no
commit yet, a repository owned by another user), the run records why, the stage says what to
do, and ``reproduce`` of such a run names the recorded reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.helpers.config import sha_overrides
from tests.helpers.faults import needs_root
from tests.helpers.processes import run_stage
from tools.workspace import GIT_IDENTITY


def git_repo(path: Path, commit: bool = True) -> None:
    env = {**os.environ, **GIT_IDENTITY}
    subprocess.run(["git", "init", "-q"], cwd=path, env=env, check=True)
    if commit:
        (path / "README").write_text("x\n")
        subprocess.run(["git", "add", "README"], cwd=path, env=env, check=True)
        subprocess.run(["git", "commit", "-qm", "x"], cwd=path, env=env, check=True)


def no_git_path() -> str:
    """A PATH with this Python's folder and nothing else: no git on it."""
    folder = str(Path(sys.executable).parent)
    assert shutil.which("git", path=folder) is None
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("case", ["not_a_repo", "no_git", "other_owner", "no_commit"])
def test_unreadable_provenance_is_recorded_and_shown(tmp_path, tiny_mirror, tracking_store, case):
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "MNIST_MIRROR": str(tiny_mirror[0])}
    # A global safe.directory (or a ceiling) would hide the problem under test.
    env["GIT_CONFIG_GLOBAL"] = str(tmp_path / "gitconfig")
    env["GIT_CEILING_DIRECTORIES"] = str(tmp_path)
    expected = {
        "not_a_repo": "is not in a git repository",
        "no_git": "git is not installed",
        "other_owner": "dubious ownership",
        "no_commit": "has no commit yet",
    }[case]
    if case == "no_git":
        git_repo(work)  # a fine repository, but no git binary to read it
        env["PATH"] = no_git_path()
    elif case == "other_owner":
        needs_root("giving the repository to another user")
        git_repo(work)
        subprocess.run(["chown", "-R", "65534:65534", str(work)], check=True)
        os.chmod(work, 0o777)  # the stage (root) still writes its outputs there
    elif case == "no_commit":
        git_repo(work, commit=False)
    result = run_stage("download", work, env, *sha_overrides(tiny_mirror[1]), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = result.stdout + result.stderr
    assert "the code version is not recorded" in shown and expected in shown, shown[-3000:]
    if case == "other_owner":
        assert f"git config --global --add safe.directory {work}" in shown
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.tags["git.commit"] == "unknown"
    assert expected in run.data.tags["git.error"]
    assert "Traceback" not in shown


def test_reproduce_names_the_recorded_reason(tmp_path, tracking_store):
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("mnist")
    tags = {
        "stage": "train",
        "model_uri": "m",
        "uv.lock.sha256": "x",
        "git.commit": "unknown",
        "git.error": "git is not installed (or not on PATH): install git",
    }
    run_id = client.create_run(experiment, tags=tags).info.run_id
    result = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.reproduce", run_id],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "recorded no git commit" in last and "when it ran: git is not installed" in last
