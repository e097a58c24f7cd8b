"""The download stage: mirror order, checksum rejection, fallback, atomic output."""

import gzip
import logging
import shutil

import mlflow
import pytest

from mnist_pipeline.core.errors import ConfigError, DataError
from mnist_pipeline.stages.artifacts import MNIST_FILES
from mnist_pipeline.stages.download import Mirror, download, mirrors


def raw_files(cfg):
    from pathlib import Path

    return sorted(p.name for p in Path(cfg.paths.raw).iterdir())


def test_downloads_and_verifies_from_local_mirror(tiny_cfg, tiny_mirror):
    origin = download(tiny_cfg)
    assert raw_files(tiny_cfg) == sorted(MNIST_FILES.values())
    assert set(origin.values()) == {str(tiny_mirror[0])}
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.data.tags["stage"] == "download"
    assert run.data.metrics["raw_bytes"] > 0


def test_corrupt_mirror_before_good_one_falls_back(
    tiny_cfg, tiny_mirror, tmp_path, monkeypatch, caplog
):
    good, _ = tiny_mirror
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    name = MNIST_FILES["train_labels"]
    # Valid gzip, wrong content: only the content checksum can catch it.
    (bad / name).write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x05"))
    # Truncated gzip for another file.
    images = MNIST_FILES["test_images"]
    (bad / images).write_bytes((good / images).read_bytes()[:100])
    monkeypatch.setattr("mnist_pipeline.stages.download.DEFAULT_MIRRORS", (str(good),))
    monkeypatch.setenv("MNIST_MIRROR", str(bad))

    with caplog.at_level(logging.WARNING):
        origin = download(tiny_cfg)

    assert origin[name] == str(good)
    assert origin[images] == str(good)
    assert origin[MNIST_FILES["train_images"]] == str(bad)
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert f"mirror {bad} failed for {name}: checksum mismatch" in warnings
    assert f"mirror {bad} failed for {images}: not a valid gzip file" in warnings


def test_all_mirrors_failing_is_one_clear_error_and_no_output(tiny_cfg, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MNIST_MIRROR", f"file://{empty}")
    with pytest.raises(DataError) as err:
        download(tiny_cfg)
    message = str(err.value)
    assert "from any mirror; tried:" in message
    assert str(empty) in message and "does not exist" in message
    assert "MNIST_MIRROR" in message
    assert raw_files(tiny_cfg) == []  # no partial or temporary file left behind
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.info.status == "FAILED"


def test_present_and_verified_files_are_kept(tiny_cfg, tiny_mirror, monkeypatch):
    from pathlib import Path

    download(tiny_cfg)
    monkeypatch.setenv("MNIST_MIRROR", "/nonexistent")
    assert set(download(tiny_cfg).values()) == {"already present"}
    # A damaged file already in place is fetched again, not trusted.
    damaged = Path(tiny_cfg.paths.raw) / MNIST_FILES["test_labels"]
    damaged.write_bytes(gzip.compress(b"junk"))
    monkeypatch.setenv("MNIST_MIRROR", str(tiny_mirror[0]))
    origin = download(tiny_cfg)
    assert origin[damaged.name] == str(tiny_mirror[0])
    assert damaged.read_bytes() == (tiny_mirror[0] / damaged.name).read_bytes()


def test_mirror_forms(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_MIRROR", "https://example.org/mnist")
    assert str(mirrors()[0]) == "https://example.org/mnist/"
    assert Mirror.parse(f"file://{tmp_path}").location == str(tmp_path)
    assert Mirror.parse(str(tmp_path)).is_local
    for insecure in ("http://example.org/mnist/", "ftp://example.org/"):
        with pytest.raises(ConfigError, match="only https:// URLs"):
            Mirror.parse(insecure)
