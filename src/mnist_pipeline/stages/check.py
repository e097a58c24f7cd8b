"""Stage 0, check: what the other stages need, refused before DVC removes any of their outputs.

DVC deletes a stage's outputs before it runs the stage, so a problem that the stage itself
would find (a config value out of range, a store it cannot write) costs the last good outputs
first. This stage runs before all of them and checks, in seconds and without TensorFlow:

- ``params.yaml`` and ``conf/`` (the schema, the composition: ``core.params.check``);
- the MLflow store the stages will log to (``MLFLOW_TRACKING_URI`` or the project's own):
  an address the project cannot use, a SQLite store that is locked, corrupt, read-only or
  from another MLflow, a tracking server or PostgreSQL that does not answer;
- ``$MNIST_MIRROR``: a scheme the download stage does not take, a folder that does not exist;
- free space on each disk the next stages write to (their outputs' folders, DVC's cache, the
  MLflow artifact folder), against what the last run wrote (``core.space``).

Its output, ``data/params.ok``, never changes, so a passing check re-runs nothing downstream.
DVC runs it when its deps or params change and on ``dvc repro -f``.

    python -m mnist_pipeline.check      # in the project folder: what dvc.yaml runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from mnist_pipeline import tracking
from mnist_pipeline.core import params, space
from mnist_pipeline.core.errors import exit_on_error
from mnist_pipeline.stages import download


def check(folder: Path = Path()) -> None:
    """The environment first (a store that cannot be used, the mirror setting, free space),
    then the config; the stamp is written only when all pass."""
    uri = tracking.tracking_uri()
    tracking.check_store(uri)
    download.check_mirror_setting()
    check_free_space(folder, tracking.artifact_folder(uri))  # before the stamp is written
    params.check(folder / "params.yaml", folder / "conf", folder / params.CHECK_STAMP)


#: Each stage's main output, a key of ``paths`` in params.yaml (its size counts from
#: ``space.KNOWN_SIZES`` until dvc.lock lists the stage).
MAIN_OUTPUTS = {
    "download": "raw",
    "preprocess": "processed",
    "train": "models",
    "evaluate": "reports",
}


def check_free_space(folder: Path, artifacts: Path | None) -> None:
    """Each disk the stages write to has room for what the last run wrote there
    (``core.space``). A params.yaml without its paths is left to ``params.check`` to refuse."""
    try:
        paths = yaml.safe_load((folder / "params.yaml").read_text())["paths"]
        main = {stage: folder / paths[key] for stage, key in MAIN_OUTPUTS.items()}
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return
    sizes = space.last_sizes(folder / "dvc.lock", main)
    space.require_free_space(sizes, space.dvc_cache(folder), artifacts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_pipeline.check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    with exit_on_error():
        check()
    return 0
