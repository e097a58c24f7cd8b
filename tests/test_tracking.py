"""Where runs go: always an absolute store, the project's own even from a DVC temp copy."""

from pathlib import Path

import pytest

from mnist_pipeline import tracking
from mnist_pipeline.core.errors import ConfigError
from mnist_pipeline.core.project import PROJECT_ROOT, project_root
from mnist_pipeline.tracking import address


def test_default_store_is_absolute_and_in_the_project(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri()
    # as SQLAlchemy reads it: the URI escapes a `?` or `%` in the project's path
    assert address.sqlite_path(uri) == PROJECT_ROOT / "mlflow.db"
    assert uri.startswith("sqlite:////")


def test_queued_experiment_copy_maps_to_the_project():
    copy = Path("/home/me/mnist/.dvc/tmp/exps/tmpa1b2c3")
    assert project_root(copy) == Path("/home/me/mnist")
    assert project_root(Path("/home/me/mnist")) == Path("/home/me/mnist")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("sqlite:///mlflow.db", "relative to the working directory"),
        ("./mlruns", "file store"),
        ("file:///tmp/mlruns", "file store"),
    ],
)
def test_unsafe_stores_are_refused(monkeypatch, uri, message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ConfigError, match=message):
        tracking.tracking_uri()


def test_server_and_absolute_sqlite_are_accepted(monkeypatch):
    for uri in ("http://127.0.0.1:5000", "sqlite:////srv/mlflow/mlflow.db"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert tracking.tracking_uri() == uri


def test_experiment_artifacts_sit_beside_a_sqlite_store(tracking_store, tmp_path):
    import mlflow

    tracking.ensure_experiment("placed")
    location = mlflow.get_experiment_by_name("placed").artifact_location
    assert location == (tmp_path / "store" / "mlartifacts").as_uri()


def test_a_training_run_adopts_its_pipeline_runs_data_stage_runs(tracking_store):
    """One row per pipeline run in mlflow ui: download and preprocess fold under training."""
    from mnist_pipeline.tracking.runs import adopt_data_runs

    client = tracking.client()
    experiment = tracking.ensure_experiment("mnist")
    tags = {"pipeline_run": "repro 12-05 10:00:00"}
    data = [
        client.create_run(experiment, tags={**tags, "stage": s}) for s in ("download", "preprocess")
    ]
    other = client.create_run(experiment, tags={"pipeline_run": "lr2", "stage": "download"})
    train = client.create_run(experiment, tags={**tags, "stage": "train"})
    adopted = adopt_data_runs(experiment, tags["pipeline_run"], train.info.run_id)
    assert sorted(adopted) == sorted(r.info.run_id for r in data)
    for run in data:
        parent = client.get_run(run.info.run_id).data.tags["mlflow.parentRunId"]
        assert parent == train.info.run_id
    assert "mlflow.parentRunId" not in client.get_run(other.info.run_id).data.tags
    assert adopt_data_runs(experiment, "it's", train.info.run_id) == []  # not searchable
