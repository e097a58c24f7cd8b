"""Real faults for the reliability tests: a small file system of its own that can be filled or
made read-only, and the check that a command failed the way the project promises."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def needs_root(what: str) -> None:
    """Skip without root; in CI (``MNIST_REQUIRE_SERVICES``, run as root) fail instead."""
    if os.geteuid() != 0:
        message = f"{what} needs root"
        if os.environ.get("MNIST_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real file system of ``size`` (e.g. ``2m``) mounted at ``mount``, unmounted after."""
    needs_root("mounting a tmpfs")
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system holding ``folder`` to the last byte, or to ``leave`` bytes
    (rounded to 4 KiB blocks) before it; return the filler file."""
    filler = folder / "filler"
    count = [] if not leave else [f"count={(shutil.disk_usage(folder).free - leave) // 4096}"]
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k", *count], capture_output=True)
    return filler


def one_error_line(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 1, no traceback, exactly one ``error:`` line, holding each of ``words``."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def digests(folder: Path, skip: tuple[str, ...] = ("filler",)) -> dict[str, str]:
    """Every file under ``folder`` (by relative path) and its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }
