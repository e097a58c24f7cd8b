"""Atomic writes: a stage killed at any moment leaves either the old file or the new one.

Everything is written to a temporary file in the destination's folder, flushed to disk, and
renamed into place; a rename within one filesystem is atomic on POSIX. A stage's outputs as a
whole are staged (``staged``): put in place together, only when the stage has succeeded.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mnist_pipeline.core import diagnosis
from mnist_pipeline.core.errors import DataError, PipelineError

#: A write that failed with no errno while its disk has less than this left ran out of space.
FULL_MARGIN = 1 << 20


def full_disk(exc: OSError, files: dict[Path, Path]) -> OSError | None:
    """``exc`` as the ENOSPC it is, naming the output (a key of ``files``, final path ->
    temporary path) whose disk is full, when ``exc`` says a disk is full without naming one
    (NumPy raises with no errno and no file name), or has no errno while a file's disk has
    under ``FULL_MARGIN`` left. None when it is another error or already names the place."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and exc.filename:
        return None
    said = diagnosis.is_full_disk(exc)
    if not files or not (said or exc.errno is None):
        return None
    try:  # on the error path: a folder that is gone must not replace the error being reported
        free = {final: shutil.disk_usage(tmp.parent).free for final, tmp in files.items()}
    except OSError:
        return None
    final = min(free, key=free.__getitem__)
    if not said and free[final] >= FULL_MARGIN:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    ``suffix`` keeps an extension that a writer insists on (Keras refuses to save a model
    to a name that does not end in ``.keras``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        full = full_disk(exc, {path: tmp_path})
        if full is None:
            raise
        raise full from exc
    finally:
        tmp_path.unlink(missing_ok=True)


class Staged:
    """A stage's outputs, written under hidden temporary names and put in place together,
    only when the whole stage has succeeded (see ``staged``).

    Each file is staged as ``<folder>/.<name>.<random>.tmp/<name>``: the same name (a logged
    artifact keeps it; Keras wants ``.keras``) on the same file system (the rename is
    atomic). A stage that fails half-way (a full disk, a store that cannot be written, params
    that changed under it) replaces nothing: the last good run's outputs stay as they were."""

    def __init__(self) -> None:
        self._files: dict[Path, Path] = {}
        self._seals: list[Path] = []

    def path(self, final: str | Path, seal: bool = False) -> Path:
        """Where to write the file that will become ``final``. A ``seal`` (a manifest that
        vouches for the other files) is removed first and put in place last, so a process
        killed between two renames never leaves an old seal over a mix of files."""
        final = Path(final)
        if seal:
            self._seals.append(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
        os.chmod(folder, 0o777 & ~_umask())
        self._files[final] = folder / final.name
        return self._files[final]

    def commit(self) -> None:
        """Every byte on disk first, then the renames (seals last)."""
        for tmp in self._files.values():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for final in self._seals:
            final.unlink(missing_ok=True)
        for final in sorted(self._files, key=lambda final: final in self._seals):
            os.replace(self._files[final], final)

    @property
    def files(self) -> dict[Path, Path]:
        """Final path -> where it is being written."""
        return dict(self._files)

    def discard(self) -> None:
        for tmp in self._files.values():
            shutil.rmtree(tmp.parent, ignore_errors=True)


@contextmanager
def staged() -> Iterator[Staged]:
    """Outputs that appear all at once when the block succeeds, and not at all otherwise."""
    outputs = Staged()
    try:
        yield outputs
        outputs.commit()
    except OSError as exc:
        full = full_disk(exc, outputs.files)
        if full is None:
            raise
        raise full from exc
    finally:
        outputs.discard()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def require(path: str | Path, produced_by: str) -> Path:
    """An upstream stage's output, or a message that says which stage to run first."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} not found: run the {produced_by} stage first (dvc repro)")
    return path


def read_json(path: str | Path, produced_by: str) -> Any:
    """Read a JSON file an upstream stage writes; say which stage to run when it is missing."""
    path = require(path, produced_by)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is corrupt ({exc}): re-run the {produced_by} stage") from None
