"""The one helper that runs a server (``core.supervised``): started in a group of its own,
waited for until it answers, stopped with every process of its group."""

from __future__ import annotations

import os
import shlex
import sys
import time

import psutil
import pytest

from mnist_pipeline.core.supervised import Server, ServerExited, free_port


def test_a_server_that_answers_is_up_and_stops_with_its_children(tmp_path):
    port = free_port()
    # A shell leader with the real server as its child, as `mlflow server` has its workers.
    python = shlex.quote(sys.executable)  # the project may sit under a path with a space
    command = ["sh", "-c", f"{python} -m http.server {port} --bind 127.0.0.1 & wait"]
    with Server(command, f"http://127.0.0.1:{port}/", cwd=tmp_path) as server:
        assert server.wait_until_up(timeout_s=60) < 60
        children = psutil.Process(server.process.pid).children(recursive=True)
        assert children
    assert server.process.returncode is not None
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, alive


def test_a_server_that_dies_first_says_so():
    server = Server([sys.executable, "-c", "raise SystemExit(3)"], "http://127.0.0.1:9/")
    with pytest.raises(ServerExited) as exited:
        server.wait_until_up(timeout_s=60)
    assert exited.value.returncode == 3
    server.stop()


def test_a_server_that_never_answers_times_out_and_is_killed():
    port = free_port()  # nothing listens there
    server = Server(
        [sys.executable, "-c", "import time; time.sleep(600)"], f"http://127.0.0.1:{port}/"
    )
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        server.wait_until_up(timeout_s=1)
    server.stop(grace_s=1)
    assert time.monotonic() - started < 30
    with pytest.raises(ProcessLookupError):
        os.killpg(server.process.pid, 0)
