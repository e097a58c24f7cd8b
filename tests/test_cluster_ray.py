"""A sweep on a two-node Ray cluster across the namespace cluster's worker hosts.

``tools/cluster`` makes the hosts, ``tools/cluster_ray.py`` starts Ray on worker1 (head)
and worker2, with token authentication; both are started through their command lines, as a
user would, and the sweeps run in a worker's namespace through ``tools.cluster_ray run``.
Each node has one CPU and each job asks for one, so the sweep's two jobs run at the same time,
one on each host. The module shares one cluster; it needs root (``make test-cluster``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from mnist_pipeline.core.project import PROJECT_ROOT
from tests.helpers.cluster import WAIT_FOR_TRAINING, require_namespaces
from tests.helpers.config import sha_overrides
from tests.helpers.services import require_extra
from tests.helpers.store import seed

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.heavy]

PREFIX = f"mnistr{os.getpid()}-"  # apart from a cluster started by hand, or another test's
STATE = Path(f"/var/tmp/{PREFIX}c")  # short: Ray's socket paths live under it
ENV = {**os.environ, "MNIST_CLUSTER_PREFIX": PREFIX, "MNIST_CLUSTER_STATE": str(STATE)}
WORKER1, WORKER2 = "198.18.0.31", "198.18.0.32"
ADDRESS = f"{WORKER1}:6379"
RUNS = """
import json, sys, mlflow
runs = mlflow.search_runs(experiment_names=[sys.argv[1]], output_format="list")
print(json.dumps([{"id": r.info.run_id, "status": r.info.status, "tags": r.data.tags,
                   "params": r.data.params, "end": r.info.end_time} for r in runs]))
