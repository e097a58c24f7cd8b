"""A cluster of hosts on this machine (``make cluster``): the project's commands on one worker
host, logged on the tracking host, pushed to the storage host and pulled on the other worker.

Every host is a network namespace made by ``tools/cluster``, started through its command
line as a user would; the commands run in a worker's namespace with ``ip netns exec``. The
tests share one cluster (a module fixture) and run in order: the last takes it down. They need
root and ``ip netns``: ``make test-cluster`` runs them, ``make test`` leaves them out.
"""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_pipeline.core.project import PROJECT_ROOT
from tests.helpers.cluster import (
    HOSTS,
    LAB,
    PREFIX,
    STATE,
    TRACKING,
    WAIT_FOR_TRAINING,
    alive,
    cluster,
    cmdline,
    env_file,
    error_lines,
    ip,
    namespace_pids,
    namespaces,
    ns_pids,
    on,
    require_namespaces,
    runs_on,
)  # fmt: skip
from tests.helpers.workspace import tiny_dvc_project

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.heavy]


@pytest.fixture(scope="module")
def lab():
    """The cluster, up for this module (``down`` at the end, whatever happened)."""
    require_namespaces()
    started = cluster("up")
    try:
        assert started.returncode == 0, started.stderr
        yield env_file(STATE / "client.env")
    finally:
        stopped = cluster("down")
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="module")
def project(lab, tiny_mirror, tmp_path_factory):
    """The project on the tiny data, in a git repository, with the clients' settings."""
    mirror, sha = tiny_mirror
    repo, env = tiny_dvc_project(tmp_path_factory.mktemp("cluster"), mirror, sha)
    return repo, {**env, **lab}


def test_hosts_see_only_the_lab_network(lab):
    """No host (nor the bridge) has a default route, an address outside 198.18.0.0/15 but
    loopback, or an interface in the machine's own namespace; PostgreSQL is on the tracking
    host's loopback only; and a second ``up`` changes nothing."""
    again = cluster("up")
    assert again.returncode == 0 and "already up" in again.stdout, again.stderr
    assert sorted(namespaces()) == sorted(PREFIX + h for h in ["lan", *HOSTS])
    for host in ["lan", *HOSTS]:
        routes = ip("-n", PREFIX + host, "route", "show", "table", "all")
        assert "default" not in routes, (host, routes)
        v4 = ip("-n", PREFIX + host, "-4", "route", "show").split("\n")
        assert [r.split()[0] for r in v4 if r] == ([] if host == "lan" else ["198.18.0.0/24"])
        for address in re.findall(r"inet (\S+)/", ip("-n", PREFIX + host, "-4", "addr")):
            address = ipaddress.ip_address(address)
            assert address.is_loopback or address in LAB, (host, address)
    own = ip("-o", "link")
    assert not any(f"v-{h}" in own for h in HOSTS)
    # From a worker: the server answers, the database behind it does not.
    connect = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)"
    on_worker = {"cwd": PROJECT_ROOT, "env": os.environ}
    mlflow = on("worker1", sys.executable, "-c", connect, HOSTS["tracking"], "5000", **on_worker)
    assert mlflow.returncode == 0, mlflow.stderr
    database = on("worker1", sys.executable, "-c", connect, HOSTS["tracking"], "5432", **on_worker)
    assert "Connection refused" in database.stderr


