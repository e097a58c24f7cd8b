"""Stage 1, download: fetch the four MNIST files into ``data/raw`` from the first mirror
that serves them intact.

Mirrors are tried in order: ``$MNIST_MIRROR`` first (a folder, a ``file://`` URL or an
``https://`` URL), then the public HTTPS mirrors. Each file is verified by the SHA-256 of its
decompressed content before it is renamed into place, so a corrupt, truncated or wrong file
never reaches ``data/raw``. The mirror list is deliberately not a DVC param: where the bytes
came from does not change what the data is. This module does not import TensorFlow.

Reads:    $MNIST_MIRROR (a folder, file:// or https:// URL), else the public mirrors
Writes:   data/raw/ (the four .gz files, verified)
Logs:     an MLflow run `download`: the mirrors tried, download_seconds, raw_bytes
Main keys: data.sha256.* (the expected content checksums)
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from mnist_pipeline import tracking
from mnist_pipeline.core import atomic
from mnist_pipeline.core.config import PipelineConfig
from mnist_pipeline.core.errors import ConfigError, DataError
from mnist_pipeline.core.project import CONF_DIR
from mnist_pipeline.stages.artifacts import MNIST_FILES
from mnist_pipeline.stages.cli import run_stage

log = logging.getLogger(__name__)

DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MIRROR_ENV = "MNIST_MIRROR"
TIMEOUT_S = 30
RETRIES = 3  # attempts per file per mirror, for transient network errors only
BACKOFF_S = 1.0


class MirrorError(Exception):
    """This mirror cannot supply this file; the next mirror is tried."""


@dataclass(frozen=True)
class Mirror:
    """A place the files can come from: a local folder or an HTTPS base URL."""

    location: str  # a folder path or an https:// URL ending in /

    @classmethod
    def parse(cls, text: str) -> Mirror:
        parsed = urlparse(text)
        if parsed.scheme == "https":
            return cls(text if text.endswith("/") else text + "/")
        if parsed.scheme == "file":
            # file:///my%20work/mnist names the folder "/my work/mnist"
            return cls(url2pathname(parsed.path))
        if parsed.scheme == "":
            return cls(str(Path(text).expanduser().resolve()))
        raise ConfigError(
            f"mirror {text!r}: only https:// URLs, file:// URLs and local folders are accepted"
        )

    @property
    def is_local(self) -> bool:
        return not self.location.startswith("https://")

    def fetch(self, filename: str, dest: Path) -> None:
        """Copy or download ``filename`` to ``dest`` (a temporary path)."""
        if self.is_local:
            source = Path(self.location) / filename
            if not source.is_file():
                raise MirrorError(f"{source} does not exist")
            try:
                shutil.copyfile(source, dest)
            except OSError as exc:
                raise MirrorError(f"cannot read {source}: {exc.strerror or exc}") from None
        else:
            _download(self.location + filename, dest)

    def __str__(self) -> str:
        return self.location


def check_mirror_setting() -> None:
    """For the check stage, before DVC removes ``data/raw``: an ``$MNIST_MIRROR`` this stage
    could not use is refused (a scheme it does not take, a local folder that does not exist:
    a typo that would otherwise end in the public mirrors, or in no data offline)."""
    configured = os.environ.get(MIRROR_ENV, "").strip()
    if not configured:
        return
    mirror = Mirror.parse(configured)
    if mirror.is_local and not Path(mirror.location).is_dir():
        raise ConfigError(
            f"{MIRROR_ENV}={configured!r}: no such folder ({mirror.location}); point it at the "
            "folder holding the four MNIST .gz files, or unset it to use the public mirrors"
        )


def mirrors() -> list[Mirror]:
    """$MNIST_MIRROR first, when set, then the public mirrors."""
    configured = os.environ.get(MIRROR_ENV, "").strip()
    extra = [Mirror.parse(configured)] if configured else []
    return extra + [Mirror(url) for url in DEFAULT_MIRRORS]


def _is_transient(exc: Exception) -> bool:
    """Worth another try on the same mirror: server errors, timeouts, dropped connections.
    A 404 or 403 will not get better by asking again."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    return isinstance(
        exc, urllib.error.URLError | TimeoutError | ConnectionError | http.client.HTTPException
    )


