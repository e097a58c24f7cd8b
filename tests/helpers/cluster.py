"""The namespace cluster as the tests drive it (tests/test_cluster.py): its command line,
commands on its hosts, what runs in them. One cluster per test process, apart from one
started by hand (its own namespace prefix and state folder)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mnist_pipeline.core.project import PROJECT_ROOT

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


def runs_on(host: str, repo: Path, env: dict) -> list[dict]:
    """Every run in the tracking server, asked from ``host`` through MLflow's client."""
    script = (
        "import json, mlflow\n"
        "runs = mlflow.search_runs(search_all_experiments=True, output_format='list')\n"
        "print(json.dumps([{'status': r.info.status, 'name': r.info.run_name,\n"
        "    'id': r.info.run_id, 'artifact_uri': r.info.artifact_uri, 'metrics': r.data.metrics,\n"
        "    'params': r.data.params, 'tags': r.data.tags} for r in runs]))\n"
    )
    result = on(host, sys.executable, "-c", script, cwd=repo, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def alive(pid: int) -> bool:
    """Running, not merely a zombie that nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def namespace_pids() -> list[int]:
    return [int(p) for ns in namespaces() for p in ip("netns", "pids", ns).split()]


def ns_pids(host: str) -> list[int]:
    return [int(p) for p in ip("netns", "pids", PREFIX + host).split()]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


#: Waits, on a worker, until the tracking server has a RUNNING run of the train stage (and of
#: the filter in its first argument, if given, e.g. "and tags.`process.address` = '…'"), and
#: prints its id: a loop in one process (MLflow's client would take seconds to import for
#: each look).
WAIT_FOR_TRAINING = """
import base64, json, os, sys, time, urllib.request
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
        "filter": "attributes.status = 'RUNNING' and tags.stage = 'train' "
        + " ".join(sys.argv[1:])}).get("runs", [])
    if runs:
        print(runs[0]["info"]["run_id"])
        raise SystemExit(0)
    time.sleep(0.2)
raise SystemExit("no training run started")
"""


def require_namespaces() -> None:
    """What a namespace cluster needs here (root, ``ip netns``, sshd), or the test is skipped
    with the reason (``tests.helpers.services.missing``: fails under MNIST_REQUIRE_SERVICES)."""
    from tests.helpers.services import missing

    if os.geteuid() != 0:
        missing("the cluster needs root (network namespaces); CI runs as root")
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing(f"ip netns is not available here: {probe.stderr.strip()}")
    if not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        missing("sshd not found (Debian: apt-get install openssh-server); .ci/run installs it")
