"""A cluster of hosts on this machine: Linux network namespaces on a private bridge.

Why: every other test of the project's distributed pieces (a tracking server, a DVC remote,
workers) runs over loopback, in one network stack, so none shows what a host that cannot
reach another, or a client without credentials, does. Here each host is a network namespace
with its own address and nothing but the bridge: a process in it sees only that host's
network, while the filesystem (the project, its ``.venv``) stays shared, as on hosts that
mount one file system. It is a lab for tests and for trying the docs by hand, not part of the
product (``src/``): on real hosts the same services are started by their own tools
(docs/operations.md, "A cluster of hosts").

Hosts (namespace ``<prefix><host>``, prefix ``mnist-`` unless ``MNIST_CLUSTER_PREFIX``):

    lan       the bridge, no address: no uplink, no NAT, no default route anywhere
    tracking  198.18.0.10  mlflow server (basic-auth app, proxied artifacts) on :5000,
                           PostgreSQL on its own 127.0.0.1 only
    storage   198.18.0.20  sshd on :22 (key only): the DVC remote in <state>/storage/remote
    worker1   198.18.0.31, worker2  198.18.0.32: run the project's commands

198.18.0.0/15 is reserved for benchmark labs (RFC 2544), so no real network is shadowed. The
state (databases, keys, secrets, logs) lives in ``MNIST_CLUSTER_STATE`` (default
``/var/tmp/<prefix>cluster``), outside git; ``down`` removes it with the namespaces.
Secrets are generated at ``up`` into files only root can read, and reach the servers through
their environment or those files, never a command line (``ps`` shows those to every user).

    python -m tools.cluster up | down | status        # from the project's folder
    python -m tools.cluster run worker1 -- dvc repro    # a command on a host, as a client

``up`` on a cluster that is up starts again whichever of its servers stopped (a fault test
killed it), with its data; ``hosts`` starts the servers, ``__main__`` the network and the CLI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PREFIX = os.environ.get("MNIST_CLUSTER_PREFIX", "mnist-")
STATE = Path(os.environ.get("MNIST_CLUSTER_STATE", f"/var/tmp/{PREFIX}cluster"))
SUBNET = "198.18.0.0/24"
HOSTS = {"tracking": "198.18.0.10", "storage": "198.18.0.20"}
HOSTS |= {"worker1": "198.18.0.31", "worker2": "198.18.0.32"}
LAN = "lan"
MLFLOW_PORT, PG_PORT = 5000, 5432
TRACKING_URI = f"http://{HOSTS['tracking']}:{MLFLOW_PORT}"
PIPELINE_USER = "pipeline"  # the clients' MLflow user (not the admin)
REMOTE_URL = f"ssh://root@{HOSTS['storage']}{STATE / 'storage' / 'remote'}"
KEY = STATE / "id_ed25519"  # the clients' SSH key for the storage host
CLIENT_ENV = STATE / "client.env"  # what a worker needs: tracking address and credentials


class ClusterError(Exception):
    """A step of ``up`` or ``down`` that failed; its message is the one line shown."""


def namespace(host: str) -> str:
    return PREFIX + host


def netns(host: str, *command: str | os.PathLike) -> list[str]:
    """``command`` run inside ``host``'s network namespace."""
    return ["ip", "netns", "exec", namespace(host), *map(str, command)]


def sh(*command: str | os.PathLike, env: dict | None = None, timeout: float = 120) -> str:
    """Run a set-up command; its stderr's last line in the error if it fails."""
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, env=env, timeout=timeout
    )
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise ClusterError(f"{Path(str(command[0])).name} failed ({result.returncode}): {last}")
    return result.stdout


def existing_namespaces() -> list[str]:
    """This cluster's namespaces that exist now."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    return [namespace(h) for h in (LAN, *HOSTS) if namespace(h) in names]


def namespace_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def private(path: Path, text: str) -> None:
    """A file only its owner reads: secrets and their configuration."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


def answers(host: str, address: str, port: int) -> bool:
    """Whether ``address:port`` accepts a connection from inside ``host``."""
    probe = f"import socket; socket.create_connection(({address!r}, {port}), 2).close()"
    return (
        subprocess.run(netns(host, sys.executable, "-c", probe), capture_output=True).returncode
        == 0
    )


def wait_for_port(
    host: str, address: str, port: int, server: subprocess.Popen | None = None,
    log: Path | None = None, timeout_s: float = 180,
) -> None:  # fmt: skip
    """Wait, from inside ``host``, until ``address:port`` accepts connections; stop waiting
    when ``server`` exits (its ``log``'s last line in the error)."""
    end = time.monotonic() + timeout_s
    while True:
        if answers(host, address, port):
            return
        if server is not None and server.poll() is not None:
            lines = log.read_text(errors="replace").strip().splitlines() if log else []
            raise ClusterError(
                f"{address}:{port} exited ({server.returncode}): "
                f"{lines[-1] if lines else 'no output'} (log: {log})"
            )
        if time.monotonic() > end:
            raise ClusterError(f"{address}:{port} did not answer on {host} in {timeout_s:.0f} s")
        time.sleep(0.5)


def spawn(host: str, command: list[str], log: Path, env: dict[str, str], cwd: Path):
    """A server in ``host``'s namespace that outlives this command (its own session)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            netns(host, *command),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines (the state's secrets.env and client.env)."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def is_set_up() -> bool:
    """Every namespace there and the set-up finished (its last step writes client.env)."""
    return len(existing_namespaces()) == len(HOSTS) + 1 and CLIENT_ENV.exists()


def client_env() -> dict[str, str]:
    """This process's environment plus the clients' settings (client.env)."""
    return {**os.environ, **env_file(CLIENT_ENV)}


def command_line(
    doc: str,
    actions: dict[str, Callable[[], None]],
    run: Callable[[str, list[str]], None],
    errors: tuple[type[BaseException], ...],
    what: str,
    argv: list[str] | None = None,
) -> None:
    """``up | down | status | run HOST -- COMMAND`` (``tools.cluster`` and
    ``tools.cluster_ray``): one ``error:`` line for what ``errors`` lists."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("action", choices=[*actions, "run"])
    parser.add_argument("host", nargs="?", help="run: the host (worker1, worker2, ...)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="run: the command")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("error: the cluster needs root (network namespaces): run it as root")
    try:
        if args.action == "run":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            run(args.host or "", command)
        else:
            actions[args.action]()
    except errors as exc:
        sys.exit(f"error: {what} {args.action}: {exc}")
