"""Where the project is: its root, its ``conf/`` and what ``dvc.yaml`` declares.

``dvc.yaml`` is the one list of the params each stage depends on; code that needs such a
list (the in-process data cache) reads it from there instead of keeping a copy.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import yaml

from mnist_pipeline.core.errors import PipelineError

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


#: The full ``mlflow``'s interpreter, in the project (the Makefile's MLFLOW_VENV).
MLFLOW_PYTHON = ".venv-mlflow/bin/python"


def full_mlflow() -> list[str]:
    """The command for the full ``mlflow`` CLI (``mlflow server``, which ``mlflow ui`` is).

    It has its own environment, ``.venv-mlflow/`` (uv.lock's ``mlflow-server`` group, built by
    ``make ui``, ``make server`` and ``make test``); ``.venv``, where the stages run, holds only
    MLflow's client, so Keras does not import the UI's scikit-learn, SciPy and Matplotlib on
    every ``import tensorflow``. ``$MNIST_MLFLOW_PYTHON`` names another interpreter with
    ``mlflow`` installed. The interpreter, not the ``mlflow`` script: a venv's scripts name its
    absolute path, its interpreter keeps working after the project moves.
    """
    python = os.environ.get("MNIST_MLFLOW_PYTHON") or project_root() / MLFLOW_PYTHON
    if not Path(python).exists():
        raise PipelineError(
            f"MLflow's UI and server are not installed ({python} not found): "
            "`make ui` or `make server` installs them"
        )
    return [str(python), "-m", "mlflow"]


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
