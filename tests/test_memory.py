"""Issue 14, class 6: memory runs out. A network that cannot fit is refused in one line before
anything is allocated (the machine's memory, a cgroup limit); a run the kernel's OOM killer
ends is marked KILLED as likely out of memory by the next run, through the real commands."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest

from mnist_pipeline import memory
from tests.helpers.config import sha_overrides
from tests.helpers.faults import needs_root


def cgroup_v1() -> Path:
    """A fresh memory cgroup (v1) under this process's own; removed by the caller."""
    needs_root("creating a memory cgroup")
    own = memory.memory_cgroup()
    if own is None or not (own / "memory.limit_in_bytes").exists():
        pytest.skip("no cgroup v1 memory controller here")
    folder = own / f"mnist-test-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    return folder


def remove_cgroup(folder: Path) -> None:
    for _ in range(50):
        try:
            folder.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def train(work: Path, sha: dict, *overrides: str, cgroup: Path | None = None, **popen):
    command = [sys.executable, "-m", "mnist_pipeline.train", *sha_overrides(sha), *overrides]
    if cgroup is not None:  # join the cgroup, then become the stage
        command = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", *command]
    return subprocess.Popen(
        command,
        cwd=work,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.units=100000000"],  # the example seen: 78 billion parameters
        ["model.layers=40", "model.units=60000"],
        ["model.units=3000000", "optimizer=adam"],
    ],
)
def test_a_network_that_cannot_fit_is_refused_before_allocating(
    seeded_store, prepared, tiny_mirror, workdir, overrides
):
    started = time.monotonic()
    proc = train(workdir, tiny_mirror[1], *overrides)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert time.monotonic() - started < 120
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: out of memory before starting: training needs at least")
    assert "lower model.units" in lines[-1]
    # the tightest limit is named: the machine's memory, or a container's cgroup
    assert "available on this machine" in lines[-1] or "memory cgroup" in lines[-1]
    assert "Traceback" not in err
    assert not (workdir / "models" / "model.keras").exists()
    assert not mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string="tags.stage = 'train'"
    )  # refused before any run was opened


def test_a_cgroup_limit_is_honoured_before_allocating(seeded_store, prepared, tiny_mirror, workdir):
    """2.4 GiB of training state fits this machine but not a 1 GiB cgroup: refused, naming it."""
    folder = cgroup_v1()
    try:
        (folder / "memory.limit_in_bytes").write_text(str(1 << 30))
        proc = train(workdir, tiny_mirror[1], "model.units=200000", cgroup=folder)
        _, err = proc.communicate(timeout=300)
    finally:
        remove_cgroup(folder)
    assert proc.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "out of memory before starting" in last and f"memory cgroup {folder}" in last, last


def test_an_oom_killed_run_is_marked_likely_out_of_memory(
    seeded_store, prepared, tiny_mirror, workdir
):
    """A real OOM kill: the limit is lowered to just above what the training uses once its run
    is open; the kernel kills it (SIGKILL) as it grows; the next run, of any stage, marks the
    run KILLED and says it was likely out of memory."""
    from mnist_pipeline import download

    folder = cgroup_v1()
    try:
        proc = train(
            workdir, tiny_mirror[1], "train.epochs=100000", "model.units=256", cgroup=folder
        )
        deadline = time.monotonic() + 300
        running = []
        while not running and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            running = mlflow.search_runs(
                search_all_experiments=True,
                output_format="list",
                filter_string="tags.stage = 'train' and attributes.status = 'RUNNING'",
            )
        assert running, proc.communicate()[1][-3000:]
        time.sleep(2)  # into the epochs
        usage = int((folder / "memory.usage_in_bytes").read_text())
        limit = usage + (4 << 20)
        while proc.poll() is None and limit > 64 << 20:  # tighten until the kernel acts
            # EBUSY: the kernel cannot shrink it below what is in use; try lower next time
            with contextlib.suppress(OSError):
                (folder / "memory.limit_in_bytes").write_text(str(limit))
            time.sleep(1)
            limit -= 8 << 20
        proc.wait(timeout=120)
        oom_counter = (folder / "memory.oom_control").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        remove_cgroup(folder)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert "oom_kill 0" not in oom_counter
    download.download(prepared)  # the next run, of any stage
    run = mlflow.get_run(running[0].info.run_id)
    assert run.info.status == "KILLED"
    assert "likely out of memory" in run.data.tags["error"]
    assert "out-of-memory killer ran" in run.data.tags["error"]
