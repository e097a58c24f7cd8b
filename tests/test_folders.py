"""Issue 25, class 6: a fresh clone in a folder with any name the file system allows, its
`.venv` inside it, runs `make setup`, `make repro` (on the tiny data), part of `make
test-fast`, and `make ui`, and writes nothing outside itself.

One clone, in one temporary tree whose path holds every kind of name at once: folders named
``#``, ``?``, ``&``, ``données é`` (a space and non-ASCII), the project itself in a folder of
200 characters (so the venv's scripts' ``#!`` line is too long for the kernel and uv writes
them as shell trampolines). A name that breaks any step breaks this clone; ``%``, which
``make setup`` refuses, is test_moved_project.py's. Building the venv (uv's cache, bytecode
compiled) and running the pipeline take minutes: the ``folders`` tier (``make test-folders``),
outside ``make test``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mnist_pipeline.core.supervised import free_port
from tests.helpers.workspace import clone_project, use_tiny_data
from tools.workspace import git_commit

pytestmark = pytest.mark.folders

NAMES = ("#", "?", "&", "données é")
#: The fast tier's files that depend on where the project is: the default store beside it,
#: Hydra's plugins from its src/, `make help` in it.
FAST_PART = "tests/test_tracking.py tests/test_workflow_fast.py"


def project_folder(root: Path) -> Path:
    name = "project " + "é" * 8
    return root.joinpath(*NAMES, name + "x" * (200 - len(name)))


def make(target: str, repo: Path, env: dict, *args: str, timeout: float = 900):
    result = subprocess.run(
        ["make", target, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"make {target}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def answers(url: str, timeout: float) -> int:
    """The HTTP status of ``url`` once something answers there, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def everything_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if ".venv" not in p.parts}


@pytest.fixture
def env(tiny_mirror):
    """A user's shell: the tiny mirror, the project's own store (no MLFLOW_TRACKING_URI), and
    nothing of this test run's venv or coverage."""
    drop = ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV", "PYTHONPATH")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("COV_CORE_", "COVERAGE_", "PYTEST_"))
    }
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
    return {**env, "MNIST_MIRROR": str(tiny_mirror[0])}


@pytest.mark.timeout(900)  # a venv, the pipeline and part of a tier: about 2 minutes at idle
def test_a_clone_in_oddly_named_folders_sets_up_runs_tests_and_serves(tmp_path, tiny_mirror, env):
    repo = clone_project(tmp_path / "origin", project_folder(tmp_path / "tree"))
    use_tiny_data(repo, tiny_mirror[1])
    git_commit(repo, message="tiny data")  # as committed params: test_workflow_fast checks
    outside = everything_under(tmp_path / "tree") - everything_under(repo)

    make("setup", repo, env)
    assert (repo / ".venv/bin/python").exists()
    assert (repo / ".venv/bin/dvc").read_text().startswith("#!/bin/sh")  # the long-path form

    make("repro", repo, env)
    assert (repo / "reports/metrics.json").is_file()
    assert (repo / "mlflow.db").is_file()  # the default store, beside the project
    status = subprocess.run(
        [".venv/bin/dvc", "status"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert "Data and pipelines are up to date" in status.stdout, status.stdout

    fast = make("test-fast", repo, env, f"TESTS={FAST_PART} -p no:cacheprovider")
    assert " passed" in fast.stdout and " failed" not in fast.stdout, fast.stdout[-2000:]

    port = free_port()
    ui = subprocess.Popen(
        ["make", "ui", f"PORT={port}"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert answers(f"http://127.0.0.1:{port}/", timeout=180) == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as health:
            assert health.read().strip() == b"OK"
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
    # nothing was made beside the project or in the folders above it (a percent-encoded
    # twin of a folder, say)
    assert everything_under(tmp_path / "tree") - everything_under(repo) == outside
