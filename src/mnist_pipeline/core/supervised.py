"""A server process, supervised: started in a process group of its own, waited for until its
health URL answers, and stopped with every process of its group (an ``mlflow server`` or
``mlflow models serve`` leaves its uvicorn workers running if only the leader is stopped).

The one way the project runs a server: ``make ui``, the tests' servers and the benchmark.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's pick), for a server about to start."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerExited(Exception):
    """The server ended before it answered; ``returncode`` says how."""

    def __init__(self, returncode: int) -> None:
        super().__init__(f"exited with status {returncode}")
        self.returncode = returncode


class Server:
    """``command`` running as its own process group until ``stop`` (or the ``with`` block) ends
    it. ``stdout``/``stderr`` as for ``subprocess.Popen`` (a file, ``PIPE``, ``DEVNULL``)."""

    def __init__(
        self,
        command: Sequence[str],
        health_url: str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        text: bool = False,
    ) -> None:
        self.health_url = health_url
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            list(command),
            env=env,
            cwd=cwd,
            stdout=stdout,
            stderr=stderr,
            text=text,
            start_new_session=True,
        )

    def wait_until_up(self, timeout_s: float, interval_s: float = 0.2) -> float:
        """Seconds from the start until the health URL answered (2xx). ``ServerExited`` if the
        process ends first, ``TimeoutError`` if it has not answered within ``timeout_s``."""
        deadline = self.started + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerExited(self.process.returncode)
            # An answer is a 2xx (urlopen raises HTTPError, an OSError, for 4xx and 5xx).
            with contextlib.suppress(OSError), urllib.request.urlopen(self.health_url, timeout=2):
                return time.monotonic() - self.started
            time.sleep(interval_s)
        raise TimeoutError(f"{self.health_url} did not answer within {timeout_s:.0f} s")

    def stop(self, grace_s: float = 20) -> None:
        """SIGTERM to the whole group; SIGKILL to what is left after ``grace_s``. The group is
        stopped even when its leader has already exited (its workers may not have)."""
        group = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _group_alive(group) and time.monotonic() < deadline:
            self.process.poll()  # reap the leader, or the group stays "alive" as a zombie
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.process.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