"""


def tool(module: str, *args: str, env: dict | None = None, timeout: float = 300):
    """``python -m tools.<module> args...`` from the project, as ``make cluster`` runs it."""
    return subprocess.run(
        [sys.executable, "-m", f"tools.{module}", *args],
        cwd=PROJECT_ROOT,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def on(host: str, folder: Path, *command: str, client: str = "cluster_ray", **kw):
    """``command`` in ``folder`` on ``host``, with a client's settings: ``cluster_ray``'s
    (tracking credentials and Ray's token) or ``cluster``'s (tracking credentials only)."""
    return tool(client, "run", host, "--", "env", "-C", str(folder), *command, **kw)


def sweep_command(
    host: str, folder: Path, experiment: str, mirror, client="cluster_ray", units="16,32",
    epochs=1, **settings,
) -> list[str]:  # fmt: skip
    """The command of a sweep over ``model.units`` from ``folder`` on ``host``;
    ``settings`` outrank the client's."""
    mirror, sha = mirror
    return [
        sys.executable, "-m", f"tools.{client}", "run", host, "--", "env", "-C", str(folder),
        f"MNIST_MIRROR={mirror}", *(f"{k}={v}" for k, v in settings.items()),
        sys.executable, "-m", "mnist_pipeline.pipeline", "-m",
        *sha_overrides(sha), f"train.epochs={epochs}", f"model.units={units}",
        f"tracking.experiment_name={experiment}", "hydra/launcher=ray_cluster",
        f"hydra.launcher.address={ADDRESS}", "hydra.launcher.num_cpus=1",
    ]  # fmt: skip


def sweep(host: str, folder: Path, experiment: str, mirror, client="cluster_ray", **settings):
    """The sweep of two jobs from ``folder`` on ``host``; ``settings`` outrank the client's."""
    command = sweep_command(host, folder, experiment, mirror, client, **settings)
    return subprocess.run(
        command, cwd=PROJECT_ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )


def runs(folder: Path, experiment: str) -> dict[str, list[dict]]:
    """The experiment's runs in the tracking server (asked from worker1): parents, children."""
    answer = on("worker1", folder, sys.executable, "-c", RUNS, experiment, timeout=120)
    assert answer.returncode == 0, answer.stderr[-2000:]
    found = json.loads(answer.stdout.strip().splitlines()[-1])
    return {
        "parents": [r for r in found if r["tags"].get("sweep_role") == "parent"],
        "children": [r for r in found if r["tags"].get("stage") == "train"],
    }


def namespace_pids(host: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", PREFIX + host], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def ray_processes() -> list[int]:
    """Pids of this cluster's Ray processes: all processes in its worker namespaces."""
    return namespace_pids("worker1") + namespace_pids("worker2")


@pytest.fixture(scope="module")
def ray_lab(tiny_mirror):
    """The namespace cluster and Ray on its workers, for this module; both taken down at the
    end, whatever happened. Yields the secrets a log must never show."""
    require_extra("ray", "cluster")
    require_namespaces()
    try:
        started = tool("cluster", "up")
        assert started.returncode == 0, started.stderr[-2000:]
        ray = tool("cluster_ray", "up")
        assert ray.returncode == 0, ray.stderr[-3000:]
        client = dict(
            line.split("=", 1) for line in (STATE / "client.env").read_text().splitlines()
        )
        yield {
            "token": (STATE / "ray" / "auth_token").read_text(),
            "password": client["MLFLOW_TRACKING_PASSWORD"],
        }
    finally:
        stopped = tool("cluster_ray", "down")
        left = ray_processes()
        servers = [namespace_pids("tracking"), namespace_pids("storage")]
        tool("cluster", "down")
    # Stopping Ray stopped all of Ray, and only Ray: the other hosts' servers ran on.
    assert stopped.returncode == 0, stopped.stderr
    assert left == []
    assert all(servers), servers
    assert not STATE.exists()


@pytest.fixture
def folder(tmp_path):
    """The sweep's folder, on the file system every host shares, with a space in its path."""
    work = tmp_path / "sweep folder"
    work.mkdir()
    return work


@pytest.mark.timeout(900)  # two trainings at once on a shared machine: about 2.5 minutes
def test_a_sweep_runs_on_both_hosts(ray_lab, tiny_mirror, folder):
    # No secret on any process's command line (ps shows those to every user).
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        assert ray_lab["token"] not in line and ray_lab["password"] not in line
    result = sweep("worker1", folder, "ray-sweep", tiny_mirror)
    assert result.returncode == 0, result.stderr[-3000:]

    found = runs(folder, "ray-sweep")
    [parent] = found["parents"]
    children = found["children"]
    assert parent["status"] == "FINISHED"
    assert sorted(r["params"]["model.units"] for r in children) == ["16", "32"]
    for run in children:
        assert run["status"] == "FINISHED", run["tags"].get("error")
        assert run["tags"]["mlflow.parentRunId"] == parent["id"]
    # One job on each host, each run saying which (the hosts share one hostname).
    assert sorted(r["tags"]["process.address"] for r in children) == [WORKER1, WORKER2]
    # The credentials reached the jobs, yet no param, tag or log shows them.
    for run in [parent, *children]:
        for value in [*run["params"].values(), *run["tags"].values()]:
            assert ray_lab["token"] not in value and ray_lab["password"] not in value
    logs = [result.stdout, result.stderr]
    for path in [*STATE.rglob("*"), *folder.rglob("*")]:
        text = path.suffix in {".log", ".out", ".err", ".yaml", ".txt", ""} and path.is_file()
        if text and path.name != "auth_token" and "pg" not in path.parts:
            logs.append(path.read_text(errors="replace"))
    assert len(logs) > 10  # Ray's logs of both nodes among them
    for text in logs:
        assert ray_lab["token"] not in text and ray_lab["password"] not in text


@pytest.mark.timeout(900)
def test_a_host_cut_off_mid_sweep_loses_its_job_and_the_rerun_completes_the_set(
    ray_lab, tiny_mirror, folder
):
    """worker2's link cut (``ip link set eth0 down`` in its namespace) while its job trains:
    the sweep gives the job up once Ray declares the node dead (the lab's health checks:
    5 to 10 s), the job on worker1 finishes, the job's run and the sweep's parent are FAILED
    saying which job was lost and why, and the sweep exits 1 with one ``error:`` line naming
    the job and how to rerun it. With the link back, ``tools.cluster_ray down`` and ``up``
    bring the lost node back, and the rerun the line gives completes the set."""
    experiment = "ray-cut"
    # Epochs enough that worker2's job still trains when the link goes, however fast.
    command = sweep_command("worker1", folder, experiment, tiny_mirror, epochs=5)
    running = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        on_worker2 = f"and tags.`process.address` = '{WORKER2}'"
        seen = on("worker1", folder, sys.executable, "-c", WAIT_FOR_TRAINING, on_worker2)
        assert seen.returncode == 0, seen.stderr[-2000:]
        subprocess.run(["ip", "-n", PREFIX + "worker2", "link", "set", "eth0", "down"], check=True)
        cut = time.time()
        _, stderr = running.communicate(timeout=600)
    finally:
        running.kill()
        subprocess.run(["ip", "-n", PREFIX + "worker2", "link", "set", "eth0", "up"], check=True)
    assert running.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, stderr[-3000:]
    assert re.fullmatch(
        rf"error: job (\d) \(model\.units=(16|32)\) failed: NodeLost: the Ray node {WORKER2} it "
        r"ran on \(node id \w+\) was declared dead: its host is down or cut off from the "
        r"cluster \(it missed the cluster's health checks\); rerun it: the same command with "
        r"model\.units=\2 for model\.units=16,32",
        errors[0],
    ), errors[0]
    lost_units = re.search(r"model\.units=(\d+)\)", errors[0]).group(1)
    assert "Traceback" not in stderr
    found = runs(folder, experiment)
    [parent] = found["parents"]
    by_units = {r["params"]["model.units"]: r for r in found["children"]}
    assert sorted(by_units) == ["16", "32"]
    lost = by_units[lost_units]
    assert lost["id"] == seen.stdout.split()[-1]  # the run that was training at the cut
    assert lost["status"] == "FAILED" and "NodeLost" in lost["tags"]["error"]
    assert lost["tags"]["process.address"] == WORKER2
    [other] = [r for u, r in by_units.items() if u != lost_units]
    assert other["status"] == "FINISHED" and other["tags"]["process.address"] == WORKER1
    assert parent["status"] == "FAILED"
    assert parent["tags"]["error"] == errors[0].removeprefix("error: ")
    # Given up within seconds (the lab's health checks: 5 to 10 s), not after gRPC's minutes.
    assert lost["end"] / 1000 - cut < 30, lost["end"] / 1000 - cut

    # The lost node back: its raylet exits once it hears it was declared dead; down and up
    # do not wait for that.
    for action in ("down", "up"):
        again = tool("cluster_ray", action)
        assert again.returncode == 0, again.stderr[-2000:]
    rerun = subprocess.run(
        sweep_command("worker1", folder, experiment, tiny_mirror, units=lost_units),
        cwd=PROJECT_ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    children = runs(folder, experiment)["children"]
    finished = {r["params"]["model.units"] for r in children if r["status"] == "FINISHED"}
    assert finished == {"16", "32"}
    assert "RUNNING" not in {r["status"] for r in children}


@pytest.mark.parametrize("token", ["none", "wrong"])
def test_a_client_without_the_token_is_refused_in_one_line(ray_lab, tiny_mirror, folder, token):
    """From worker2 with the tracking credentials but not Ray's token (none, or another):
    one line, in seconds (not Ray's 20 s of retries), the sweep's parent FAILED with it."""
    settings = {}
    if token == "wrong":
        wrong = folder / "wrong_token"
        wrong.write_text("0" * 64)
        settings = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)}
    started = time.monotonic()
    experiment = f"ray-refused-{token}"
    result = sweep("worker2", folder, experiment, tiny_mirror, client="cluster", **settings)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [
        f"error: the Ray cluster at address={ADDRESS} refused this client: its token is "
        "missing or wrong (Ray's token authentication: set RAY_AUTH_MODE=token and "
        "RAY_AUTH_TOKEN_PATH to a file holding the cluster's token; docs/operations.md)"
    ], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "InvalidAuthToken" not in result.stderr
    [parent] = runs(folder, experiment)["parents"]
    assert parent["status"] == "FAILED"
    assert "refused this client" in parent["tags"]["error"]
    assert time.monotonic() - started < 300


def test_a_sqlite_store_is_refused_for_the_other_host(ray_lab, tiny_mirror, folder, store_template):
    """The store check compares node addresses: by hostname (one for every namespace) the
    node on worker2 would pass as this machine."""
    database = seed(store_template, folder / "mlflow.db")
    uri = f"sqlite:///{database}"
    result = sweep("worker1", folder, "ray-sqlite", tiny_mirror, MLFLOW_TRACKING_URI=uri)
    assert result.returncode == 1
    assert re.search(rf"error: the MLflow store sqlite:.* has nodes on {WORKER2}, ", result.stderr)
    assert WORKER1 not in result.stderr.split("nodes on", 1)[1].splitlines()[0]


@pytest.mark.timeout(900)
def test_one_training_across_both_hosts(ray_lab, prepared, tiny_mirror, workdir, tmp_path):
    """``train.strategy=multi_worker`` with a worker on each host (``TF_CONFIG`` with their
    addresses), logging to the tracking server: one run, and the model ``mirrored`` training
    on one device makes, within tests/test_distributed.py's tolerances."""
    from tests.test_distributed import (
        VS_MIRRORED,
        WEIGHTS_ATOL,
        files_under,
        overrides,
        train_in_process,
        wait_for_workers,
    )

    sha = tiny_mirror[1]
    other = tmp_path / "worker2 folder"  # the second host's copy of the processed data
    shutil.copytree(workdir / "data/processed", other / "data/processed")
    before = files_under(other)
    procs, logs = start_workers(workdir, other, "multi-worker", overrides(sha, "multi_worker"))
    errors = wait_for_workers(procs, logs)
    for proc, err in zip(procs, errors, strict=True):
        assert proc.returncode == 0, err[-3000:]

    [run] = runs(workdir, "multi-worker")["children"]  # the train runs: one, by the chief
    run_ref = json.loads((workdir / "models/run.json").read_text())
    assert run["id"] == run_ref["run_id"] and run["status"] == "FINISHED"
    assert run["params"]["train.strategy"] == "multi_worker"
    assert run["tags"]["distribute.workers"] == "2"
    assert files_under(other) == before  # the other worker wrote nothing

    mirrored, mirrored_weights = train_in_process(sha, "mirrored")
    for key in ("train_accuracy", "fit_accuracy"):
        assert abs(run_ref["train_metrics"][key] - mirrored[key]) <= VS_MIRRORED, key
    from mnist_pipeline.stages.artifacts import load_model

    weights = load_model(workdir / "models").get_weights()
    for a, b in zip(weights, mirrored_weights, strict=True):
        np.testing.assert_allclose(a, b, atol=WEIGHTS_ATOL)


def start_workers(
    chief: Path, other: Path, experiment: str, train_overrides: list[str], *settings: str
) -> tuple[list[subprocess.Popen], list[Path]]:
    """``python -m mnist_pipeline.train`` as worker 0 (the chief, in ``chief``) on worker1 and
    worker 1 (in ``other``) on worker2, ``TF_CONFIG`` naming their addresses; ``settings``
    (NAME=value) in both environments. Their processes and log files (stdout, where Hydra
    logs, and stderr, where errors go)."""
    cluster = {"worker": [f"{WORKER1}:12345", f"{WORKER2}:12345"]}
    quiet = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    procs, logs = [], []
    for index, (host, cwd, extra) in enumerate([("worker1", chief, []), ("worker2", other, quiet)]):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        command = [
            sys.executable, "-m", "tools.cluster", "run", host, "--", "env", "-C", str(cwd),
            f"TF_CONFIG={tf_config}", *settings, sys.executable, "-m", "mnist_pipeline.train",
            *train_overrides, f"tracking.experiment_name={experiment}", *extra,
        ]  # fmt: skip
        logs.append(other.parent / f"{host}.log")
        with logs[-1].open("w") as log:
            procs.append(
                subprocess.Popen(
                    command, cwd=PROJECT_ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT
                )
            )
    return procs, logs


@pytest.mark.timeout(900)
def test_a_worker_cut_off_mid_training_stops_both_in_one_line(
    ray_lab, prepared, tiny_mirror, workdir, tmp_path
):
    """worker2's link cut while the two workers train: TensorFlow's coordination service
    misses worker2's heartbeats (10 s, its default) and aborts the chief's collective ops;
    the chief ends with one ``error:`` line naming worker2, within a minute of the cut (the
    collective timeout, 60 s here, is only the backstop), its run FAILED with the reason and
    ``models/`` untouched. The cut-off worker stops too, in one line."""
    from tests.test_distributed import files_under, overrides

    sha = tiny_mirror[1]
    other = tmp_path / "worker2 folder"
    shutil.copytree(workdir / "data/processed", other / "data/processed")
    models = files_under(workdir / "models") if (workdir / "models").exists() else {}
    # Epochs enough to be mid-training at the cut, however fast this machine is.
    train = [*overrides(sha, "multi_worker"), "train.epochs=200"]
    procs, logs = start_workers(workdir, other, "multi-worker-cut", train)
    link = ["ip", "-n", PREFIX + "worker2", "link", "set", "eth0"]
    try:
        end = time.monotonic() + 600
        while "epoch 2/" not in logs[0].read_text(errors="replace"):
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            assert time.monotonic() < end, "the training did not start"
            time.sleep(0.5)
        subprocess.run([*link, "down"], check=True)
        cut = time.monotonic()
        procs[0].wait(timeout=300)
        seconds = time.monotonic() - cut
        procs[1].wait(timeout=300)
    finally:
        subprocess.run([*link, "up"], check=True)
        for proc in procs:
            proc.kill()
    said = [log.read_text(errors="replace") for log in logs]
    assert [p.returncode for p in procs] == [1, 1], said
    chief = [line for line in said[0].splitlines() if line.startswith("error:")]
    assert len(chief) == 1, said[0][-3000:]
    # Named by its task (the coordination service's heartbeats) or by its address (a call
    # to it that failed first).
    assert re.fullmatch(
        rf"error: multi-worker training stopped: worker (1 )?{WORKER2}:12345 stopped answering "
        r"\((UnavailableError|DeadlineExceededError)\); nothing was published: start every "
        r"worker again with the same TF_CONFIG",
        chief[0],
    ), chief[0]
    assert seconds < 60, seconds
    cut_off = [line for line in said[1].splitlines() if line.startswith("error:")]
    assert len(cut_off) == 1 and "multi-worker training stopped" in cut_off[0], said[1][-3000:]
    assert "Traceback" not in said[0] + said[1]
    found = files_under(workdir / "models") if (workdir / "models").exists() else {}
    assert found == models  # nothing published
    [run] = runs(workdir, "multi-worker-cut")["children"]
    assert run["status"] == "FAILED"
    assert run["tags"]["error"] == "PipelineError: " + chief[0].removeprefix("error: ")
