"""What produced a run and what it takes to run it again: git state, software versions, the
resolved config and the flags that change numerics. ``reproduce`` checks a run against these.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mnist_pipeline.core import memory
from mnist_pipeline.core.project import project_root
from mnist_pipeline.tracking.dvcfiles import dirty_check_args

log = logging.getLogger(__name__)

#: The run's full resolved config, logged as an artifact of every training run.
CONFIG_ARTIFACT = "config.json"
#: Set by a launcher that knows the network address of the node a job runs on (the Ray
#: launcher, from Ray's node address): recorded as the run's ``process.address``, since hosts
#: may share a hostname (containers, network namespaces) and ``process.host`` alone would not
#: say which one ran it.
NODE_ADDRESS_ENV = "MNIST_NODE_ADDRESS"
#: Packages whose versions a run records (``version.<name>`` tags).
PACKAGES = ("tensorflow", "keras", "mlflow", "dvc", "hydra-core", "numpy")


#: Packages that may be installed under another distribution's name: MLflow's client alone is
#: ``mlflow-skinny`` (an environment without the UI, such as a serving image's).
DISTRIBUTIONS = {"mlflow": ("mlflow", "mlflow-skinny")}


def package_version(name: str) -> str:
    for distribution in DISTRIBUTIONS.get(name, (name,)):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return "not installed"


def git(*args: str) -> str | None:
    """``git args`` in the working directory; None when git or the repository is missing."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def uncommitted_changes() -> str | None:
    """``git status`` of tracked files minus what DVC manages (``dvcfiles``, read from
    dvc.yaml): DVC rewrites dvc.lock and params.yaml and removes a stage's outputs before it
    runs, and the run records the full config anyway. None when git cannot tell (no
    repository)."""
    top = git("rev-parse", "--show-toplevel")
    if not top:
        return None
    return git(*dirty_check_args(Path(top)))


def provenance_tags() -> dict[str, str]:
    """Tags that say what produced a run: code version and the software that ran it. When git
    cannot name the commit, the run records why (``git.error``) and the stage warns."""
    commit = git("rev-parse", "HEAD")
    status = uncommitted_changes() if commit else None
    tags = {
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
        "python.version": platform.python_version(),
        "process.host": socket.gethostname(),
        "process.pid": str(os.getpid()),
        # The kernel's OOM-kill counters now: if the process dies, the next run compares.
        "process.oom_kills": memory.snapshot_tag(),
    }
    if os.environ.get(NODE_ADDRESS_ENV):
        tags["process.address"] = os.environ[NODE_ADDRESS_ENV]
    if commit is None:
        tags["git.error"] = git_problem()
        log.warning("the code version is not recorded: %s", tags["git.error"])
    for package in PACKAGES:
        tags[f"version.{package}"] = package_version(package)
    return tags


def git_problem() -> str:
    """Why git cannot name the commit being run, and what to do about it."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except FileNotFoundError:
        return "git is not installed (or not on PATH): install git so runs record their code"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"git could not run ({exc})"
    err = out.stderr.strip()
    if "dubious ownership" in err:
        match = re.search(r"repository at '([^']+)'", err)
        where = match.group(1) if match else os.getcwd()
        return (
            f"git refuses the repository {where}: it is owned by another user (dubious "
            f"ownership); if you trust it: git config --global --add safe.directory {where}"
        )
    if "not a git repository" in err:
        return (
            f"{os.getcwd()} is not in a git repository: run the pipeline from a clone of the "
            "project (or git init && git commit)"
        )
    if "ambiguous argument 'HEAD'" in err or "unknown revision" in err:
        return "the repository has no commit yet: commit the code (git commit)"
    return " ".join(err.split())[:300] or f"git rev-parse HEAD exited {out.returncode}"


def numerics_tags(data_sha256: str, intra_op_threads: int) -> dict[str, str]:
    """The data's content hash, the dependency lock's hash and the flags that change
    numerics: with the config, what it takes to run a training again."""
    lock = project_root() / "uv.lock"
    return {
        "data.content_sha256": data_sha256,
        "uv.lock.sha256": hashlib.sha256(lock.read_bytes()).hexdigest()
        if lock.exists()
        else "missing",
        "tf.onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "tf.op_determinism": "true",
        # A sweep job's share of the cores (0: TensorFlow's default, every core).
        "tf.intra_op_threads": str(intra_op_threads),
    }


def version_warnings(tags: dict[str, str]) -> list[str]:
    """The recorded package versions (``version.*`` tags) that differ from today's."""
    warnings = []
    for key, recorded in sorted(tags.items()):
        if not key.startswith("version."):
            continue
        package = key.removeprefix("version.")
        current = package_version(package)
        if current != recorded:
            warnings.append(f"{package} {recorded} when recorded, {current} now")
    return warnings
