"""The download stage against a real HTTPS mirror on loopback that misbehaves in every way
a public mirror can: each bad mirror is reported by name and reason and the next is used."""

import logging
from pathlib import Path

import pytest

from mnist_pipeline.core.errors import DataError
from mnist_pipeline.core.supervised import free_port
from mnist_pipeline.stages.artifacts import MNIST_FILES
from mnist_pipeline.stages.download import download


def use_mirrors(monkeypatch, *urls: str) -> None:
    monkeypatch.setenv("MNIST_MIRROR", urls[0])
    monkeypatch.setattr("mnist_pipeline.stages.download.DEFAULT_MIRRORS", tuple(urls[1:]))


def test_good_https_mirror(tiny_cfg, https_mirror, monkeypatch):
    use_mirrors(monkeypatch, https_mirror.url("good"))
    origin = download(tiny_cfg)
    assert set(origin.values()) == {https_mirror.url("good")}
    assert len(list(Path(tiny_cfg.paths.raw).iterdir())) == 4


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("corrupt", "checksum mismatch"),
        ("truncated", "truncated after"),
        ("notgzip", "not a valid gzip file"),
        ("html", "served an HTML page"),
        ("missing", "HTTP 404"),
        ("hang", "timed out"),
    ],
)
def test_bad_mirror_falls_back_to_the_next(
    tiny_cfg, https_mirror, monkeypatch, caplog, behaviour, reason
):
    bad = https_mirror.url(behaviour)
    use_mirrors(monkeypatch, bad, https_mirror.url("good"))
    with caplog.at_level(logging.WARNING):
        origin = download(tiny_cfg)
    assert set(origin.values()) == {https_mirror.url("good")}
    failures = [r.getMessage() for r in caplog.records if "failed for" in r.getMessage()]
    assert len(failures) == 4
    assert all(f"mirror {bad} failed" in f and reason in f for f in failures), failures


def test_connection_refused_falls_back(tiny_cfg, https_mirror, monkeypatch, caplog):
    refused = f"https://127.0.0.1:{free_port()}/"
    use_mirrors(monkeypatch, refused, https_mirror.url("good"))
    with caplog.at_level(logging.WARNING):
        download(tiny_cfg)
    assert "cannot connect" in caplog.text and refused in caplog.text


def test_transient_errors_are_retried_on_the_same_mirror(tiny_cfg, https_mirror, monkeypatch):
    use_mirrors(monkeypatch, https_mirror.url("flaky"))
    origin = download(tiny_cfg)
    assert set(origin.values()) == {https_mirror.url("flaky")}
    assert https_mirror.requests["flaky"] == 8  # a 503, then the file, for each of 4 files


def test_not_found_is_not_retried(tiny_cfg, https_mirror, monkeypatch):
    use_mirrors(monkeypatch, https_mirror.url("missing"), https_mirror.url("good"))
    download(tiny_cfg)
    assert https_mirror.requests["missing"] == len(MNIST_FILES)


def test_every_mirror_failing(tiny_cfg, https_mirror, monkeypatch):
    mirrors = [https_mirror.url(b) for b in ("corrupt", "missing", "html")]
    use_mirrors(monkeypatch, *mirrors)
    with pytest.raises(DataError) as err:
        download(tiny_cfg)
    message = str(err.value)
    for url, reason in zip(
        mirrors, ("checksum mismatch", "HTTP 404", "served an HTML page"), strict=True
    ):
        assert f"{url}: {reason}" in message
    assert list(Path(tiny_cfg.paths.raw).iterdir()) == []
