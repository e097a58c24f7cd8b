"""Sweeps on a real Ray cluster (``hydra/launcher=ray_cluster``), started here on this machine."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

from hydra_plugins.mnist_ray_launcher import store_problem
from mnist_pipeline.core.supervised import free_port
from tests.helpers.processes import HEADLINE
from tests.helpers.services import require_extra

pytestmark = pytest.mark.slow


def stop_cluster(group: int) -> None:
    """End the cluster's processes by id: those in the session ``ray start`` made and their
    children (Ray gives each worker a process group of its own). Not ``ray stop``: that ends
    every Ray process of this user on the machine, other people's clusters included."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == group:
                members += [proc, *proc.children(recursive=True)]
        except (ProcessLookupError, psutil.Error):
            continue
    for proc in members:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    # Some of Ray's processes outlive SIGTERM for as long as they are let: 3 s is plenty
    # for the ones that do stop (a wait of 15 s cost the test 15 s every time).
    _, alive = psutil.wait_procs(members, timeout=3)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=15)


class Cluster(NamedTuple):
    address: str
    folder: Path  # where `ray start` ran: the raylet's, and so its workers', working directory
    decoy_store: Path  # the MLflow store in the cluster's own environment


@pytest.fixture
def ray_cluster(tmp_path) -> Iterator[Cluster]:
    """A one-node Ray cluster with 2 CPUs and ports and temp dir of its own, taken down even
    when the test fails.

    It starts in another folder than the sweep's, and with a decoy MLflow store in its
    environment, so a launcher that neither moves jobs to the sweep's folder nor hands them
    the sweep's store fails here as it would on a real cluster."""
    require_extra("ray", "cluster")
    # Short: Ray's Unix sockets live under it, and their paths may not exceed 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MNIST_"))}
    decoy = tmp_path / "decoy" / "mlflow.db"
    decoy.parent.mkdir()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{decoy}"
    port = free_port()
    ports = {
        "--port": port,
        "--ray-client-server-port": free_port(),
        "--dashboard-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    ray = Path(sys.executable).with_name("ray")
    cmd = [
        str(ray),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        *(f"{flag}={value}" for flag, value in ports.items()),
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    # A session of its own: every process `ray start` leaves behind is in its group.
    start = subprocess.Popen(
        cmd, cwd=temp, env=env, start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    try:
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, out[-3000:]
        yield Cluster(f"127.0.0.1:{port}", temp, decoy)
    finally:
        start.kill()
        stop_cluster(start.pid)
        shutil.rmtree(temp, ignore_errors=True)


def test_sweep_runs_as_ray_tasks(ray_cluster, sweep, workdir):
    result, parent, children = sweep(
        "model.units=16,32",
        "hydra/launcher=ray_cluster",
        f"hydra.launcher.address={ray_cluster.address}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert parent.info.status == "FINISHED"
    assert len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(r.data.params["model.units"] for r in children) == ["16", "32"]
    for run in children:
        assert run.info.status == "FINISHED"
        for key in HEADLINE:
            assert key in run.data.metrics, (key, run.data.tags["sweep_overrides"])
        # One CPU per job (num_cpus) becomes one TensorFlow thread.
        assert run.data.tags["tf.intra_op_threads"] == "1"
        # Not the launching process, but a worker process of this very cluster.
        pid = run.data.tags["process.pid"]
        assert pid != parent.data.tags["process.pid"]
        logs = ray_cluster.folder / "session_latest" / "logs"
        assert list(logs.glob(f"python-core-worker-*_{pid}.log")), pid
    # The jobs ran in the sweep's folder and logged to its store, not the cluster's.
    assert len(list(workdir.glob("multirun/*/*/[01]/.hydra/config.yaml"))) == 2
    assert not (ray_cluster.folder / "multirun").exists()
    assert not ray_cluster.decoy_store.exists()


def test_sqlite_store_refused_for_other_machines():
    uri = "sqlite:////srv/mnist/mlflow.db"
    assert store_problem(uri, set()) is None
    assert store_problem("http://mlflow:5000", {"node-2"}) is None
    assert "node-2" in store_problem(uri, {"node-2"})


def test_no_cluster_fails_fast_and_closes_the_parent(sweep):
    require_extra("ray", "cluster")
    address = f"127.0.0.1:{free_port()}"
    result, parent, children = sweep(
        "model.units=16,32", "hydra/launcher=ray_cluster", f"hydra.launcher.address={address}"
    )
    assert result.returncode == 1
    assert f"error: no Ray cluster at address={address}" in result.stderr
    assert "Traceback" not in result.stderr
    assert parent.info.status == "FAILED"
    assert "no Ray cluster" in parent.data.tags["error"]
    assert children == []


def test_a_lost_job_becomes_a_failed_run(tracking_store, tmp_path):
    """A job whose worker died reports nothing: the launcher records it, whether or not the
    job had opened its run, and the sweep ends as for any failed job."""
    import mlflow

    from mnist_pipeline.experiments import sweep_tracking

    parent = sweep_tracking.open_parent(tmp_path, "mnist", "x", ["model.units=16,32"], "sweep x")
    client = mlflow.MlflowClient()
    opened = client.create_run(
        client.get_experiment_by_name("mnist").experiment_id,
        tags={"mlflow.parentRunId": parent, "sweep_id": "x", "sweep_job": "0"},
    ).info.run_id
    crash = RuntimeError("worker died: SIGKILL")
    sweep_tracking.record_lost_job(tmp_path, 0, ["model.units=16"], crash)
    sweep_tracking.record_lost_job(tmp_path, 1, ["model.units=32"], crash)

    runs = {r.data.tags["sweep_job"]: r for r in sweep_tracking.child_runs(parent)}
    assert set(runs) == {"0", "1"}
    assert runs["0"].info.run_id == opened  # its own run, not a second one
    assert runs["1"].data.params["model.units"] == "32"
    for run in runs.values():
        assert run.info.status == "FAILED"
        assert "worker died" in run.data.tags["error"]


def test_a_failed_jobs_line_names_its_own_overrides_and_its_rerun():
    """Named by what is its alone (not the sweep's checksums and settings), on one line
    whatever the error's line breaks, with the command that reruns just it."""
    from types import SimpleNamespace

    from mnist_pipeline.experiments.sweep_tracking import describe_failure

    sweep = ["data.sha256.x=ab", "train.epochs=5", "model.units=16,32", "optimizer=sgd,adam"]
    tags = {
        "sweep_job": "3",
        "sweep_overrides": "data.sha256.x=ab train.epochs=5 model.units=32 optimizer=adam",
        "error": "NodeLost: the node\nwas declared dead",
    }
    run = SimpleNamespace(data=SimpleNamespace(tags=tags))
    assert describe_failure(run, sweep) == (
        "job 3 (model.units=32 optimizer=adam) failed: NodeLost: the node was declared dead; "
        "rerun it: the same command with model.units=32 optimizer=adam for model.units=16,32 "
        "optimizer=sgd,adam"
    )


def test_without_the_extra_the_launcher_says_what_to_install(monkeypatch):
    from hydra_plugins.mnist_ray_launcher import require_ray
    from mnist_pipeline.core.errors import ConfigError

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match="optional `cluster` extra"):
        require_ray()
