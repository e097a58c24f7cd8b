"""Stage 0, check: what the other stages need, refused before DVC removes any of their outputs.

DVC deletes a stage's outputs before it runs the stage, so a problem that the stage itself
would find (a config value out of range, a store it cannot write) costs the last good outputs
first. This stage runs before all of them and checks, in seconds and without TensorFlow:

- ``params.yaml`` and ``conf/`` (the schema, the composition: ``core.params.check``);
- the MLflow store the stages will log to (``MLFLOW_TRACKING_URI`` or the project's own):
  an address the project cannot use, a SQLite store that is locked, corrupt, read-only or
  from another MLflow, a tracking server or PostgreSQL that does not answer;
- ``$MNIST_MIRROR``: a scheme the download stage does not take, a folder that does not exist.

Its output, ``data/params.ok``, never changes, so a passing check re-runs nothing downstream.
DVC runs it when its deps or params change and on ``dvc repro -f``.

    python -m mnist_pipeline.check      # in the project folder: what dvc.yaml runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mnist_pipeline import tracking
from mnist_pipeline.core import params
from mnist_pipeline.core.errors import exit_on_error
from mnist_pipeline.stages import download


def check(folder: Path = Path()) -> None:
    """The environment first (a store that cannot be used), then the config; the stamp is
    written only when both pass."""
    tracking.check_store(tracking.tracking_uri())
    download.check_mirror_setting()
    params.check(folder / "params.yaml", folder / "conf", folder / params.CHECK_STAMP)


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
