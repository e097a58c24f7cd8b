"""A shared tracking server: PostgreSQL + `mlflow server`, both real, on loopback.

The pipeline and a sweep run with only ``MLFLOW_TRACKING_URI`` pointing at the server; the
checks then go through the server's REST API, as an outside client's would.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow import set_tracking_uri

from mnist_pipeline.core.project import PROJECT_ROOT
from mnist_pipeline.core.supervised import free_port
from mnist_pipeline.serving import registry
from mnist_pipeline.tracking import server as tracking_server
from tests.helpers.cli import exit_code
from tests.helpers.config import sha_overrides
from tests.helpers.processes import run_pipeline
from tests.helpers.services import MlflowServer, Postgres, require_extra, started

pytestmark = pytest.mark.heavy

EPOCHS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """PostgreSQL and an MLflow server on it, for this module; both stopped at the end."""
    require_extra("psycopg", "server")
    postgres = Postgres()
    try:
        folder = tmp_path_factory.mktemp("mlflow-server")
        mlflow = MlflowServer(postgres.dsn(), folder / "artifacts", folder / "server.log")
        try:
            yield mlflow, folder / "artifacts", postgres.password
        finally:
            mlflow.close()
    finally:
        postgres.close()


def api(url: str, path: str, body: dict | None = None) -> dict:
    """One call to MLflow's REST API: GET without a body, POST with one."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/api/2.0/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def fetch(url: str, path: str) -> bytes:
    with urllib.request.urlopen(f"{url}/api/2.0/{path}", timeout=30) as response:
        return response.read()


