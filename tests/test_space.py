"""The check stage's free-space estimate (``core.space``), in process: what counts, on which
disk. The refusal through `dvc repro` on a real full disk is test_dvc_disk_full.py's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mnist_pipeline.core import space

LOCK = """\
stages:
  preprocess:
    outs:
    - path: data/processed
      md5: 0123.dir
      size: 3000
    - path: reports/data.json
      size: 7
"""


def test_sizes_come_from_dvc_lock_and_the_known_sizes_fill_in(tmp_path):
    (tmp_path / "dvc.lock").write_text(LOCK)
    main = {"preprocess": tmp_path / "data/processed", "train": tmp_path / "models"}
    assert space.last_sizes(tmp_path / "dvc.lock", main) == [
        ("preprocess", tmp_path / "data/processed", 3000),
        ("preprocess", tmp_path / "reports/data.json", 7),
        ("train", tmp_path / "models", space.KNOWN_SIZES["train"]),
    ]
    (tmp_path / "dvc.lock").unlink()  # a fresh repository: the full MNIST run's sizes
    sizes = space.last_sizes(tmp_path / "dvc.lock", main)
    assert sizes[0] == ("preprocess", tmp_path / "data/processed", 70_000 * 784 + 71_196)


def test_what_each_disk_needs(tmp_path):
    """An output's growth over what is there (DVC deletes the old copy first), a copy of each
    in the cache, the model once more among the artifacts; the biggest need names the disk."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.keras").write_bytes(b"x" * 400)
    sizes = [
        ("preprocess", tmp_path / "data/processed", 3000),
        ("train", tmp_path / "models", 1000),
    ]
    [(named, need)] = space.needs(sizes, tmp_path / "cache", tmp_path / "mlartifacts").values()
    assert need == 3000 + (1000 - 400) + (3000 + 1000) + 1000
    assert named == tmp_path / "cache"
    [(named, need)] = space.needs(sizes, None, None).values()
    assert (named, need) == (tmp_path / "data/processed", 3600)


def test_a_cache_that_only_links_costs_no_copy(tmp_path):
    """Read with DVC's own config reader (``.dvc/config``, then ``config.local``)."""
    config = tmp_path / ".dvc" / "config"
    config.parent.mkdir()
    config.write_text("[core]\n    analytics = false\n")
    assert space.dvc_cache(tmp_path) == tmp_path / ".dvc" / "cache"
    config.write_text("[cache]\n    type = hardlink,symlink\n")
    assert space.dvc_cache(tmp_path) is None
    (config.parent / "config.local").write_text(
        "[cache]\n    type = reflink,copy\n    dir = /srv/c\n"
    )
    assert space.dvc_cache(tmp_path) == Path("/srv/c")
    assert space.dvc_cache(tmp_path / "not a repository") is None


def test_the_refusal_says_how_much_and_where(tmp_path):
    sizes = [("preprocess", tmp_path / "data/processed", 10**18)]  # more than any disk
    with pytest.raises(space.NotEnoughSpace) as refused:
        space.require_free_space(sizes, None, None)
    assert re.fullmatch(
        f"not enough free space on the disk holding {re.escape(str(tmp_path))}/data/processed: "
        f"the next stages need about {10**12} MB, [0-9]+ MB free; free space there and run again",
        str(refused.value),
    ), refused.value
    space.require_free_space([("preprocess", tmp_path / "data/processed", 1)], None, None)
