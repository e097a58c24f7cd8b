"""``python -m tools.cluster up | down | status | run HOST -- COMMAND``: see ``tools.cluster``."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time

from tools.cluster import (
    CLIENT_ENV,
    HOSTS,
    KEY,
    LAN,
    MLFLOW_PORT,
    PIPELINE_USER,
    PREFIX,
    REMOTE_URL,
    STATE,
    TRACKING_URI,
    ClusterError,
    answers,
    client_env,
    command_line,
    env_file,
    existing_namespaces,
    hosts,
    is_set_up,
    namespace,
    namespace_pids,
    netns,
    private,
    sh,
)  # fmt: skip

# --- the network --------------------------------------------------------------------------


def make_network() -> None:
    """The bridge in a namespace of its own (so the machine's own firewall and bridge settings
    never see it), and one veth per host: nothing is added to the machine's own namespace."""
    lan = namespace(LAN)
    sh("ip", "netns", "add", lan)
    sh("ip", "-n", lan, "link", "set", "lo", "up")
    sh("ip", "-n", lan, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", lan, "link", "set", "br0", "up")
    for host, address in HOSTS.items():
        ns = namespace(host)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", lan, "link", "add", f"v-{host}", "type", "veth", "peer", "eth0", "netns", ns)
        sh("ip", "-n", lan, "link", "set", f"v-{host}", "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


# --- up, down, status ------------------------------------------------------------------------


def up() -> None:
    """Create the cluster. One already set up is kept, with its data, and whichever of its
    servers stopped is started again; a partial one (an ``up`` that failed or was
    interrupted) is removed first."""
    if is_set_up():
        secret = env_file(STATE / "secrets.env")
        started = hosts.start_stopped(secret)
        again = f"; started again: {', '.join(started)}" if started else ""
        print(f"cluster {PREFIX}* is already up{again}; state in {STATE}")
        return
    down(quiet=True)
    STATE.mkdir(parents=True)
    STATE.chmod(0o711)  # PostgreSQL (its own user) must traverse it to its data folder
    names = ("DB_PASSWORD", "ADMIN_PASSWORD", "PIPELINE_PASSWORD", "FLASK_SECRET_KEY")
    secret = {name: secrets.token_urlsafe(18) for name in names}
    private(STATE / "secrets.env", "".join(f"{k}={v}\n" for k, v in secret.items()))
    try:
        make_network()
        hosts.setup(secret)
    except BaseException:
        down(quiet=True, keep_state=True)  # its logs say why; the next up removes them
        raise
    private(
        CLIENT_ENV,
        f"MLFLOW_TRACKING_URI={TRACKING_URI}\nMLFLOW_TRACKING_USERNAME={PIPELINE_USER}\n"
        f"MLFLOW_TRACKING_PASSWORD={secret['PIPELINE_PASSWORD']}\n"
        f"MNIST_CLUSTER_REMOTE={REMOTE_URL}\nMNIST_CLUSTER_KEY={KEY}\n",
    )
    status()


def stop_processes(name: str, grace_s: float = 15) -> None:
    """End every process in namespace ``name``: SIGTERM, then SIGKILL after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in namespace_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        end = time.monotonic() + grace_s
        while namespace_pids(name) and time.monotonic() < end:
            time.sleep(0.2)
        if not namespace_pids(name):
            return
    raise ClusterError(f"processes {namespace_pids(name)} in {name} did not end")


def down(quiet: bool = False, keep_state: bool = False) -> None:
    """Stop every process in the cluster's namespaces, delete them (their links and the
    bridge go with them) and the state folder. Nothing there: nothing to do."""
    data = hosts.PG / "data"
    bindir = hosts.postgres_bindir()
    if (data / "postmaster.pid").exists() and bindir:
        # A fast shutdown (rolls back open transactions) rather than a signal per process.
        # One that does not stop in time (a shutdown asked for during crash recovery can
        # wait for ever) gets the signals below like every other process.
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([*hosts.AS_POSTGRES, bindir / "pg_ctl", "-D", data, "-m", "fast",
                            "-w", "-t", "20", "stop"], capture_output=True, timeout=30)  # fmt: skip
    for name in existing_namespaces():
        stop_processes(name)
        sh("ip", "netns", "del", name)
    if not keep_state:
        shutil.rmtree(STATE, ignore_errors=True)
    if not quiet:
        print(f"cluster {PREFIX}* removed (namespaces, links, processes, {STATE})")


def status() -> None:
    """What runs where, and how to use it."""
    if not is_set_up():
        print(f"cluster {PREFIX}* is not up (make cluster starts it)")
        return
    servers = {"tracking": ("mlflow server", MLFLOW_PORT), "storage": ("sshd", 22)}
    for host, address in HOSTS.items():
        pids = namespace_pids(namespace(host))
        line = f"  {namespace(host):<16} {address:<13} {len(pids):>3} processes"
        if host in servers:
            name, port = servers[host]
            line += f", {name} {'up' if answers('worker1', address, port) else 'DOWN'}"
        print(line)
    print(
        f"tracking: {TRACKING_URI} (user {PIPELINE_USER}), DVC remote: {REMOTE_URL}\n"
        f"a shell on a worker, as a client: python -m tools.cluster run worker1 -- bash\n"
        f"(client settings, with the password: {CLIENT_ENV})"
    )


def run(host: str, command: list[str]) -> None:
    """Become ``command`` in ``host``'s namespace, with the client settings."""
    if host not in HOSTS:
        raise ClusterError(f"no host {host!r}: one of {', '.join(HOSTS)}")
    if not is_set_up():
        raise ClusterError(f"cluster {PREFIX}* is not up (make cluster starts it)")
    argv = netns(host, *(command or ["bash"]))
    os.execvpe(argv[0], argv, client_env())


def main(argv: list[str] | None = None) -> None:
    actions = {"up": up, "down": down, "status": status}
    errors = (ClusterError, OSError, subprocess.TimeoutExpired)
    command_line(__doc__, actions, run, errors, "cluster", argv)


if __name__ == "__main__":
    main()
