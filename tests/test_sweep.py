"""Hydra multirun sweeps through `python -m mnist_pipeline.pipeline -m`: the parallel one in a
real subprocess (the command's wiring, joblib's worker processes), the one-job-after-another
one through the same entry point in this process (a subprocess pays seconds of imports)."""

import mlflow
import pytest

from tests.helpers.processes import HEADLINE

pytestmark = pytest.mark.slow


def test_a_sweep_on_two_workers_loses_no_run(sweep, workdir):
    # val_split=0.25 makes its job prepare data of its own (the sweep prepared val_split=0's
    # before its jobs started): those runs must stay out of the sweep, and the jobs must not
    # write over the workspace's models/ and reports/. Two joblib workers write to one SQLite
    # store and one prepared-data cache at once, one preparing while the other trains (the
    # basic launcher, one job after another, runs in test_failing_jobs_...).
    result, parent, children = sweep(
        "model.units=16",
        "data.val_split=0,0.25",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "database is locked" not in result.stderr
    for noise in ("cuInit", "NodeDef mentions", "Failed to resolve installed pip"):
        assert noise not in result.stderr  # TensorFlow's and MLflow's noise, filtered
    assert parent.info.status == "FINISHED"
    assert len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(r.data.tags["sweep_job"] for r in children) == ["0", "1"]
    combos = {(r.data.params["model.units"], r.data.params["data.val_split"]) for r in children}
    assert combos == {("16", "0.0"), ("16", "0.25")}
    assert {r.data.tags["stage"] for r in children} == {"train"}
    assert not (workdir / "models").exists() and not (workdir / "reports").exists()
    # Each distinct input (val_split 0 and 0.25) was prepared exactly once.
    assert len(list((workdir / "data/cache").glob("processed-*/manifest.json"))) == 2
    for run in children:
        assert run.info.status == "FINISHED"
        assert "model.units=" in run.data.tags["sweep_overrides"]
        for key in HEADLINE:
            assert key in run.data.metrics, (key, run.data.tags["sweep_overrides"])
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "accuracy")
        assert [m.step for m in history] == [1]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.csv", "comparison.png"} <= artifacts


def test_failing_jobs_are_recorded_and_the_others_finish(sweep):
    # -1 fails validation before the job's run opens; 1e30 diverges after it opened.
    result, parent, children = sweep(
        "optimizer=sgd", "optimizer.learning_rate=0.01,-1,1e30", in_process=True
    )
    assert result.returncode == 1
    assert "optimizer.learning_rate must be > 0, got -1" in result.stderr
    assert "training diverged" in result.stderr
    by_rate = {r.data.params.get("optimizer.learning_rate"): r for r in children}
    assert set(by_rate) == {"0.01", "-1", "1e+30"}
    assert by_rate["-1"].info.status == "FAILED"
    assert "learning_rate must be > 0" in by_rate["-1"].data.tags["error"]
    assert by_rate["1e+30"].info.status == "FAILED"
    assert "diverged" in by_rate["1e+30"].data.tags["error"]
    assert by_rate["0.01"].info.status == "FINISHED"
    assert "test_accuracy" in by_rate["0.01"].data.metrics
    assert parent.info.status == "FAILED"
