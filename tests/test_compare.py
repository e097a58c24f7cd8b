"""The comparison table and picture, on runs whose metrics are known."""

import time

import mlflow
import pytest

from mnist_pipeline.core.errors import PipelineError
from mnist_pipeline.experiments import compare

KNOWN = [  # units, epochs, train_accuracy, test_accuracy
    ("128", "5", 0.980, 0.970),
    ("512", "5", 0.990, 0.978),
    ("512", "20", 1.000, 0.981),
]


@pytest.fixture
def known_runs(tracking_store):
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("cmp")
    for i, (units, epochs, train, test) in enumerate(KNOWN):
        run = client.create_run(
            experiment, run_name=f"job{i}", tags={"stage": "train", "sweep_id": "s1"}
        )
        for key, value in {
            "model.units": units,
            "train.epochs": epochs,
            "seed": "42",
            "paths.models": f"/out/{i}",
        }.items():
            client.log_param(run.info.run_id, key, value)
        metrics = {
            "fit_accuracy": train - 0.001,
            "train_accuracy": train,
            "test_accuracy": test,
            "accuracy_gap": train - test,
            "test_loss": 1 - test,
        }
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        for epoch in range(1, int(epochs) + 1):
            client.log_metric(run.info.run_id, "accuracy", train * epoch / int(epochs), step=epoch)
        client.set_terminated(run.info.run_id)
    # Two sweeps' parent runs: s1, the later one, is "the latest sweep".
    for sweep_id in ("s0", "s1"):
        client.create_run(experiment, tags={"sweep_role": "parent", "sweep_parent": sweep_id})
        time.sleep(0.01)
    # A run of another sweep, and an unfinished one: neither belongs in the table.
    other = client.create_run(experiment, tags={"stage": "train", "sweep_id": "s2"})
    client.set_terminated(other.info.run_id)
    client.create_run(experiment, tags={"stage": "train", "sweep_id": "s1"})


def test_table_rows_columns_and_order(known_runs):
    table = compare.runs_table(compare.select_runs(sweep_id="latest"))
    assert list(table["run"]) == ["job2", "job1", "job0"]  # by test accuracy, best first
    assert list(table.columns) == [
        "run",
        "model.units",
        "train.epochs",
        *compare.HEADLINE,
        "duration_s",
        "run_id",
    ]
    assert list(table["accuracy_gap"].round(3)) == [0.019, 0.012, 0.010]
    by_gap = compare.runs_table(compare.select_runs(sweep_id="s1"), "accuracy_gap", True)
    assert list(by_gap["run"]) == ["job0", "job1", "job2"]


def test_outputs_and_cli(known_runs, tmp_path, capsys):
    code = compare.main(
        [
            "--sweep-id",
            "s1",
            "--markdown",
            str(tmp_path / "t.md"),
            "--csv",
            str(tmp_path / "t.csv"),
            "--plot",
            str(tmp_path / "g.png"),
        ]
    )
    assert code == 0
    assert "job2" in capsys.readouterr().out
    markdown = (tmp_path / "t.md").read_text().splitlines()
    assert markdown[0].startswith("| run ") and "model.units" in markdown[0]
    assert len(markdown) == 2 + len(KNOWN)
    assert (tmp_path / "t.csv").read_text().count("\n") == 1 + len(KNOWN)
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_filter_string_and_errors(known_runs):
    runs = compare.select_runs(experiment="cmp", filter_string="params.model.units = '512'")
    assert len(runs) == 2
    with pytest.raises(PipelineError, match="no finished training runs"):
        compare.select_runs(sweep_id="nope")
    with pytest.raises(PipelineError, match="cannot sort by"):
        compare.runs_table(runs, sort="speed")


def test_plot_draws_each_runs_numbers(known_runs, tmp_path):
    """Left: train and test accuracy per run, as bars named by the params that differ, or
    as lines against the one param that does; right: every run's per-epoch accuracy."""
    runs = compare.select_runs(sweep_id="s1")
    table = compare.runs_table(runs)
    spec = compare.gap_spec(table, runs)
    bars, curves = spec["hconcat"]
    assert bars["mark"]["type"] == "bar" and bars["encoding"]["x"]["sort"] == [
        "units=512, epochs=20",
        "units=512, epochs=5",
        "units=128, epochs=5",
    ]
    assert [(p["x"], p["metric"], p["accuracy"]) for p in bars["data"]["values"]] == [
        ("units=512, epochs=20", "train_accuracy", 1.0),
        ("units=512, epochs=20", "test_accuracy", 0.981),
        ("units=512, epochs=5", "train_accuracy", 0.99),
        ("units=512, epochs=5", "test_accuracy", 0.978),
        ("units=128, epochs=5", "train_accuracy", 0.98),
        ("units=128, epochs=5", "test_accuracy", 0.970),
    ]
    by_run: dict[str, list] = {}
    for point in curves["data"]["values"]:
        by_run.setdefault(point["run"], []).append(point)
    assert {run: [p["epoch"] for p in points] for run, points in by_run.items()} == {
        "units=512, epochs=20": list(range(1, 21)),
        "units=512, epochs=5": [1, 2, 3, 4, 5],
        "units=128, epochs=5": [1, 2, 3, 4, 5],
    }
    assert by_run["units=512, epochs=20"][-1]["accuracy"] == pytest.approx(1.0)

    # One numeric param differs (epochs): lines against it, in its order.
    runs = compare.select_runs(experiment="cmp", filter_string="params.model.units = '512'")
    lines, _ = compare.gap_spec(compare.runs_table(runs), runs)["hconcat"]
    assert lines["mark"]["type"] == "line" and lines["encoding"]["x"]["title"] == "train.epochs"
    assert [(p["x"], p["metric"], p["accuracy"]) for p in lines["data"]["values"]] == [
        (5, "train_accuracy", 0.99),
        (5, "test_accuracy", 0.978),
        (20, "train_accuracy", 1.0),
        (20, "test_accuracy", 0.981),
    ]
    compare.plot(compare.runs_table(runs), runs, tmp_path / "g.png")  # vl-convert draws it
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_the_table_shows_headline_metrics_only():
    from mnist_pipeline.stages.artifacts import HEADLINE_METRICS

    assert set(compare.HEADLINE) == set(HEADLINE_METRICS) - {"train_loss"}


def test_without_arguments_the_experiments_pipeline_runs_best_first(tracking_store, capsys):
    """After a `dvc repro` and a `dvc exp run` (no sweep at all): `compare` compares them."""
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("mnist")  # conf/tracking: the pipeline's
    for name, test in (("repro 12-05 10:00:00", 0.970), ("lr2", 0.980)):
        run = client.create_run(experiment, run_name=name, tags={"stage": "train"})
        for key, value in {"train_accuracy": 0.99, "test_accuracy": test}.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    client.create_run(experiment, tags={"stage": "download"})  # not a pipeline run's row
    assert compare.main([]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[0] for row in rows[1:]] == ["lr2", "repro"]  # best first, one row each
    with pytest.raises(SystemExit):  # a sweep asked for where there is none: one line
        compare.main(["--sweep"])
    assert capsys.readouterr().err.startswith("error: ")
