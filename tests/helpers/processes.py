"""The project's commands as subprocesses, the way users and DVC start them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from mnist_pipeline.stages.artifacts import HEADLINE_METRICS

#: The metrics every finished training run has.
HEADLINE = HEADLINE_METRICS


def start_stage(stage: str, cwd: Path, env: dict, *overrides: str, **popen) -> subprocess.Popen:
    """A stage as its own process (``python -m mnist_pipeline.<stage> overrides...``).

    Its stdout (a line per epoch) is discarded: a pipe nobody reads fills up and blocks a long
    training. Read stderr with ``communicate()``."""
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen(
        [sys.executable, "-m", f"mnist_pipeline.{stage}", *overrides], cwd=cwd, env=env, **popen
    )


def run_pipeline(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """``python -m mnist_pipeline.pipeline args...`` (``-m`` among them for a sweep)."""
    return subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.pipeline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def run_stage(
    stage: str, cwd: Path, env: dict, *overrides: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    """A stage (or any other command: ``python -m mnist_pipeline.<stage> args...``) as its own
    process, run to the end; ``.seconds`` says how long it took."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", f"mnist_pipeline.{stage}", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result.seconds = time.monotonic() - started
    return result


def kill_when(
    proc: subprocess.Popen, ready, timeout: float = 120, signum: int = signal.SIGKILL
) -> None:
    """Send ``signum`` (SIGKILL) to ``proc`` the moment ``ready()`` is true (polled every
    2 ms): a kill point that waits for a marker, never for a sleep."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before the kill point: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.002)
    proc.send_signal(signum)
    proc.wait(timeout=60)
    # SIGKILL ends it at once; a stage exits 128 + N on SIGINT and SIGTERM (stages.cli).
    assert proc.returncode in (-signum, 128 + signum), proc.returncode