def test_a_worker_without_credentials_is_refused_in_one_line(project):
    repo, env = project
    anonymous = {k: v for k, v in env.items() if not k.startswith("MLFLOW_TRACKING_USER")}
    anonymous.pop("MLFLOW_TRACKING_PASSWORD")
    refused = on("worker1", "dvc", "repro", cwd=repo, env=anonymous)
    assert refused.returncode != 0
    assert error_lines(refused) == [
        f"error: MLflow tracking server {TRACKING} refused a client without credentials "
        "(401 Unauthorized): it needs MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    ], refused.stdout + refused.stderr
    wrong = on("worker1", "dvc", "repro", cwd=repo, env={**env, "MLFLOW_TRACKING_PASSWORD": "x"})
    assert wrong.returncode != 0
    assert error_lines(wrong) == [
        f"error: MLflow tracking server {TRACKING} refused user 'pipeline' (401 Unauthorized): "
        "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    ], wrong.stdout + wrong.stderr
    assert not (repo / "data" / "raw").exists()  # refused before any work


def test_a_worker_runs_the_pipeline_into_the_tracking_host(project):
    """``dvc repro`` on worker1 with the credentials: every stage's run FINISHED in the server
    (asked from worker2), the model uploaded through it to the tracking host's own folder,
    and no secret on a command line, in a log, a param or a tag."""
    repo, env = project
    result = on("worker1", "dvc", "repro", cwd=repo, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = runs_on("worker2", repo, env)
    assert runs and {r["status"] for r in runs} == {"FINISHED"}
    train = [r for r in runs if "test_accuracy" in r["metrics"] or "fit_accuracy" in r["metrics"]]
    assert train, [r["name"] for r in runs]
    assert all(r["artifact_uri"].startswith("mlflow-artifacts:/") for r in runs)
    assert list((STATE / "tracking" / "artifacts").rglob("*.keras"))  # proxied upload
    secrets = list(env_file(STATE / "secrets.env").values())
    logged = json.dumps([[r["params"], r["tags"]] for r in runs])
    logs = [p.read_text(errors="replace") for p in STATE.rglob("*.log")]
    command_lines = [Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                     for pid in namespace_pids()]  # fmt: skip
    assert command_lines and logs
    for secret in secrets:
        assert secret not in logged and not any(secret in text for text in logs + command_lines)


def test_push_from_one_worker_and_pull_on_the_other(project, tmp_path):
    """The outputs go to the storage host over SSH; a clone on worker2 pulls them and has
    nothing to reproduce, with no mirror to download from."""
    repo, env = project
    dvc = [sys.executable, "-m", "dvc"]
    remote, key = env["MNIST_CLUSTER_REMOTE"], env["MNIST_CLUSTER_KEY"]
    for command in (
        [*dvc, "remote", "add", "--default", "storage", remote],
        [*dvc, "remote", "modify", "--local", "storage", "keyfile", key],
        ["git", "add", "-A"],  # .dvc/config, dvc.lock and the tracked reports
        ["git", "commit", "-qm", "outputs on the storage host"],
    ):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    pushed = on("worker1", "dvc", "push", cwd=repo, env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert list((STATE / "storage" / "remote").rglob("*"))
    clone = tmp_path / "clone on worker2"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    subprocess.run([*dvc, "remote", "modify", "--local", "storage", "keyfile", key], cwd=clone,
                   check=True)  # fmt: skip
    offline = {**env, "MNIST_MIRROR": str(tmp_path / "no-mirror-here")}
    pulled = on("worker2", "dvc", "pull", cwd=clone, env=offline)
    assert pulled.returncode == 0, pulled.stderr
    for check in (["dvc", "status"], ["dvc", "repro"]):
        result = on("worker2", *check, cwd=clone, env=offline)
        assert result.returncode == 0 and "up to date" in result.stdout, result.stdout
    for path in ("reports/metrics.json", "models/model.keras"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes()


#: Posts the test set (data/processed/x_test.npy, pixels scaled to [0, 1]) from a worker;
#: prints the digits served.
POST_TEST_SET = """
import json, sys, urllib.request
import numpy as np
pixels = np.load("data/processed/x_test.npy") / np.float32(255)
body = json.dumps({"inputs": pixels.tolist()}).encode()
request = urllib.request.Request(sys.argv[1], body, {"Content-Type": "application/json"})
answers = json.load(urllib.request.urlopen(request, timeout=60))["predictions"]
print(json.dumps([a["digit"] for a in answers]))
"""


def test_the_champion_is_served_on_a_worker_from_the_tracking_hosts_registry(project):
    """register and promote on worker1; ``python -m mnist_pipeline.serve`` on worker2 loads
    the champion from the tracking host (through the server, with the credentials) and
    answers worker1 over the network with the evaluate stage's predictions."""
    repo, env = project
    loose = "registry.max_gap=1.0"  # tiny data: the gap is not what this test is about
    for step in ([], ["--promote"]):
        result = on("worker1", sys.executable, "-m", "mnist_pipeline.register", *step, loose,
                    cwd=repo, env=env)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    address = f"{HOSTS['worker2']}:5001"
    serve = [sys.executable, "-m", "mnist_pipeline.serve", "--host", HOSTS["worker2"]]
    server = subprocess.Popen(
        ["ip", "netns", "exec", PREFIX + "worker2", *serve, "--port", "5001", "--workers", "1"],
        cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        probe = f"import socket; socket.create_connection(({HOSTS['worker2']!r}, 5001), 2)"
        end = time.monotonic() + 240
        while on("worker1", sys.executable, "-c", probe, cwd=repo, env=env).returncode != 0:
            assert server.poll() is None and time.monotonic() < end, "serve did not start"
            time.sleep(1)
        posted = on("worker1", sys.executable, "-c", POST_TEST_SET,
                    f"http://{address}/invocations", cwd=repo, env=env)  # fmt: skip
        assert posted.returncode == 0, posted.stderr
        with (repo / "reports" / "test_predictions.csv").open() as f:
            evaluated = [int(row["predicted"]) for row in csv.DictReader(f)]
        assert json.loads(posted.stdout) == evaluated
    finally:
        server.terminate()
        try:
            server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()


def test_a_push_to_an_unreachable_storage_host_fails_and_a_later_one_completes(project):
    """The storage host's link down (in its namespace): ``dvc push`` fails with DVC's error,
    which names the host, instead of hanging; back up, the same push completes and leaves no
    temporary file on the remote."""
    repo, env = project
    payload = os.urandom(1 << 20)
    (repo / "extra.bin").write_bytes(payload)
    added = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "extra.bin"], cwd=repo,
                           env=env, capture_output=True, text=True)  # fmt: skip
    assert added.returncode == 0, added.stderr
    storage = PREFIX + "storage"
    ip("-n", storage, "link", "set", "eth0", "down")
    try:
        # No neighbour entry left from earlier pushes: the kernel's address resolution then
        # fails in seconds ("no route to host"), whatever its reachability timers are.
        ip("-n", PREFIX + "worker1", "neigh", "flush", "all")
        started = time.monotonic()
        cut = on("worker1", "timeout", "300", "dvc", "push", cwd=repo, env=env)
        seconds = time.monotonic() - started
    finally:
        ip("-n", storage, "link", "set", "eth0", "up")
    assert cut.returncode not in (0, 124), cut.stdout + cut.stderr  # 124: it hung
    errors = [line for line in cut.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and HOSTS["storage"] in errors[0], cut.stderr
    assert "Traceback" not in cut.stderr and seconds < 300
    pushed = on("worker1", "dvc", "push", cwd=repo, env=env)
    assert pushed.returncode == 0 and "1 file pushed" in pushed.stdout, pushed.stderr
    remote = STATE / "storage" / "remote"
    assert not [p for p in remote.rglob("*") if "tmp" in p.name]
    stored = [p for p in remote.rglob("*") if p.is_file() and p.stat().st_size == len(payload)]
    assert [p.read_bytes() for p in stored] == [payload]


def train_losing(repo: Path, env: dict, server: str, lose) -> tuple[str, str]:
    """A training on worker1 that loses ``server`` (``lose()`` kills it) mid-run: held still
    (SIGSTOP) while it goes, so that it is lost mid-run however fast this machine trains; it
    meets the loss at its next call to the tracking server. Checks that it fails with one
    ``error:`` line, no traceback, and its model kept; ``up`` then starts ``server`` again.
    Returns the line and the id of the run it lost."""
    model = (repo / "models" / "model.keras").read_bytes()
    quick = {**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
    training = subprocess.Popen(
        ["ip", "netns", "exec", PREFIX + "worker1", *TRAIN, "train.epochs=30"],
        cwd=repo, env=quick, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen = on("worker2", sys.executable, "-c", WAIT_FOR_TRAINING, cwd=repo, env=env)
        assert seen.returncode == 0, seen.stderr
        os.kill(training.pid, signal.SIGSTOP)
        lose()
        os.kill(training.pid, signal.SIGCONT)
        _, stderr = training.communicate(timeout=300)
    finally:
        training.kill()
    assert training.returncode == 1, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert (repo / "models" / "model.keras").read_bytes() == model
    again = cluster("up")
    assert again.returncode == 0 and f"started again: {server}" in again.stdout, again.stderr
    return lines[0], seen.stdout.strip()


def rerun_closes_the_lost_run(repo: Path, env: dict, lost_id: str) -> None:
    """A rerun logs normally and marks the run the loss left RUNNING KILLED: none is left
    RUNNING."""
    rerun = on("worker1", *TRAIN, cwd=repo, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    runs = runs_on("worker2", repo, env)
    assert "RUNNING" not in {r["status"] for r in runs}
    assert runs[0]["status"] == "FINISHED" and "fit_accuracy" in runs[0]["metrics"]  # the rerun
    [lost] = [r for r in runs if r["id"] == lost_id]
    assert lost["status"] == "KILLED" and "died while the run was open" in lost["tags"]["error"]


TRAIN = [sys.executable, "-m", "mnist_pipeline.train"]


def test_the_tracking_server_lost_mid_run_fails_the_stage_in_one_line(project):
    """``mlflow server`` killed (SIGKILL) while a training logs to it: the stage ends with one
    error line once MLflow's retries (1 here: MLFLOW_HTTP_REQUEST_MAX_RETRIES) are spent and
    keeps its model; ``up`` starts the server again with its runs, and a rerun logs normally,
    marking the lost run KILLED, so that none is left RUNNING."""
    repo, env = project

    def kill_mlflow_server() -> None:
        # The server's Python processes (mlflow, uvicorn, its job runners), not PostgreSQL's
        # (whose command lines name the user, mlflow, too).
        python = sys.executable.encode()
        for pid in ns_pids("tracking"):
            if cmdline(pid).split(b"\0")[0] == python:
                with contextlib.suppress(ProcessLookupError):  # gone with its parent
                    os.kill(pid, signal.SIGKILL)

    line, lost_id = train_losing(repo, env, "mlflow server", kill_mlflow_server)
    # Why, in the parentheses, depends on the moment: a call cut mid-answer ("Remote end
    # closed connection without response") or a new one refused ("Connection refused").
    assert re.fullmatch(
        rf"error: the MLflow store {TRACKING} stopped answering \([^()]+\): start it again "
        r"and rerun \(the run left RUNNING is then marked KILLED\)",
        line,
    ), line
    rerun_closes_the_lost_run(repo, env, lost_id)


def test_the_tracking_hosts_database_lost_mid_run_fails_the_stage_in_one_line(project):
    """PostgreSQL killed (SIGKILL, every process of it) under the running ``mlflow server``
    while a training logs: the server answers 503, and once MLflow's retries are spent the
    stage ends with one line that points at the database, keeping its model; ``up`` starts
    PostgreSQL again (crash recovery, its runs kept) and a rerun logs normally, marking the
    lost run KILLED."""
    repo, env = project

    def kill_postgres() -> None:
        # The postmaster (its program's path) and its backends (retitled "postgres: ...").
        names = (str(hosts_postgres_bin()).encode(), b"postgres: ")
        for pid in ns_pids("tracking"):
            if cmdline(pid).startswith(names):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    line, lost_id = train_losing(repo, env, "PostgreSQL", kill_postgres)
    # 503 (its auth app's checks need the database) or 500 (a handler's own query).
    assert re.fullmatch(
        rf"error: the MLflow store {TRACKING} answers, but only with errors \(5\d\d, after its "
        r"retries\): its database is likely down \(the server's log says why\); start that "
        r"again and rerun \(the run left RUNNING is then marked KILLED\)",
        line,
    ), line
    rerun_closes_the_lost_run(repo, env, lost_id)


def hosts_postgres_bin() -> Path:
    """PostgreSQL's server program, as the cluster starts it (its processes' argv[0])."""
    from tools.cluster.hosts import require_postgres

    return require_postgres() / "postgres"


def test_down_leaves_nothing_behind(lab):
    """Last (the cluster goes): every process, namespace and the state folder go; again,
    nothing to do."""
    pids = namespace_pids()
    assert pids
    first = cluster("down")
    assert first.returncode == 0, first.stderr
    assert namespaces() == [] and not STATE.exists()
    assert not [pid for pid in pids if alive(pid)]
    again = cluster("down")
    assert again.returncode == 0 and namespaces() == [], again.stderr