@pytest.mark.slow
def test_pipeline_and_sweep_land_on_the_server(server, tiny_mirror, tmp_path, monkeypatch, capsys):
    mlflow, artifacts, password = server
    folder, sha = tiny_mirror
    # The database password is in the server's environment, never in its arguments, which
    # every user of the machine can read.
    for process in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == mlflow.process.pid:
                assert password not in " ".join(process.info["cmdline"] or [])
    project_store = PROJECT_ROOT / "mlflow.db"
    store_before = project_store.stat().st_mtime_ns if project_store.exists() else None
    workdir = tmp_path / "work"
    workdir.mkdir()
    # The one setting that changes: the tracking URI. Nothing else points at the server.
    env = {**os.environ, "MNIST_MIRROR": str(folder), "MLFLOW_TRACKING_URI": mlflow.url}
    base = [*sha_overrides(sha), f"train.epochs={EPOCHS}"]
    for args in ([*base, "hydra.run.dir=single"], ["-m", *base, "model.units=16,32"]):
        result = run_pipeline(workdir, env, *args)
        assert result.returncode == 0, result.stderr[-3000:]

    experiment = api(mlflow.url, "mlflow/experiments/get-by-name?experiment_name=mnist")
    experiment_id = experiment["experiment"]["experiment_id"]
    # Proxied artifacts: clients see the server's scheme, never the storage behind it.
    assert experiment["experiment"]["artifact_location"].startswith("mlflow-artifacts:")
    runs = api(
        mlflow.url, "mlflow/runs/search", {"experiment_ids": [experiment_id], "max_results": 100}
    )["runs"]
    assert {r["info"]["status"] for r in runs} == {"FINISHED"}

    def tags(run: dict) -> dict:
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    train_runs = [r for r in runs if tags(r).get("stage") == "train"]
    assert len(train_runs) == 3  # the single run and the sweep's two jobs
    assert {tags(r).get("stage") for r in runs} >= {"download", "preprocess", "train"}

    parents = [r for r in runs if tags(r).get("sweep_role") == "parent"]
    assert len(parents) == 1
    children = [r for r in train_runs if "sweep_id" in tags(r)]
    assert {tags(r)["mlflow.parentRunId"] for r in children} == {parents[0]["info"]["run_id"]}
    units = {p["value"] for r in children for p in r["data"]["params"] if p["key"] == "model.units"}
    assert units == {"16", "32"}

    single = json.loads((workdir / "single/reports/metrics.json").read_text())
    for run in train_runs:
        run_id = run["info"]["run_id"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert {"fit_accuracy", "train_accuracy", "test_accuracy", "accuracy_gap"} <= set(metrics)
        if "sweep_id" not in tags(run):
            assert metrics["test_accuracy"] == pytest.approx(single["test_accuracy"])
        history = api(
            mlflow.url, f"mlflow/metrics/get-history?run_id={run_id}&metric_key=accuracy"
        )["metrics"]
        assert sorted(m["step"] for m in history) == list(range(1, EPOCHS + 1))
        files = {
            f["path"] for f in api(mlflow.url, f"mlflow/artifacts/list?run_id={run_id}")["files"]
        }
        assert {"config.json", "metrics.json", "confusion_matrix.png"} <= files

    sweep_files = api(mlflow.url, f"mlflow/artifacts/list?run_id={parents[0]['info']['run_id']}")
    assert {"comparison.md", "comparison.csv"} <= {f["path"] for f in sweep_files["files"]}

    models = api(mlflow.url, "mlflow/logged-models/search", {"experiment_ids": [experiment_id]})
    models = models["models"]
    assert sorted(m["info"]["source_run_id"] for m in models) == sorted(
        r["info"]["run_id"] for r in train_runs
    )
    for model in models:
        info = model["info"]
        assert info["status"] == "LOGGED_MODEL_READY"
        listing = api(mlflow.url, f"mlflow/logged-models/{info['model_id']}/artifacts/directories")
        assert "MLmodel" in {f["path"] for f in listing["files"]}
        # The files themselves, downloaded through the server's artifact proxy ...
        location = info["artifact_uri"].removeprefix("mlflow-artifacts:/")
        assert b"keras" in fetch(mlflow.url, f"mlflow-artifacts/artifacts/{location}/MLmodel")
        # ... and stored where the server was told to put them.
        assert (artifacts / location / "MLmodel").is_file()

    # The registry on the server: the sweep's best job registered, then promoted (the tiny
    # data's train/test gap is wide: the rule's limit is lifted). In-process: the command's
    # own wiring is tested in test_serving.
    with monkeypatch.context() as scope:
        scope.chdir(workdir)
        scope.setenv("MLFLOW_TRACKING_URI", mlflow.url)
        try:
            for args in (["--best-of-sweep"], ["--promote", "registry.max_gap=1"]):
                assert exit_code(registry.main, args) == 0, capsys.readouterr()
        finally:
            set_tracking_uri(None)  # the commands set it for the process
    registered = api(mlflow.url, "mlflow/registered-models/get?name=mnist")["registered_model"]
    assert {a["alias"]: a["version"] for a in registered["aliases"]}["champion"] == "1"
    version = api(mlflow.url, "mlflow/model-versions/get?name=mnist&version=1")["model_version"]

    # No validation split: the sweep's jobs are ranked by test accuracy, then the smaller gap.
    def rank(run: dict) -> tuple[float, float]:
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        return metrics["test_accuracy"], -metrics["accuracy_gap"]

    assert version["run_id"] == max(children, key=rank)["info"]["run_id"]

    # Nothing went to the project's own store or to a file store beside the work.
    assert (project_store.stat().st_mtime_ns if project_store.exists() else None) == store_before
    assert not (workdir / "mlruns").exists()


def test_server_refuses_an_unreachable_database(capsys):
    require_extra("psycopg", "server")
    uri = f"postgresql://mlflow:secret@127.0.0.1:{free_port()}/mlflow"
    with pytest.raises(SystemExit) as exit_info:
        tracking_server.main(["--backend-store-uri", uri])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "PostgreSQL store postgresql://mlflow:***@127.0.0.1" in err
    assert "is not usable" in err and "secret" not in err


def test_server_refuses_a_driver_that_is_not_installed(capsys):
    with pytest.raises(SystemExit):
        tracking_server.main(["--backend-store-uri", "postgresql+psycopg2://u:p@127.0.0.1/db"])
    assert "postgresql+psycopg2:// needs a driver" in capsys.readouterr().err


def test_server_without_the_extra_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    with pytest.raises(SystemExit) as exit_info:
        tracking_server.main(["--backend-store-uri", "postgresql://u:p@127.0.0.1/db"])
    assert exit_info.value.code == 1
    assert "the project's optional `server` extra: make server" in capsys.readouterr().err


def huey_stores() -> set[Path]:
    """The folders MLflow's servers make in /dev/shm (``tempfile.mkdtemp``) for their GenAI
    job runner's store (Huey)."""
    return {p for p in Path("/dev/shm").glob("tmp*") if p.is_dir()}


@pytest.mark.slow
def test_make_server_runs_mlflow_server_on_any_store_mlflow_knows(tmp_path):
    """`make server` on a SQLite store (a team's first server, before PostgreSQL): the real
    command prints where it listens and what to export, then is `mlflow server` itself."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mnist_pipeline.tracking_server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = tmp_path / "server.log"
    huey_before = huey_stores()
    server = started(command, f"http://127.0.0.1:{port}/health", dict(os.environ), log, 180)
    try:
        url = f"http://127.0.0.1:{port}"
        assert api(url, "mlflow/experiments/search", {"max_results": 10})["experiments"]
        # No GenAI job runner (mnist_pipeline.MLFLOW_JOBS_OFF): MLflow 3.17 would leave its
        # store in a /dev/shm folder it never removes, one per server start.
        assert huey_stores() <= huey_before, huey_stores() - huey_before
    finally:
        server.stop()
    printed = log.read_text()
    assert f"MLflow tracking server: {url} (runs in sqlite:///" in printed, printed[-2000:]
    assert f"export MLFLOW_TRACKING_URI={url}" in printed
    assert (tmp_path / "artifacts").is_dir() and (tmp_path / "server.db").is_file()