def _describe(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed early: truncated after {len(exc.partial)} bytes"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot connect: {exc.reason}"
    if isinstance(exc, TimeoutError):
        return f"timed out (no data for {TIMEOUT_S} s)"
    return f"{type(exc).__name__}: {exc}"


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a mirror's redirect only to another https:// URL. urllib would follow one to
    plain http:// (a downgrade anyone on the path can tamper with, then recorded as the
    https mirror): that mirror is refused instead, with the reason."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if urlparse(newurl).scheme.lower() != "https":
            raise MirrorError(
                f"redirected ({code}) to {newurl}: refused, only https:// is followed"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, dest: Path) -> None:
    """Stream ``url`` to ``dest`` with a progress bar, retrying transient errors with backoff."""
    for attempt in range(1, RETRIES + 1):
        try:
            with (
                urllib.request.build_opener(_HttpsOnlyRedirects).open(
                    url, timeout=TIMEOUT_S
                ) as response,
                open(dest, "wb") as out,
            ):
                if "text/html" in response.headers.get("Content-Type", ""):
                    raise MirrorError("served an HTML page, not the file")
                total = int(response.headers.get("Content-Length") or 0) or None
                name = url.rsplit("/", 1)[-1]
                received = 0
                with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=None) as bar:
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                if total is not None and received != total:
                    raise MirrorError(f"connection closed early: truncated after {received} bytes")
            return
        except (OSError, http.client.HTTPException) as exc:
            if not _is_transient(exc) or attempt == RETRIES:
                raise MirrorError(_describe(exc)) from None
            delay = BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s: %s; retrying in %.1f s", url, _describe(exc), delay)
            time.sleep(delay)


def content_sha256(path: Path) -> str:
    """SHA-256 of a gzip file's decompressed content (what every honest mirror agrees on)."""
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except (OSError, EOFError) as exc:
        raise MirrorError(f"not a valid gzip file ({exc})") from None
    return digest.hexdigest()


def fetch_verified(
    filename: str, expected_sha256: str, sources: list[Mirror], dest: Path
) -> Mirror:
    """Put a verified copy of ``filename`` at ``dest``; return the mirror that served it."""
    failures = []
    for mirror in sources:
        try:
            # An exception leaving this block discards the temporary file: nothing unverified
            # is ever renamed to ``dest``.
            with atomic.atomic_path(dest) as tmp:
                mirror.fetch(filename, tmp)
                actual = content_sha256(tmp)
                if actual != expected_sha256:
                    raise MirrorError(
                        f"checksum mismatch (sha256 {actual}, want {expected_sha256})"
                    )
        except MirrorError as exc:
            log.warning("mirror %s failed for %s: %s", mirror, filename, exc)
            failures.append(f"  {mirror}: {exc}")
            continue
        log.info("%s: verified, from %s", filename, mirror)
        return mirror
    raise DataError(
        f"could not get a verified {filename} from any mirror; tried:\n"
        + "\n".join(failures)
        + f"\nSet {MIRROR_ENV} to a folder or URL that holds the MNIST files."
    )


def download(cfg: PipelineConfig) -> dict[str, str]:
    """Fetch every file not already present and verified; return file -> where it came from."""
    raw = Path(cfg.paths.raw)
    raw.mkdir(parents=True, exist_ok=True)
    sources = mirrors()
    origin: dict[str, str] = {}
    with tracking.start_run(cfg, "download", params={"mirrors": ", ".join(map(str, sources))}):
        started = time.perf_counter()
        for key, filename in MNIST_FILES.items():
            expected = getattr(cfg.data.sha256, key)
            dest = raw / filename
            if dest.exists() and _verified(dest, expected):
                origin[filename] = "already present"
                continue
            origin[filename] = str(fetch_verified(filename, expected, sources, dest))
        tracking.log_metrics(
            {
                "download_seconds": time.perf_counter() - started,
                "raw_bytes": sum((raw / f).stat().st_size for f in MNIST_FILES.values()),
            }
        )
        tracking.log_dict(
            {
                f: {"source": origin[f], "sha256": getattr(cfg.data.sha256, k)}
                for k, f in MNIST_FILES.items()
            },
            "download.json",
        )
    return origin


def _verified(path: Path, expected: str) -> bool:
    try:
        return content_sha256(path) == expected
    except MirrorError:
        return False


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_stage(download, cfg)
