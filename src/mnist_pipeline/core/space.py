"""Free space, checked before DVC deletes anything: the check stage's estimate of what the next
stages will write, disk by disk, against what each disk has free.

A stage that runs out of space half-way fails cleanly (``atomic``: nothing replaced), but under
``dvc repro`` DVC has deleted that stage's outputs before running it, so the check stage, which
runs first, refuses a disk that is too full. What a run needs free, per disk:

- each output's new copy, less the old copy that DVC deletes before it runs the stage: the
  growth of an output, its whole size when it is not there (a fresh clone, a deleted folder).
  (A stage writes its outputs under temporary names beside their destinations and renames
  them into place, so a stage run by hand, which deletes nothing, needs the whole size.)
- each output again in DVC's cache (``dvc repro`` copies what a stage wrote there) unless the
  cache is configured to link files only; with the cache on the outputs' disk (the default,
  ``.dvc/cache``) and no outputs yet, that makes twice the outputs' size;
- the model once more in the MLflow artifact folder (the train stage logs it).

The sizes are those of the last run, which ``dvc.lock`` records for each output; an output it
does not list yet (a fresh repository) counts with the size the full MNIST run writes
(``KNOWN_SIZES``). Every stage counts, as under ``dvc repro -f``: an upper bound when fewer
stages re-run, or when a re-run writes what the cache already holds. Nothing here imports
MLflow or TensorFlow: the check stays a second long.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import yaml

from mnist_pipeline.core.errors import PipelineError

MB = 1_000_000

#: What each stage writes on the full MNIST data (dvc.lock of `make repro`), for an output
#: that dvc.lock does not list: the four gzipped files; the uint8 arrays, 70000 x 784 bytes,
#: and their labels; the Keras model and run record; the reports.
KNOWN_SIZES = {
    "download": 11_401_738,
    "preprocess": 70_000 * 784 + 71_196,
    "train": 3_276_723,
    "evaluate": 50_568,
}

#: The stage whose outputs are logged to MLflow as an artifact copy (the model).
LOGGED_STAGE = "train"


class NotEnoughSpace(PipelineError):
    """A disk the next stages write to has less free space than they need."""


def last_sizes(lock: Path, main_outputs: dict[str, Path]) -> list[tuple[str, Path, int]]:
    """(stage, output path, bytes) for every output the stages wrote in the last run, from
    ``dvc.lock``; a stage of ``main_outputs`` (stage -> its main output) that the lock does not
    list counts with ``KNOWN_SIZES`` at that path."""
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):  # no dvc.lock yet, or one DVC will refuse itself
        stages = {}
    sizes = []
    for stage, main in main_outputs.items():
        outs = (stages.get(stage) or {}).get("outs") or []
        known = [(o["path"], o["size"]) for o in outs if "path" in o and "size" in o]
        if not known:
            known = [(str(main), KNOWN_SIZES.get(stage, 0))]
        sizes += [(stage, lock.parent / path, int(size)) for path, size in known]
    return sizes


def dvc_cache(folder: Path) -> Path | None:
    """DVC's cache folder for the repository at ``folder`` (``cache.dir`` from its config,
    else ``.dvc/cache``), or None where it makes no copies: not a DVC repository, or a cache
    set to link files only (``cache.type`` without ``copy`` or ``reflink``, which shares
    blocks on file systems that have it and copies elsewhere)."""
    dvc_dir = folder / ".dvc"
    if not dvc_dir.is_dir():
        return None
    from dvc.config import Config  # a fifth of a second: only for a DVC repository

    cache = Config(dvc_dir=str(dvc_dir))["cache"]
    types = cache.get("type") or ["reflink", "copy"]
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",")]
    if not {"copy", "reflink"} & set(types):
        return None
    return dvc_dir / cache.get("dir", "cache")  # an absolute cache.dir replaces the join


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing folder: an output that is not there yet is written
    to the disk of the folder it goes in."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def present(path: Path) -> int:
    """Bytes ``path`` holds now: a file's size, a folder's files', 0 when it is not there."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def needs(
    sizes: Iterable[tuple[str, Path, int]], cache: Path | None, artifacts: Path | None
) -> dict[int, tuple[Path, int]]:
    """Bytes each disk (by device number) must have free, and the path that needs most of it
    there (what the message names)."""
    per_disk: dict[int, dict[Path, int]] = {}

    def add(path: Path, size: int) -> None:
        disk = per_disk.setdefault(os.stat(_existing(path)).st_dev, {})
        disk[path] = disk.get(path, 0) + size

    for stage, path, size in sizes:
        add(path, max(0, size - present(path)))  # the new copy, once DVC deleted the old
        if cache is not None:
            add(cache, size)
        if artifacts is not None and stage == LOGGED_STAGE:
            add(artifacts, size)
    return {
        dev: (max(paths, key=paths.__getitem__), sum(paths.values()))
        for dev, paths in per_disk.items()
    }


def require_free_space(
    sizes: Iterable[tuple[str, Path, int]], cache: Path | None, artifacts: Path | None
) -> None:
    """Raise ``NotEnoughSpace`` naming the first disk that has less free than ``needs``."""
    for path, need in needs(sizes, cache, artifacts).values():
        free = shutil.disk_usage(_existing(path)).free
        if free < need:
            raise NotEnoughSpace(
                f"not enough free space on the disk holding {path}: the next stages need "
                f"about {math.ceil(need / MB)} MB, {free // MB} MB free; free space there "
                "and run again"
            )
