"""Hydra multirun sweeps through `python -m mnist_pipeline.pipeline -m`, in a subprocess."""

import os
import subprocess
import sys

import mlflow
import pytest

from tests.conftest import sha_overrides

pytestmark = pytest.mark.slow

HEADLINE = ("fit_accuracy", "train_accuracy", "test_accuracy", "accuracy_gap", "test_loss")


@pytest.fixture
def sweep(tiny_mirror, tracking_store, workdir):
    """Run a sweep on tiny data in a subprocess; return (exit code, stderr, parent, children)."""
    folder, sha = tiny_mirror
    env = {**os.environ, "MNIST_MIRROR": str(folder)}

    def run(*overrides: str):
        cmd = [
            sys.executable,
            "-m",
            "mnist_pipeline.pipeline",
            "-m",
            *sha_overrides(sha),
            *overrides,
        ]
        result = subprocess.run(
            cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900
        )
        parents = mlflow.search_runs(
            search_all_experiments=True,
            output_format="list",
            filter_string="tags.sweep_role = 'parent'",
        )
        assert len(parents) == 1, result.stderr[-3000:]
        parent = parents[0]
        sweep_id = parent.data.tags["sweep_parent"]
        children = mlflow.search_runs(
            search_all_experiments=True,
            output_format="list",
            filter_string=f"tags.sweep_id = '{sweep_id}'",
        )
        return result, parent, children

    return run


def test_two_by_two_sweep(sweep):
    result, parent, children = sweep("model.units=16,32", "train.epochs=1,2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert parent.info.status == "FINISHED"
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(r.data.tags["sweep_job"] for r in children) == ["0", "1", "2", "3"]
    combos = {(r.data.params["model.units"], r.data.params["train.epochs"]) for r in children}
    assert combos == {("16", "1"), ("16", "2"), ("32", "1"), ("32", "2")}
    for run in children:
        assert run.info.status == "FINISHED"
        assert "model.units=" in run.data.tags["sweep_overrides"]
        for key in HEADLINE:
            assert key in run.data.metrics, (key, run.data.tags["sweep_overrides"])
        epochs = int(run.data.params["train.epochs"])
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "accuracy")
        assert [m.step for m in history] == list(range(1, epochs + 1))
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.csv", "comparison.png"} <= artifacts


def test_parallel_sweep_loses_no_run(sweep):
    result, _, children = sweep(
        "model.units=8,16,24,32", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "database is locked" not in result.stderr
    assert len(children) == 4
    assert all(r.info.status == "FINISHED" for r in children)
    assert sorted(int(r.data.params["model.units"]) for r in children) == [8, 16, 24, 32]


def test_failing_job_is_recorded_and_the_others_finish(sweep):
    result, parent, children = sweep("model.units=16,-1,32")
    assert result.returncode == 1
    assert "model.units must be >= 1, got -1" in result.stderr
    by_units = {r.data.params.get("model.units"): r for r in children}
    assert set(by_units) == {"16", "-1", "32"}
    assert by_units["-1"].info.status == "FAILED"
    assert "model.units must be >= 1" in by_units["-1"].data.tags["error"]
    for units in ("16", "32"):
        assert by_units[units].info.status == "FINISHED"
        assert "test_accuracy" in by_units[units].data.metrics
    assert parent.info.status == "FAILED"
