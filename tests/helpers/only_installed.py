"""A Python process that can import only what a given set of distributions brings: a clean
environment's view of this one, without building one (no package index is reachable from a
test, and the wheels are already here)."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

#: Put first on ``sys.meta_path``: the top-level modules of every other distribution (and of
#: this project) are not installed.
FINDER = """
import sys
ABSENT = set({absent!r})

class OnlyInstalled:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed here)", name=name)
        return None

sys.meta_path.insert(0, OnlyInstalled)
"""


def closure(names: list[str]) -> set[str]:
    """The distributions ``names`` need to run (their requirements, markers evaluated for
    this interpreter, no extras), ``names`` included; the ones not installed are left out."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def absent_modules(distributions: set[str]) -> set[str]:
    """The top-level modules that only other distributions install (the project's own
    packages among them)."""
    return {"mnist_pipeline", "hydra_plugins"} | {
        module
        for module, owners in metadata.packages_distributions().items()
        if not any(canonical(owner) in distributions for owner in owners)
    }


def run_with_only(
    distributions: list[str], script: str, cwd: Path, env: dict
) -> subprocess.CompletedProcess:
    """``script`` in a new interpreter that finds only the modules of ``distributions`` and
    what they require (and the standard library)."""
    prelude = FINDER.format(absent=sorted(absent_modules(closure(distributions))))
    return subprocess.run(
        [sys.executable, "-c", prelude + script],
        cwd=cwd,
        env={k: v for k, v in env.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=300,
    )
