"""Names for MLflow runs that say where a run came from, the same in ``mlflow ui`` and ``compare``.

Every run of one pipeline run (the download, preprocess and train runs of one ``dvc repro``)
shares one *pipeline run name*; the train run carries it as its run name, the other stages
add theirs in brackets (``repro 11-30 04:12:33 (download)``). The name is:

- the DVC experiment's name, for ``dvc exp run`` (DVC gives every stage ``DVC_EXP_NAME``);
- for a plain ``dvc repro``: the command and the start time of the ``dvc`` process that runs
  the stages. The stages are separate processes, so this is the one thing all of them see;
- for a sweep job: its own overrides (``units=128 epochs=20``), set by ``sweep``;
- otherwise (a stage or the pipeline started by hand): ``run`` and the process's start time.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

#: MLflow keeps run names up to 250 characters; long override lists are cut well before.
MAX_LENGTH = 200
_TIME = "%m-%d %H:%M:%S"


def run_name(stage: str, pipeline_run: str) -> str:
    """The run name of ``stage`` within the pipeline run named ``pipeline_run``: the train run
    (the one with the results) is the pipeline run; the others say their stage."""
    name = pipeline_run if stage == "train" else f"{pipeline_run} ({stage})"
    return name[:MAX_LENGTH]


def pipeline_run_name(environ: dict[str, str] | None = None, proc: Path = Path("/proc")) -> str:
    """The name shared by the stage runs of this pipeline run (see the module docstring)."""
    environ = os.environ if environ is None else environ
    if environ.get("DVC_EXP_NAME"):
        return environ["DVC_EXP_NAME"]
    pid = os.getpid()
    for _ in range(32):  # up the process tree to the `dvc` that started this stage
        info = _process(proc, pid)
        if info is None:
            break
        ppid, started, argv = info
        command = _dvc_command(argv)
        if command is not None and started is not None:
            return f"{command} {started:{_TIME}}"
        if ppid <= 1:
            break
        pid = ppid
    own = _process(proc, os.getpid())
    started = own[1] if own and own[1] else datetime.now()
    return f"run {started:{_TIME}}"


def job_name(job_overrides: list[str], sweep_overrides: list[str], job_num: int) -> str:
    """A sweep job's name: the overrides that make it differ from the other jobs, keys
    shortened to their last part (``model.units=128 train.epochs=20`` -> ``units=128
    epochs=20``). Overrides given to the whole sweep (``train.epochs=1`` with no list) are
    left out; a job with nothing of its own is ``job<n>``."""
    fixed = set(sweep_overrides)
    own = [o for o in job_overrides if o not in fixed and "=" in o]
    if not own:
        return f"job{job_num}"
    keys = [o.split("=", 1)[0] for o in own]
    short = [k.rsplit(".", 1)[-1] for k in keys]
    if len(set(short)) < len(short):  # ambiguous once shortened: keep the full keys
        short = keys
    parts = [f"{s}={o.split('=', 1)[1]}" for s, o in zip(short, own, strict=True)]
    return " ".join(parts)[:MAX_LENGTH]


def _dvc_command(argv: list[str]) -> str | None:
    """``repro`` (or another DVC command) when ``argv`` runs DVC, else None. DVC runs as
    ``dvc ...``, ``python .../bin/dvc ...`` or ``python -m dvc ...``."""
    for i, arg in enumerate(argv[:3]):
        is_dvc = os.path.basename(arg) == "dvc" or (arg == "dvc" and i > 0 and argv[i - 1] == "-m")
        if is_dvc:
            words = [a for a in argv[i + 1 :] if not a.startswith("-")]
            return words[0] if words else "dvc"
    return None


def _process(proc: Path, pid: int) -> tuple[int, datetime | None, list[str]] | None:
    """(parent pid, start time, arguments) of ``pid`` from Linux's /proc; None elsewhere or
    when it is gone."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        argv = (proc / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and ")"
    try:
        ppid, ticks = int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None
    return ppid, _boot_time(proc, ticks), [a for a in argv if a]


def _boot_time(proc: Path, ticks: int) -> datetime | None:
    """The wall-clock time ``ticks`` clock ticks after boot."""
    try:
        for line in (proc / "stat").read_text().splitlines():
            if line.startswith("btime "):
                boot = int(line.split()[1])
                return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        pass
    return None
