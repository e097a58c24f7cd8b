"""A two-node Ray cluster on the namespace cluster's worker hosts (``make cluster`` first).

Why: ``hydra/launcher=ray_cluster`` is otherwise tried only on a one-node cluster over
loopback (tests/test_ray.py), where every job runs on the machine that started the sweep. Here
the head runs on worker1 and a second node on worker2, each in its own network namespace, so
a sweep's jobs run on two hosts that reach each other and the tracking host only through the
bridge, as on real machines. Like ``tools/cluster`` it is a lab, not part of ``src/``: on
real hosts the same ``ray start`` commands run by hand (docs/operations.md).

- Every address and port Ray opens is given explicitly: left to itself Ray picks the
  machine's interface address (the one it would reach the internet from) and random
  ports, which neither a firewall rule nor this lab could name.
- Ray's token authentication (``RAY_AUTH_MODE=token``, Ray 2.52 and later): the token is
  generated at ``up`` into a file only root reads and reaches Ray through
  ``RAY_AUTH_TOKEN_PATH``, never a command line or ``RAY_AUTH_TOKEN`` (``ps e`` shows a
  process's environment to its user). A client without it is refused.
- Each node has its own ``--temp-dir`` under the cluster's state folder: the namespaces share
  one file system, and two nodes in one temp dir would share one session.
- ``down`` ends only this cluster's Ray processes: those in the two workers' namespaces whose
  environment carries this cluster's node mark. ``ray stop`` would end every Ray process of
  the user on the machine, other clusters included.

    python -m tools.cluster_ray up | down | status
    python -m tools.cluster_ray run worker1 -- CMD   # a client: tracking and Ray credentials
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from pathlib import Path

import psutil

from tools import cluster

HEAD, NODE = "worker1", "worker2"
GCS_PORT = 6379
ADDRESS = f"{cluster.HOSTS[HEAD]}:{GCS_PORT}"
#: Every other port a node listens on (each host has its own network stack: the same numbers
#: on both). The dashboard's UI is off; its agent and the metrics exporter still listen.
PORTS = {
    "--node-manager-port": 8077,
    "--object-manager-port": 8076,
    "--runtime-env-agent-port": 8078,
    "--dashboard-agent-grpc-port": 8079,
    "--dashboard-agent-listen-port": 52365,
    "--metrics-export-port": 8080,
    "--min-worker-port": 11000,
    "--max-worker-port": 11099,
}
HEAD_PORTS = {"--port": GCS_PORT, "--ray-client-server-port": 10001, "--dashboard-port": 8265}
#: One CPU per node: with ``hydra.launcher.num_cpus=1`` each node runs one job at a time, so a
#: sweep of two jobs uses both hosts (and the lab stays light on a shared machine).
NUM_CPUS = 1
OBJECT_STORE_BYTES = 100_000_000  # Ray's default is 30% of the machine's memory, per node
RAY_STATE = cluster.STATE / "ray"
TOKEN = RAY_STATE / "auth_token"
#: In the environment of every process a node starts (Ray's workers inherit the raylet's):
#: what ``down`` recognises this cluster's processes by. Its value is the namespace.
MARK = "MNIST_CLUSTER_RAY_NODE"
#: Ray's Unix sockets live under each node's temp dir; their paths may not exceed 107 bytes.
MAX_TEMP_DIR = 50
#: How soon a node whose link is cut counts as dead (``RAY_<name>`` in the nodes' environment,
#: read by Ray's C++ config, ``ray_config_def.h``; the head's GCS applies them). The GCS probes
#: each node every ``period`` and declares it dead after ``failure_threshold`` probes
#: unanswered within ``timeout``: Ray's defaults (3 s, 10 s, 5) take 20 to 55 s after a cut
#: (ray-project/ray#16945 names these settings); these take 5 to 10 s, and the sweep gives the
#: node's jobs up then (``hydra_plugins.mnist_ray_launcher.collect_all``). On real networks
#: longer ones keep a hiccup from losing jobs (ray-project/ray#39169). The cut-off node itself
#: runs on until it hears from the GCS again (the link back): its raylet then exits, "marked
#: as dead by the GCS", and its workers with it.
HEALTH_CHECK = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}


class RayClusterError(Exception):
    """A step of ``up`` or ``down`` that failed; its message is the one line shown."""


def token_env() -> dict[str, str]:
    """What a client (or a node) needs to be let in: the mode and the token's file."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(TOKEN)}


def client_env() -> dict[str, str]:
    """A worker host's client environment (tracking address and credentials) plus Ray's."""
    return {**cluster.client_env(), **token_env()}


