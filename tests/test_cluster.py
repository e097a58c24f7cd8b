"""A cluster of hosts on this machine (``make cluster``): the project's commands on one worker
host, logged on the tracking host, pushed to the storage host and pulled on the other worker.

Every host is a network namespace made by ``tools/cluster.py``, started through its command
line as a user would; the commands run in a worker's namespace with ``ip netns exec``. The
tests share one cluster (a module fixture) and run in order: the last takes it down. They need
root and ``ip netns``: ``make test-cluster`` runs them, ``make test`` leaves them out.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_pipeline.core.project import PROJECT_ROOT
from tests.helpers.services import missing
from tests.helpers.workspace import tiny_dvc_project

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.heavy]

PREFIX = f"mnistt{os.getpid()}-"  # apart from a cluster someone started by hand
STATE = Path(f"/var/tmp/{PREFIX}cluster")
HOSTS = {"tracking": "198.18.0.10", "storage": "198.18.0.20"}
HOSTS |= {"worker1": "198.18.0.31", "worker2": "198.18.0.32"}
TRACKING = f"http://{HOSTS['tracking']}:5000"
LAB = ipaddress.ip_network("198.18.0.0/15")
CLUSTER_ENV = {**os.environ, "MNIST_CLUSTER_PREFIX": PREFIX, "MNIST_CLUSTER_STATE": str(STATE)}


def cluster(*args: str) -> subprocess.CompletedProcess:
    """``python -m tools.cluster args...``, as ``make cluster`` runs it."""
    return subprocess.run(
        [sys.executable, "-m", "tools.cluster", *args],
        cwd=PROJECT_ROOT,
        env=CLUSTER_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def on(host: str, *command: str, cwd: Path, env: dict, timeout: float = 600):
    """``command`` on ``host`` (in its network namespace), its output captured."""
    return subprocess.run(
        ["ip", "netns", "exec", PREFIX + host, *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.startswith(PREFIX)]


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "error:" in line]


@pytest.fixture(scope="module")
def lab():
    """The cluster, up for this module (``down`` at the end, whatever happened)."""
    if os.geteuid() != 0:
        missing("the cluster needs root (network namespaces); CI runs as root")
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing(f"ip netns is not available here: {probe.stderr.strip()}")
    if not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        missing("sshd not found (Debian: apt-get install openssh-server); .ci/run installs it")
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


def runs_on(host: str, repo: Path, env: dict) -> list[dict]:
    """Every run in the tracking server, asked from ``host`` through MLflow's client."""
    script = (
        "import json, mlflow\n"
        "runs = mlflow.search_runs(search_all_experiments=True, output_format='list')\n"
        "print(json.dumps([{'status': r.info.status, 'name': r.info.run_name,\n"
        "    'artifact_uri': r.info.artifact_uri, 'metrics': r.data.metrics,\n"
        "    'params': r.data.params, 'tags': r.data.tags} for r in runs]))\n"
    )
    result = on(host, sys.executable, "-c", script, cwd=repo, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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


def alive(pid: int) -> bool:
    """Running, not merely a zombie that nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def namespace_pids() -> list[int]:
    return [int(p) for ns in namespaces() for p in ip("netns", "pids", ns).split()]


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


#: Waits, on a worker, until the tracking server has a RUNNING run of the train stage: a loop
#: in one process (MLflow's client would take seconds to import for each look).
WAIT_FOR_TRAINING = """
import base64, json, os, time, urllib.request
auth = base64.b64encode(
    f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ['MLFLOW_TRACKING_PASSWORD']}".encode()
).decode()
def call(path, body):
    request = urllib.request.Request(
        os.environ["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/" + path, json.dumps(body).encode(),
        {"Authorization": "Basic " + auth, "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=10))
end = time.monotonic() + 120
while time.monotonic() < end:
    found = call("experiments/search", {"max_results": 100})["experiments"]
    ids = [e["experiment_id"] for e in found]
    runs = call("runs/search", {"experiment_ids": ids,
        "filter": "attributes.status = 'RUNNING' and tags.stage = 'train'"}).get("runs", [])
    if runs:
        raise SystemExit(0)
    time.sleep(0.2)
raise SystemExit("no training run started")
"""


def test_the_tracking_server_lost_mid_run_fails_the_stage_in_one_line(project):
    """``mlflow server`` killed (SIGKILL) while a training logs to it: the stage ends with one
    error line once MLflow's retries (1 here: MLFLOW_HTTP_REQUEST_MAX_RETRIES) are spent and
    keeps its model; ``up`` starts the server again with its runs, and a rerun logs normally,
    marking the lost run KILLED, so that none is left RUNNING."""
    repo, env = project
    model = (repo / "models" / "model.keras").read_bytes()
    quick = {**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
    train = [sys.executable, "-m", "mnist_pipeline.train"]
    training = subprocess.Popen(
        ["ip", "netns", "exec", PREFIX + "worker1", *train, "train.epochs=30"],
        cwd=repo, env=quick, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen = on("worker2", sys.executable, "-c", WAIT_FOR_TRAINING, cwd=repo, env=env)
        assert seen.returncode == 0, seen.stderr
        # Held still (SIGSTOP) while the server goes, so that it is lost mid-run however
        # fast this machine trains; it meets the loss at its next call to the server.
        os.kill(training.pid, signal.SIGSTOP)
        # The server's Python processes (mlflow, uvicorn, its job runners), not PostgreSQL's
        # (whose command lines name the user, mlflow, too).
        python = sys.executable.encode()
        for pid in ns_pids("tracking"):
            if cmdline(pid).split(b"\0")[0] == python:
                with contextlib.suppress(ProcessLookupError):  # gone with its parent
                    os.kill(pid, signal.SIGKILL)
        os.kill(training.pid, signal.SIGCONT)
        _, stderr = training.communicate(timeout=300)
    finally:
        training.kill()
    assert training.returncode == 1, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: the MLflow store {TRACKING} stopped answering ([Errno 111] Connection refused): "
        "start it again and rerun (the run left RUNNING is then marked KILLED)"
    ], stderr[-3000:]
    assert "Traceback" not in stderr
    assert (repo / "models" / "model.keras").read_bytes() == model
    again = cluster("up")
    assert again.returncode == 0 and "started again: mlflow server" in again.stdout, again.stderr
    rerun = on("worker1", *train, cwd=repo, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    runs = runs_on("worker2", repo, env)
    assert "RUNNING" not in {r["status"] for r in runs}
    lost = [r for r in runs if r["status"] == "KILLED"]
    assert len(lost) == 1 and "died while the run was open" in lost[0]["tags"]["error"]


def ns_pids(host: str) -> list[int]:
    return [int(p) for p in ip("netns", "pids", PREFIX + host).split()]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


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
