"""What DVC manages in the working tree, read from ``dvc.yaml`` (never a hard-coded list).

A run's ``git.dirty`` tag must mean "the code or config in git had uncommitted changes".
DVC itself changes git-tracked files while it works: it rewrites ``dvc.lock`` and (for
``dvc exp run -S``) ``params.yaml``, and removes a stage's outputs before running it, the
committed ``cache: false`` ones included. Those changes say nothing about the code, so the
dirty check leaves out every path this module lists.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

#: Files DVC writes in the repository root besides the stages' outputs.
DVC_WRITES = ("dvc.lock", "params.yaml")
_VAR = re.compile(r"\$\{\s*([\w.-]+)\s*\}")


def _lookup(params: dict[str, Any], dotted: str) -> str:
    node: Any = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(dotted)
        node = node[key]
    return str(node)


def _entries(items: Any) -> list[str]:
    """Paths from an outs/metrics/plots list (plain strings or one-key mappings)."""
    paths = []
    for item in items or []:
        if isinstance(item, str):
            paths.append(item)
        elif isinstance(item, dict):
            paths.extend(str(k) for k in item)
    return paths


def managed_paths(root: Path) -> list[str]:
    """Every path DVC writes in ``root``: dvc.lock, params.yaml and each stage's outs,
    metrics and plots (``${...}`` filled in from params.yaml, as DVC does), plus the
    ``.gitignore`` files DVC keeps beside its outputs."""
    try:
        pipeline = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return list(DVC_WRITES)
    try:
        params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        params = {}
    paths = list(DVC_WRITES)
    for stage in (pipeline.get("stages") or {}).values():
        for field in ("outs", "metrics", "plots"):
            paths.extend(_entries(stage.get(field)))
    paths.extend(_entries(pipeline.get("plots")))  # top-level plots: paths (or ids: harmless)
    resolved = []
    for path in paths:
        try:
            resolved.append(_VAR.sub(lambda m: _lookup(params, m.group(1)), path))
        except KeyError:
            continue  # a variable from elsewhere: not ours to guess
    ignores = {(Path(p).parent / ".gitignore").as_posix() for p in resolved}
    return sorted({*resolved, *ignores})


def dirty_check_args(root: Path) -> list[str]:
    """``git status`` arguments that list uncommitted changes to tracked files, leaving out
    what DVC manages (pathspecs from the repository's top, wherever git runs)."""
    excluded = [f":(top,exclude,literal){p}" for p in managed_paths(root)]
    return ["status", "--porcelain", "--untracked-files=no", "--", ":/", *excluded]