def node_env(host: str) -> dict[str, str]:
    """The environment of ``ray start``: this process's, without any Ray or MLflow setting
    (the jobs get the sweep's store and credentials from the launcher, as on real hosts where
    a node knows nothing of who sends it work), plus the token, the health checks' timing
    and the node mark."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "MNIST_"))}
    return {**env, **token_env(), **HEALTH_CHECK, MARK: cluster.namespace(host)}


def temp_dir(host: str) -> Path:
    return RAY_STATE / host


def write_token() -> None:
    """A new random token (as ``ray get-auth-token --generate`` makes), in a file only root
    reads, created that way (never readable, not even for a moment)."""
    RAY_STATE.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(TOKEN, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))


def start_node(host: str) -> None:
    """``ray start`` in ``host``'s namespace, in a session of its own (it returns once the
    node runs; the node's processes stay); its output in ``<state>/ray/<host>.log``."""
    ray = Path(sys.executable).with_name("ray")
    head = host == HEAD
    ports = {**PORTS, **(HEAD_PORTS if head else {})}
    role = ["--head", "--include-dashboard=false"] if head else [f"--address={ADDRESS}"]
    command = [
        ray, "start", *role,
        f"--node-ip-address={cluster.HOSTS[host]}",
        *(f"{flag}={port}" for flag, port in ports.items()),
        f"--num-cpus={NUM_CPUS}", f"--object-store-memory={OBJECT_STORE_BYTES}",
        f"--temp-dir={temp_dir(host)}", "--disable-usage-stats",
    ]  # fmt: skip
    temp_dir(host).mkdir(mode=0o700)
    log = RAY_STATE / f"{host}.log"
    with log.open("ab") as out:
        result = subprocess.run(
            cluster.netns(host, *command),
            env=node_env(host),
            cwd=temp_dir(host),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            timeout=180,
        )
    if result.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        raise RayClusterError(
            f"ray start on {host} exited {result.returncode}: "
            f"{lines[-1] if lines else 'no output'} (log: {log})"
        )


def node_processes(host: str) -> list[psutil.Process]:
    """This cluster's Ray processes on ``host``: those in its namespace with the node mark,
    and their descendants there. Ray renames its agents and workers (``ray::IDLE``) with
    setproctitle, which overwrites the memory ``/proc/PID/environ`` reads, so they show no
    mark of their own; they are the raylet's children."""
    pids = set(cluster.namespace_pids(cluster.namespace(host)))
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.environ().get(MARK) == cluster.namespace(host):
                for member in (proc, *proc.children(recursive=True)):
                    if member.pid in pids:
                        found[member.pid] = member
    return list(found.values())


def is_up() -> bool:
    """Both nodes' raylets running."""
    return all(
        any(p.name() == "raylet" for p in node_processes(host) if p.is_running())
        for host in (HEAD, NODE)
    )


def up() -> None:
    """Start the two nodes on a running namespace cluster; one already up is left as it is,
    a partial one is stopped first."""
    if not cluster.is_set_up():
        raise RayClusterError("the namespace cluster is not up: make cluster first")
    if is_up():
        print(f"Ray cluster {ADDRESS} is already up")
        return
    down(quiet=True)
    if len(str(temp_dir(HEAD))) > MAX_TEMP_DIR:
        raise RayClusterError(
            f"the state folder {cluster.STATE} is too long for Ray's socket paths: "
            "set MNIST_CLUSTER_STATE to a shorter one"
        )
    write_token()
    try:
        start_node(HEAD)
        start_node(NODE)
    except BaseException:
        stop_nodes()  # the logs stay, to say why
        raise
    status()


def stop_nodes(grace_s: float = 10) -> None:
    """SIGTERM to this cluster's Ray processes, SIGKILL to those left after ``grace_s``."""
    procs = [p for host in (HEAD, NODE) for p in node_processes(host)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    if alive:
        raise RayClusterError(f"Ray processes {[p.pid for p in alive]} did not end")


def down(quiet: bool = False) -> None:
    """Stop this cluster's Ray processes and remove its state (token, temp dirs, logs)."""
    stop_nodes()
    if RAY_STATE.exists():
        subprocess.run(["rm", "-rf", "--", str(RAY_STATE)], check=True)
    if not quiet:
        print(f"Ray cluster {ADDRESS} stopped (its processes on {HEAD} and {NODE}, {RAY_STATE})")


def status() -> None:
    if not is_up():
        print(f"Ray cluster {ADDRESS} is not up (python -m tools.cluster_ray up starts it)")
        return
    for host in (HEAD, NODE):
        print(f"  {cluster.namespace(host):<16} {cluster.HOSTS[host]:<13} "
              f"{len(node_processes(host))} Ray processes")  # fmt: skip
    print(
        f"address {ADDRESS}; token in {TOKEN} (RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={TOKEN})\n"
        f"a sweep: python -m tools.cluster_ray run {HEAD} -- python -m mnist_pipeline.pipeline "
        f"-m model.units=16,32 hydra/launcher=ray_cluster hydra.launcher.address={ADDRESS}"
    )


def run(host: str, command: list[str]) -> None:
    """Become ``command`` in ``host``'s namespace with the client settings and Ray's token."""
    if host not in cluster.HOSTS:
        raise RayClusterError(f"no host {host!r}: one of {', '.join(cluster.HOSTS)}")
    argv = cluster.netns(host, *(command or ["bash"]))
    os.execvpe(argv[0], argv, client_env())


def main(argv: list[str] | None = None) -> None:
    actions = {"up": up, "down": down, "status": status}
    errors = (RayClusterError, OSError, subprocess.SubprocessError)
    cluster.command_line(__doc__, actions, run, errors, "Ray cluster", argv)


if __name__ == "__main__":
    main()
