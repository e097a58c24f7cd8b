"""One writer at a time across processes: an exclusive lock on a file (``flock``).

What a database cannot make atomic for us is made so here: MLflow moves a registered model's
alias with no compare-and-set, so two ``register --promote`` at once could both read the same
champion and the last writer would win against the rule. The lock is released by the kernel
when its holder exits, killed or not, so a crash never leaves it stuck.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mnist_pipeline.core.errors import PipelineError


@contextmanager
def exclusive(path: Path, what: str, timeout_s: float = 300.0) -> Iterator[None]:
    """Hold the lock on ``path`` (the file is created if needed; its folder must exist: a
    lock never makes folders) for the block. When another process holds it, say once on
    stderr that this one waits for ``what``, and wait up to ``timeout_s`` before refusing
    in one line."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout_s
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    print(f"waiting: another process holds {path} ({what})", file=sys.stderr)
                    waiting = True
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"{what} still runs after {timeout_s:.0f} s (it holds {path}): "
                        "run again when it has finished"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock
