"""Failure handling: divergence, dead and interrupted runs, unreachable servers, many writers,
and reproducing a recorded run bit for bit."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from mnist_pipeline import tracking
from mnist_pipeline.core.errors import PipelineError
from mnist_pipeline.core.supervised import free_port
from mnist_pipeline.stages import download, evaluate, preprocess, train
from tests.helpers.config import compose_config, sha_overrides
from tests.helpers.processes import start_stage
from tools.workspace import GIT_IDENTITY


def test_diverging_training_stops_and_saves_nothing(tiny_cfg, tiny_mirror):
    download.download(tiny_cfg)
    preprocess.preprocess(tiny_cfg)
    cfg = compose_config(
        [
            *sha_overrides(tiny_mirror[1]),
            "optimizer=sgd",
            "optimizer.learning_rate=1e12",
            "model.units=32",
        ]
    )
    with pytest.raises(PipelineError, match="training diverged"):
        train.train(cfg)
    assert not (Path(cfg.paths.models) / "model.keras").exists()
    run = mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string="tags.stage = 'train'"
    )[0]
    assert run.info.status == "FAILED"
    assert "diverged" in run.data.tags["error"]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_runs_of_dead_processes_are_marked_killed(tiny_cfg):
    experiment = tracking.ensure_experiment(tiny_cfg.tracking.experiment_name)
    client = mlflow.MlflowClient()
    orphan = client.create_run(
        experiment, tags={"process.host": socket.gethostname(), "process.pid": str(dead_pid())}
    )
    alive = client.create_run(
        experiment, tags={"process.host": socket.gethostname(), "process.pid": str(os.getppid())}
    )
    download.download(tiny_cfg)  # any stage's next run cleans up
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert "died" in client.get_run(orphan.info.run_id).data.tags["error"]
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"


@pytest.mark.slow
def test_sigterm_stops_at_once_and_the_next_run_marks_it_killed(tiny_cfg, tiny_mirror, workdir):
    download.download(tiny_cfg)
    preprocess.preprocess(tiny_cfg)
    proc = start_stage(
        "train",
        workdir,
        dict(os.environ),
        *sha_overrides(tiny_mirror[1]),
        "train.epochs=100000",
        "model.units=32",
    )
    # Generous: the loop ends as soon as the run is RUNNING; on a loaded machine TensorFlow's
    # import alone has taken over a minute (a fixed 120 s failed there).
    deadline = time.monotonic() + 600
    running = []
    while not running and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        running = mlflow.search_runs(
            search_all_experiments=True,
            output_format="list",
            filter_string="tags.stage = 'train' and attributes.status = 'RUNNING'",
        )
    if not running:
        proc.kill()  # a training of 100000 epochs: reading its stderr would wait for it forever
    assert running, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "error: stopped by signal 15" in err and "Traceback" not in err
    assert not (workdir / "models/model.keras").exists()
    download.download(tiny_cfg)  # the next run, of any stage, closes the dead one
    run = mlflow.get_run(running[0].info.run_id)
    assert run.info.status == "KILLED"
    assert "died while the run was open" in run.data.tags["error"]


def test_unreachable_tracking_server_fails_fast(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.download"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert time.monotonic() - started < 20
    assert f"MLflow tracking server http://127.0.0.1:{port} is not reachable" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


WRITERS = 8
WRITER = """
import os
import sys
import traceback

import mlflow  # imported once, before the fork: each writer is a copy of this process
from mnist_pipeline import tracking
from tests.helpers.config import compose_config

cfg = compose_config()
n = int(sys.argv[1])
ready, said = os.pipe()
gates = [os.pipe() for _ in range(2)]  # before opening the runs, before logging into them


passed = []  # the gates this writer went through


def together(go):
    # A barrier: this writer says it is at the gate, then waits until the parent opens it.
    os.write(said, b".")
    os.read(go, 1)
    passed.append(go)

pids = []
for i in range(n):
    pid = os.fork()
    if pid:
        pids.append(pid)
        continue
    for go, start in gates:
        os.close(start)
    code = 0
    try:
        together(gates[0][0])
        with tracking.start_run(cfg, "writer", params={"writer": str(i)}):
            together(gates[1][0])  # all eight runs are open: now they all log
            for step in range(5):
                tracking.log_metrics({"value": float(i) + step}, step=step)
            tracking.log_dict({"writer": str(i)}, "writer.json")
    except BaseException:
        traceback.print_exc()
        os.write(said, b"!" * (len(gates) - len(passed)))  # the parent waits for no dead one
        code = 1
    sys.stderr.flush()
    os._exit(code)
os.close(said)  # the writers hold it: if they all die, the parent reads end of file
for go, start in gates:
    got = 0
    while got < n:  # every writer at the gate, or failed before it
        chunk = os.read(ready, n - got)
        if not chunk:
            break
        got += len(chunk)
    os.close(start)  # end of file on the gate's pipe: they all go
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
print(codes)
sys.exit(0 if codes == [0] * n else 1)
"""


@pytest.mark.slow
def test_eight_concurrent_writers_lose_nothing(tracking_store, tmp_path):
    """Eight processes, each with a connection of its own to one SQLite store, log runs,
    metrics and artifacts at once. They are forked from one process that imported MLflow
    (eight imports cost more than the test) and held at two gates (before opening their runs,
    before logging into them): the eight runs are open together and all write at once, made
    so rather than hoped for."""
    tracking.ensure_experiment("mnist")  # as a sweep does before its jobs start
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", WRITER, str(WRITERS)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.strip() == str([0] * WRITERS)
    assert "database is locked" not in result.stderr
    runs = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert sorted(r.data.params["writer"] for r in runs) == sorted(str(i) for i in range(WRITERS))
    assert len({r.data.tags["process.pid"] for r in runs}) == WRITERS  # eight processes
    # All open at once: the last run opened before the first one closed.
    assert max(r.info.start_time for r in runs) <= min(r.info.end_time for r in runs)
    client = mlflow.MlflowClient()
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "value")) == 5
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["writer.json"]


@pytest.fixture
def git_workdir(workdir):
    env = {**os.environ, **GIT_IDENTITY}
    (workdir / "README").write_text("v1\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "README"], ["git", "commit", "-qm", "v1"]):
        subprocess.run(cmd, cwd=workdir, env=env, check=True)
    return workdir, env


@pytest.mark.slow
def test_reproduce_a_run_bit_for_bit(tiny_cfg, git_workdir, tmp_path):
    from mnist_pipeline.experiments.reproduce import reproduce

    download.download(tiny_cfg)
    preprocess.preprocess(tiny_cfg)
    train.train(tiny_cfg)
    evaluate.evaluate(tiny_cfg)
    run_id = json.loads((Path(tiny_cfg.paths.models) / "run.json").read_text())["run_id"]
    assert mlflow.get_run(run_id).data.tags["git.dirty"] == "false"

    report = reproduce(run_id, tmp_path / "again")
    assert report["identical"], report["differences"]
    new = mlflow.get_run(report["run_id"])
    assert new.data.tags["reproduces"] == run_id
    assert new.data.tags["reproduce.identical"] == "true"
    assert new.data.metrics["test_accuracy"] == mlflow.get_run(run_id).data.metrics["test_accuracy"]


def test_reproduce_refuses_other_code_and_other_data(tiny_cfg, git_workdir, tmp_path):
    from mnist_pipeline.experiments.reproduce import reproduce

    workdir, env = git_workdir
    download.download(tiny_cfg)
    preprocess.preprocess(tiny_cfg)
    train.train(tiny_cfg)
    run_id = json.loads((Path(tiny_cfg.paths.models) / "run.json").read_text())["run_id"]

    (workdir / "README").write_text("v2\n")
    with pytest.raises(PipelineError, match="with uncommitted changes"):
        reproduce(run_id, tmp_path / "a")
    subprocess.run(["git", "commit", "-qam", "v2"], cwd=workdir, env=env, check=True)
    with pytest.raises(PipelineError, match="git switch --detach"):
        reproduce(run_id, tmp_path / "b")
    subprocess.run(["git", "switch", "-q", "--detach", "HEAD~1"], cwd=workdir, env=env, check=True)
    with pytest.raises(PipelineError, match="is a download run"):
        download.download(tiny_cfg)
        reproduce(
            mlflow.search_runs(
                search_all_experiments=True,
                output_format="list",
                filter_string="tags.stage = 'download'",
            )[0].info.run_id,
            tmp_path / "c",
        )
