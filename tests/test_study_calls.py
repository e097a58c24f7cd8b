"""Who owns what when several calls run one Optuna study (``experiments.study_calls``,
``core.liveness``), in-process and fast: real processes (a live ``sleep``, a reaped one), a
real Optuna study, a real MLflow store. The two calls racing for real: ``test_races.py``."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import mlflow
import optuna
import pytest

from mnist_pipeline.core import liveness
from mnist_pipeline.experiments import search, study_calls, sweep_tracking

SPACE = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


@pytest.fixture
def live() -> Iterator[dict]:
    """The owner record of a process that runs for the test."""
    proc = subprocess.Popen(["sleep", "60"])
    yield liveness.identity(proc.pid)
    proc.kill()
    proc.wait()


@pytest.fixture
def dead() -> dict:
    """The owner record of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    owner = liveness.identity(proc.pid)
    proc.wait()
    return owner


def test_an_owner_is_alive_only_as_the_process_it_recorded(live, dead):
    assert liveness.alive(liveness.identity())
    assert liveness.alive(live)
    assert not liveness.alive(dead)
    if live["start"] is None:
        pytest.skip("no /proc here: an owner is judged by its pid only")
    # the same pid, started at another time: a new process that reused the pid
    assert not liveness.alive({**live, "start": live["start"] - 1})
    assert not liveness.alive({**live, "boot": "another boot"})
    # on another machine: cannot be told from here, so taken to be alive
    assert liveness.alive({**dead, "host": f"not-{socket.gethostname()}"})


def test_only_the_trials_of_dead_calls_are_failed_as_interrupted(live, dead):
    study = optuna.create_study()
    owners = [live, dead, None, {**dead, "host": f"not-{socket.gethostname()}"}]
    for owner in owners:
        trial = study.ask(SPACE)
        if owner is not None:  # None: asked before trials recorded their call
            trial.set_user_attr(study_calls.OWNER_ATTR, owner)
    assert study_calls.fail_stale_trials(study) == [1, 2]
    assert [t.state.name for t in study.trials] == ["RUNNING", "FAIL", "FAIL", "RUNNING"]
    assert search.interrupted(study) == [1, 2]
    assert search.trials_done(study) == 2  # the running ones count: no call asks them again


def test_a_call_asks_only_what_the_study_lacks(live):
    """Two trials of another live call running, n_trials=3: one more, then none."""
    study = optuna.create_study()
    for _ in range(2):
        study.ask(SPACE).set_user_attr(study_calls.OWNER_ATTR, live)
    asks = study_calls.Asks(study, "sqlite:////unused/optuna.db", "parent", 3, n_jobs=4)
    (trial,) = asks.next_trials(SPACE)
    assert trial.user_attrs[study_calls.OWNER_ATTR] == liveness.identity()
    assert asks.next_trials(SPACE) == []
    assert len(study.trials) == 3


def test_a_call_ending_while_another_runs_hands_it_the_parent(live, dead, tracking_store, tmp_path):
    """Three calls recorded: this one, a live one, a dead one. Leaving, this call forgets the
    dead one, gives the parent run to the live one (whose pid ``close_dead_runs`` then
    checks) and leaves it open; that call, leaving last, closes it."""
    experiment = "calls"
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    parent = sweep_tracking.open_parent(sweep_dir, experiment, "s1", [], "sweep")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="s")
    study.set_user_attr(study_calls.CALLS_ATTR, [live, dead])
    assert study_calls.join(study) == [live]

    assert study_calls.leave(study, storage, sweep_dir, "s")
    assert study.user_attrs[study_calls.CALLS_ATTR] == [live]
    run = mlflow.get_run(parent)
    assert run.data.tags["process.pid"] == str(live["pid"])
    assert run.info.status == "RUNNING"
    info = sweep_tracking.read_sweep(sweep_dir)
    assert info[sweep_tracking.KEPT_OPEN] == liveness.describe(live)

    study.set_user_attr(study_calls.CALLS_ATTR, [])  # the live call has left too
    sweep_tracking.write_sweep(sweep_dir, {**info, sweep_tracking.KEPT_OPEN: ""})
    assert not study_calls.leave(study, storage, sweep_dir, "s")  # the last: its end closes it
