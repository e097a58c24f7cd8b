"""The whole pipeline through real DVC and real MLflow, in a temporary copy of the project."""

import json
import sqlite3
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest

from mnist_pipeline.stages.artifacts import HEADLINE_METRICS
from mnist_pipeline.tracking.address import sqlite_path
from tests.helpers.faults import digests
from tests.helpers.workspace import copy_reproduced
from tools.workspace import git_commit

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_mirror, reproduced_template):
    """A git repository holding the project, set up for tiny data and a 1-epoch training,
    after one cold `dvc repro` from scratch, and what that repro printed: a copy of the
    session's reproduced project (shared by this module's tests, which run in order)."""
    repo, env = copy_reproduced(
        reproduced_template.folder, tmp_path_factory.mktemp("e2e") / "repo", tiny_mirror[0]
    )
    return repo, env, reproduced_template.output


@pytest.fixture
def store(project):
    """Point this process's MLflow client at the project's store."""
    mlflow.set_tracking_uri(project[1]["MLFLOW_TRACKING_URI"])
    yield
    mlflow.set_tracking_uri(None)


def test_dvc_repro_end_to_end(project, store):
    repo, env, first = project
    for stage in ("download", "preprocess", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first

    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env))
    shown = metrics[""]["data"]["reports/metrics.json"]["data"]
    for key in HEADLINE_METRICS:
        assert 0 <= shown[key] < 100
    assert shown["accuracy_gap"] == pytest.approx(
        shown["train_accuracy"] - shown["test_accuracy"], abs=2e-6
    )

    again = run(["dvc", "repro"], repo, env)
    assert "Data and pipelines are up to date" in again
    assert "Running stage" not in again

    # MLflow holds the stages' runs; the train run has the whole result and the model.
    runs = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert sorted(r.data.tags["stage"] for r in runs) == ["download", "preprocess", "train"]
    run_ref = json.loads((repo / "models/run.json").read_text())
    train_run = mlflow.get_run(run_ref["run_id"])
    for key in HEADLINE_METRICS:
        assert train_run.data.metrics[key] == pytest.approx(shown[key], abs=1e-5)
    assert train_run.data.params["model.units"] == "32"
    assert train_run.data.tags["git.dirty"] == "false"

    # The logged model reproduces the reported test accuracy.
    model = mlflow.pyfunc.load_model(run_ref["model_uri"])
    x_test = np.load(repo / "data/processed/x_test.npy", allow_pickle=False) / np.float32(255)
    y_test = np.load(repo / "data/processed/y_test.npy", allow_pickle=False)
    accuracy = (np.asarray(model.predict(x_test)).argmax(axis=1) == y_test).mean()
    assert accuracy == pytest.approx(shown["test_accuracy"], abs=1e-6)


def test_push_then_pull_into_a_fresh_clone(project, tmp_path):
    """A team shares results through a DVC remote (a local folder here, as on a shared
    filesystem): a clone that pulls has nothing left to run and shows the same metrics."""
    repo, env, _ = project
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "--default", "shared", str(remote)], repo, env)
    git_commit(repo, env, message="results and the remote")
    pushed = run(["dvc", "push"], repo, env)
    assert "pushed" in pushed and any(remote.rglob("*")), pushed

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, timeout=60)
    assert not (clone / "models").exists()  # only git's files so far
    run(["dvc", "pull"], clone, env)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env)
    assert "Running stage" not in run(["dvc", "repro"], clone, env)
    shown = {
        path: json.loads(run(["dvc", "metrics", "show", "--json"], path, env))[""]["data"]
        for path in (repo, clone)
    }
    assert shown[clone] == shown[repo]
    assert (clone / "models/model.keras").read_bytes() == (repo / "models/model.keras").read_bytes()


def test_queued_experiments_log_to_the_project_store(project):
    """`dvc exp run --queue` + `dvc queue start` run in temporary copies of the repository
    (.dvc/tmp/exps/...); with the default store their runs must still reach the project's
    own mlflow.db, and show in `dvc exp show`."""
    import time

    repo, env, _ = project
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the default store
    run(["dvc", "exp", "run", "--queue", "-S", "model.units=16"], repo, env)
    run(["dvc", "queue", "start"], repo, env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo, env)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)  # each `dvc queue status` pays DVC's start-up on the cores the run needs
    assert status.count("Success") == 1, status

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    experiments = [e for commit in shown for e in (commit.get("experiments") or [])]
    units = sorted(
        e["revs"][0]["data"]["params"]["params.yaml"]["data"]["model"]["units"] for e in experiments
    )
    assert 16 in units
    for e in experiments:
        assert "test_accuracy" in e["revs"][0]["data"]["metrics"]["reports/metrics.json"]["data"]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist")
    trained = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'train'")
    by_units = {r.data.params["model.units"]: r for r in trained}
    assert "test_accuracy" in by_units["16"].data.metrics


def test_override_of_a_missing_key_is_refused(project):
    repo, env, _ = project
    before = (repo / "params.yaml").read_text()
    result = subprocess.run(
        ["dvc", "exp", "run", "-S", "train.epochz=3"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Could not override 'train.epochz'" in result.stdout + result.stderr
    assert (repo / "params.yaml").read_text() == before


def test_second_concurrent_repro_gets_the_lock_error(project):
    repo, env, _ = project
    first = subprocess.Popen(
        ["dvc", "repro", "-f", "-s", "train"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = ""
        while "Running stage 'train'" not in line:
            line = first.stdout.readline()
            assert line or first.poll() is None, "first repro ended early"
        second = subprocess.run(
            ["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
        )
        assert second.returncode != 0
        assert "is busy, it is being blocked by" in second.stderr
        assert "manually remove" in second.stderr and ".dvc/tmp/rwlock" in second.stderr
    finally:
        rest = first.communicate(timeout=600)[0]
    assert first.returncode == 0, rest


def test_a_copy_of_the_reproduced_project_writes_only_to_itself(project, reproduced_template):
    """The tests above wrote to their copy (a new train run, a queued experiment, a push):
    the session's template, which other modules copy, is as it was built, and every
    artifact location in the copy's store is in the copy's own mlartifacts/, which holds
    the template's artifacts and the new ones. (MLflow's own Default experiment, which the
    project never logs to, keeps the cwd-relative ./mlruns its creator resolved: the
    project's relocation leaves what it did not choose to its owner.)"""
    _, env, _ = project
    assert digests(reproduced_template.folder) == reproduced_template.digests
    database = sqlite_path(env["MLFLOW_TRACKING_URI"])
    with sqlite3.connect(database) as con:
        locations = [
            row[0]
            for query in (
                "select artifact_location from experiments where experiment_id != 0",
                "select artifact_uri from runs",
                "select artifact_location from logged_models",
            )
            for row in con.execute(query)
        ]
    inside = (database.parent / "mlartifacts").as_uri() + "/"
    assert locations and all(f"{uri}/".startswith(inside) for uri in locations), locations
    copied = set(digests(reproduced_template.folder / "mlartifacts"))
    assert copied < set(digests(database.parent / "mlartifacts"))
