"""Atomic writes: a stage killed at any moment leaves either the old file or the new one.

Everything is written to a temporary file in the destination's folder, flushed to disk, and
renamed into place; a rename within one filesystem is atomic on POSIX.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mnist_pipeline.errors import DataError, PipelineError


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
    finally:
        tmp_path.unlink(missing_ok=True)


def pyplot() -> Any:
    """Matplotlib's pyplot on the file-only Agg backend (stages run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> None:
    """Save a Matplotlib figure as PNG, atomically, and free it."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)


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
