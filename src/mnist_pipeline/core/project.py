"""Where the project is: its root, its ``conf/`` and what ``dvc.yaml`` declares.

``dvc.yaml`` is the one list of the params each stage depends on; code that needs such a
list (the in-process data cache) reads it from there instead of keeping a copy.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import yaml

#: The repository root (src layout: src/mnist_pipeline/core/project.py -> root).
PROJECT_ROOT = Path(__file__).resolve().parents[3]
CONF_DIR = str(PROJECT_ROOT / "conf")
DVC_FILE = PROJECT_ROOT / "dvc.yaml"

#: Where DVC runs queued experiments: a temporary copy inside the project's own .dvc/.
_DVC_EXP_TMP = "/.dvc/tmp/exps/"


def project_root(path: Path = PROJECT_ROOT) -> Path:
    """The repository that runs belong to, even from a DVC experiment's temporary copy
    (its default MLflow store, its ``uv.lock``)."""
    text = path.as_posix()
    if _DVC_EXP_TMP in text:
        return Path(text.split(_DVC_EXP_TMP)[0])
    return path


def mlflow_command() -> list[str]:
    """The ``mlflow`` CLI of this environment (``mlflow server``, which ``mlflow ui`` is): the
    interpreter, not the ``mlflow`` script, which names the venv's absolute path and stops
    working when the project moves."""
    return [sys.executable, "-m", "mlflow"]


@cache
def stage_params(*stages: str) -> tuple[str, ...]:
    """The params (dotted keys or whole groups) that ``dvc.yaml`` lists for ``stages``."""
    declared = yaml.safe_load(DVC_FILE.read_text())["stages"]
    names: list[str] = []
    for stage in stages:
        for entry in declared[stage].get("params", []):
            # An entry is a key of params.yaml, or {file: [keys]} for another params file.
            keys = [entry] if isinstance(entry, str) else [k for ks in entry.values() for k in ks]
            names.extend(k for k in keys if k not in names)
    return tuple(names)
