"""Long jobs interrupted, then resumed (issue 25, class 3): an Optuna study and a Hydra sweep
killed while a trial trains. The kill waits for a marker in the MLflow store (a training run
RUNNING), never for a sleep. After the next command: no MLflow run is left RUNNING, no Optuna
trial is stuck RUNNING, the sweep's parent says how many of its jobs finished, and the same
command takes a study to its configured number of trials. The kills are of real processes;
the commands after them run through the same entry points in this process (the wiring of
each command is checked by a real subprocess elsewhere: test_search, test_sweep)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest

from mnist_pipeline import pipeline
from mnist_pipeline.experiments import search
from mnist_pipeline.stages import download
from tests.helpers.cli import app_result, run_app
from tests.helpers.config import sha_overrides
from tests.helpers.processes import kill_when

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def runs(condition: str) -> list:
    return mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string=condition
    )


def training() -> bool:
    """A sweep job's training run is open: the kill point."""
    return bool(runs("tags.stage = 'train' and attributes.status = 'RUNNING'"))


@pytest.fixture
def env(tiny_mirror, tracking_store, workdir, monkeypatch) -> dict:
    monkeypatch.delenv(search.STORAGE_ENV, raising=False)
    monkeypatch.setenv("MNIST_MIRROR", str(tiny_mirror[0]))  # for the calls in this process
    return {**os.environ, "MNIST_MIRROR": str(tiny_mirror[0])}


def start(workdir: Path, env: dict, log: Path, *args: str) -> subprocess.Popen:
    """``python -m mnist_pipeline.pipeline args...``, its output in ``log`` (a pipe nobody
    reads would block it)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mnist_pipeline.pipeline", *args],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.filterwarnings("ignore:The number of trials is too small")  # one COMPLETE trial
def test_a_killed_study_resumes_to_its_trials(tiny_mirror, tracking_store, workdir, env, capfd):
    """The study's call is killed (SIGKILL) while trial 0 trains; the same command marks that
    trial FAIL (interrupted: it does not count) and runs the study to its n_trials COMPLETE
    trial, under the same parent run; the killed training run ends KILLED."""
    command = [
        "-m",
        "hparams_search=mnist_optuna",
        "train.epochs=1",
        "hydra.sweeper.n_trials=1",
        *sha_overrides(tiny_mirror[1]),
    ]
    kill_when(start(workdir, env, workdir.parent / "study.log", *command), training)
    storage = f"sqlite:///{Path(tracking_store.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    study = optuna.load_study(study_name="mnist_optuna", storage=storage)
    assert [t.state.name for t in study.trials] == ["RUNNING"]  # what the kill left

    again = app_result(capfd, pipeline.main, *command)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert "trials [0] of an earlier call never finished" in said, said[-3000:]
    study = optuna.load_study(study_name="mnist_optuna", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.user_attrs[search.INTERRUPTED_ATTR] == [0]
    assert runs("attributes.status = 'RUNNING'") == []
    (killed,) = runs("tags.stage = 'train' and attributes.status = 'KILLED'")
    assert "died while the run was open" in killed.data.tags["error"]
    (parent,) = runs("tags.sweep_role = 'parent'")  # one parent: the first call's, reopened
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_trials_complete"] == 1


def test_a_killed_sweep_says_how_many_jobs_finished(tiny_mirror, workdir, env):
    """A three-job sweep stopped by Ctrl-C while its second job trains: it stops at once with
    one line, as a stage does (SIGTERM: the same handler), rather than unwinding from inside
    a store write; the next command (any stage) closes the parent and the job KILLED, the
    parent's reason counting its finished jobs. (Ctrl-C during a study leaves what SIGKILL
    does: the test above.)"""
    sha = sha_overrides(tiny_mirror[1])
    log = workdir.parent / "sweep.log"
    proc = start(workdir, env, log, "-m", "model.units=8,16,24", "train.epochs=1", *sha)

    def second_job_running() -> bool:  # job 0 has finished by then (one job at a time)
        return bool(
            runs("tags.sweep_job = '1' and tags.stage = 'train' and attributes.status = 'RUNNING'")
        )

    kill_when(proc, second_job_running, signum=signal.SIGINT)
    assert "error: stopped by signal 2; the next run marks this run KILLED" in log.read_text()
    assert "Traceback" not in log.read_text()
    (parent,) = runs("tags.sweep_role = 'parent'")
    assert parent.info.status == "RUNNING"  # nothing could close it

    assert run_app(download.main, *sha) == 0  # the next command, whichever it is
    assert runs("attributes.status = 'RUNNING'") == []
    parent = mlflow.get_run(parent.info.run_id)
    assert parent.info.status == "KILLED"
    assert "its jobs' training runs: 1 FINISHED, 1 KILLED" in parent.data.tags["error"]
