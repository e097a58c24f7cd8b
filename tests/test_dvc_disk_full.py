"""Issue 25, classes 1 and 2 under DVC: a disk too full for the next run, through the real
`dvc repro`, in a DVC project whose data/ and DVC cache each live on a small tmpfs.

- The check stage, first under `dvc repro`, refuses when a disk the stages write to (here
  data/, or DVC's cache) has less free space than the last run wrote there, before DVC deletes
  a single output (``core.space``).
- Where the check does not run (only a stage's code changed) and DVC's own copy into its cache
  fills the disk, DVC fails with its `[Errno 28]` line; nothing in the cache is corrupt, `dvc
  status` says what is missing, and `dvc repro` after freeing space completes.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.helpers.faults import digests, fill, tmpfs
from tests.helpers.workspace import copy_reproduced

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

UP_TO_DATE = "Data and pipelines are up to date"


def dvc(args: list[str], repo: Path, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    if ok:
        assert result.returncode == 0, f"dvc {args}:\n{result.stdout}\n{result.stderr}"
    return result


def onto(stack: ExitStack, mount: Path, folder: Path, size: str) -> None:
    """A tmpfs of ``size`` at ``mount`` (until ``stack`` closes) holding a copy of
    ``folder``'s files, times kept."""
    stack.enter_context(tmpfs(mount, size))
    subprocess.run(["cp", "-a", f"{folder}/.", str(mount)], check=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_mirror, reproduced_template):
    """A copy of the session's reproduced project (its first `dvc repro` ran on the root
    disk: with no dvc.lock yet the check counts the full MNIST sizes), whose data/ and cache
    are then moved onto tmpfs mounts of their own."""
    tmp = tmp_path_factory.mktemp("dvc disks")
    repo, env = copy_reproduced(reproduced_template.folder, tmp / "repo", tiny_mirror[0])
    (repo / "data").rename(tmp / "data")
    (repo / "data").mkdir()
    with ExitStack() as stack:
        onto(stack, repo / "data", tmp / "data", "8m")
        onto(stack, tmp / "cache", repo / ".dvc/cache", "4m")
        dvc(["cache", "dir", "--local", str(tmp / "cache")], repo, env)
        assert UP_TO_DATE in dvc(["status"], repo, env).stdout
        yield repo, env, tmp / "cache"


def outputs(repo: Path) -> dict[str, str]:
    return {
        folder: digest
        for folder in ("data", "models", "reports")
        for digest in [str(sorted(digests(repo / folder).items()))]
    }


def cache_is_sound(cache: Path) -> int:
    """Every object in DVC's cache hashes to its name (a ``.dir`` listing too); DVC's hidden
    ``.….tmp`` copies that it left half-written are not objects. Returns the object count."""
    objects = [p for p in (cache / "files" / "md5").rglob("*") if p.is_file()]
    objects = [p for p in objects if not p.name.startswith(".")]
    for p in objects:
        name = p.parent.name + p.name.removesuffix(".dir")
        assert hashlib.md5(p.read_bytes()).hexdigest() == name, p
    return len(objects)


@pytest.mark.parametrize("disk", ["data", "cache"])
def test_the_check_refuses_a_disk_too_full_before_dvc_deletes_anything(project, disk):
    """The cache's disk needs room for a copy of every output; data/'s for the outputs that
    are not there (DVC deletes the others before their stage writes them again): here
    data/processed, deleted by hand. Refused before a single output goes; `dvc checkout`
    (after freeing space) brings the folder back."""
    repo, env, cache = project
    mount = {"data": repo / "data", "cache": cache}[disk]
    named = {"data": "data/processed", "cache": str(cache)}[disk]
    if disk == "data":
        shutil.rmtree(repo / "data/processed")
    before = outputs(repo)
    filler = fill(mount, leave=64 * 1024)
    try:
        result = dvc(["repro", "-f"], repo, env, ok=False)
    finally:
        filler.unlink()
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: not enough free space on the disk holding {named}: ")
    assert "the next stages need about" in errors[0] and "MB free; free space there" in errors[0]
    assert "Running stage 'download'" not in result.stdout
    assert outputs(repo) == before  # DVC deleted nothing
    dvc(["checkout"], repo, env)
    assert UP_TO_DATE in dvc(["status"], repo, env).stdout


def test_a_cache_filled_by_dvcs_own_copy_is_left_sound_and_repro_recovers(project):
    """Only evaluate's code changed, so the check stage does not run; DVC runs evaluate, then
    cannot copy its output into the full cache. One command after freeing space: dvc repro."""
    repo, env, cache = project
    (repo / "src/mnist_pipeline/stages/evaluate.py").open("a").write("# changed\n")
    objects = cache_is_sound(cache)
    filler = fill(cache)
    try:
        result = dvc(["repro"], repo, env, ok=False)
        assert result.returncode != 0
        assert "Running stage 'evaluate'" in result.stdout
        assert "[Errno 28] No space left on device" in result.stderr, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert cache_is_sound(cache) == objects  # nothing half-written under an object's name
        status = dvc(["status"], repo, env).stdout
        assert "evaluate" in status and UP_TO_DATE not in status  # it says what is missing
    finally:
        filler.unlink()
    result = dvc(["repro"], repo, env)
    assert "Running stage 'evaluate'" in result.stdout
    assert UP_TO_DATE in dvc(["status"], repo, env).stdout
    assert cache_is_sound(cache) >= objects
