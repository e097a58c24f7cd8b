"""Issue 25, class 1, for an Optuna study: the disk holding the study's storage (``optuna.db``,
here on a real 2 MB tmpfs) fills between two calls. The call ends with one line naming that
file (not "the MLflow store": the two stores fail in the same SQLite words), no MLflow run is
left RUNNING, and once space is freed the same command resumes the study to its n_trials.
The call that meets the full disk is a real subprocess (its exit status and stderr are the
contract); the good calls around it run through the same entry point in this process."""

from __future__ import annotations

import os

import mlflow
import optuna
import pytest

from mnist_pipeline import pipeline
from mnist_pipeline.experiments import search
from tests.helpers.cli import app_result
from tests.helpers.config import sha_overrides
from tests.helpers.faults import fill, one_error_line, tmpfs
from tests.helpers.processes import run_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


@pytest.mark.filterwarnings("ignore:The number of trials is too small")  # 1 trial
def test_full_disk_under_the_study_storage_then_resumed(
    tiny_mirror, tracking_store, workdir, tmp_path, monkeypatch, capfd
):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        database = disk / "optuna.db"
        monkeypatch.setenv("MNIST_MIRROR", str(tiny_mirror[0]))
        monkeypatch.setenv(search.STORAGE_ENV, f"sqlite:///{database}")

        def study_call(n_trials: int, in_process: bool = True):
            args = [
                "-m",
                "hparams_search=mnist_optuna",
                "train.epochs=1",
                f"hydra.sweeper.n_trials={n_trials}",
                *sha_overrides(tiny_mirror[1]),
            ]
            if in_process:
                return app_result(capfd, pipeline.main, *args)
            return run_pipeline(workdir, dict(os.environ), *args)

        first = study_call(1)
        assert first.returncode == 0, first.stderr[-3000:]
        filler = fill(disk)
        full = study_call(2, in_process=False)
        one_error_line(full, f"no space left on the disk holding {database}", "free space")
        running = mlflow.search_runs(
            search_all_experiments=True,
            output_format="list",
            filter_string="attributes.status = 'RUNNING'",
        )
        assert running == []

        filler.unlink()
        again = study_call(2)
        assert again.returncode == 0, again.stderr[-3000:]
        study = optuna.load_study(study_name="mnist_optuna", storage=f"sqlite:///{database}")
        assert search.trials_done(study) == 2
        counted = [t for t in study.trials if t.number not in search.interrupted(study)]
        assert [t.state.name for t in counted] == ["COMPLETE", "COMPLETE"]
        (parent,) = mlflow.search_runs(
            search_all_experiments=True,
            output_format="list",
            filter_string="tags.sweep_role = 'parent'",
        )
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["n_trials_complete"] == 2
