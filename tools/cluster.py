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

    python -m tools.cluster up | down | status
    python -m tools.cluster run worker1 -- dvc repro    # a command on a host, as a client
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
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


def postgres_bindir() -> Path | None:
    """Debian installs PostgreSQL's server outside PATH, under /usr/lib/postgresql/<major>/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def private(path: Path, text: str) -> None:
    """A file only its owner reads: secrets and their configuration."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


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


def wait_for_port(
    host: str, address: str, port: int, server: subprocess.Popen | None = None,
    log: Path | None = None, timeout_s: float = 180,
) -> None:  # fmt: skip
    """Wait, from inside ``host``, until ``address:port`` accepts connections; stop waiting
    when ``server`` exits (its ``log``'s last line in the error)."""
    probe = f"import socket; socket.create_connection(({address!r}, {port}), 2).close()"
    end = time.monotonic() + timeout_s
    while True:
        answer = subprocess.run(netns(host, sys.executable, "-c", probe), capture_output=True)
        if answer.returncode == 0:
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


# --- the tracking host ----------------------------------------------------------------------


def start_postgres(password: str) -> None:
    """A private PostgreSQL cluster, password login, on the tracking host's loopback only:
    the MLflow server beside it is its one client, so no other host can reach it."""
    bindir = postgres_bindir()
    if bindir is None:
        raise ClusterError("PostgreSQL not found (Debian: apt-get install postgresql)")
    folder = STATE / "tracking" / "pg"
    folder.mkdir(parents=True)
    shutil.chown(folder, "postgres")
    folder.chmod(0o700)
    as_owner = ["runuser", "-u", "postgres", "--"]
    pwfile = folder / "pwfile"
    private(pwfile, password)
    shutil.chown(pwfile, "postgres")
    sh(*as_owner, bindir / "initdb", "-D", folder / "data", "--username=mlflow",
       f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8")  # fmt: skip
    pwfile.unlink()
    options = f"-p {PG_PORT} -k {folder} -c listen_addresses=127.0.0.1"
    sh(*netns("tracking", *as_owner, bindir / "pg_ctl", "-D", folder / "data",
              "-l", folder / "server.log", "-o", options, "-w", "start"))  # fmt: skip
    env = {**os.environ, "PGPASSWORD": password}
    sh(*as_owner, bindir / "createdb", "-h", folder, "-p", str(PG_PORT), "-U", "mlflow", "mlflow",
       env=env)  # fmt: skip


def start_mlflow(secret: dict[str, str]) -> None:
    """``make server``'s command (mnist_pipeline.tracking_server) on the tracking host's
    address, with MLflow's basic-auth app: the admin password comes from the environment on
    first start, the user store is a database of the tracking host."""
    folder = STATE / "tracking"
    auth_ini = folder / "basic_auth.ini"
    private(
        auth_ini,
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'basic_auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": (
            f"postgresql://mlflow:{secret['DB_PASSWORD']}@127.0.0.1:{PG_PORT}/mlflow"
        ),
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": secret["ADMIN_PASSWORD"],
        # The key of the auth app's CSRF tokens, one for all the server's workers.
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["FLASK_SECRET_KEY"],
    }
    address = HOSTS["tracking"]
    command = [sys.executable, "-m", "mnist_pipeline.tracking_server", "--host", address,
               "--port", str(MLFLOW_PORT), "--workers", "1",
               "--artifacts-destination", str(folder / "artifacts"), "--app-name", "basic-auth",
               "--allowed-hosts", f"{address}:{MLFLOW_PORT},{address}"]  # fmt: skip
    log = folder / "mlflow.log"
    server = spawn("tracking", command, log, env, cwd=folder)
    wait_for_port("worker1", address, MLFLOW_PORT, server, log)
    # The clients' user, created by the admin through the server's own API, from a worker.
    create = (
        "import os\nfrom mlflow.server.auth.client import AuthServiceClient\n"
        f"AuthServiceClient({TRACKING_URI!r}).create_user({PIPELINE_USER!r}, "
        "os.environ['NEW_PASSWORD'])\n"
    )
    sh(*netns("worker1", sys.executable, "-c", create), env={
        **os.environ, "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": secret["ADMIN_PASSWORD"],
        "NEW_PASSWORD": secret["PIPELINE_PASSWORD"],
    })  # fmt: skip


# --- the storage host -----------------------------------------------------------------------


def start_sshd() -> None:
    """OpenSSH's server on the storage host's address, with keys of this cluster only: no
    password login, the clients' public key the one authorised."""
    folder = STATE / "storage"
    (folder / "remote").mkdir(parents=True)
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        raise ClusterError("sshd not found (Debian: apt-get install openssh-server)")
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mnist-cluster", "-f", KEY)
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", folder / "host_key")
    shutil.copy(KEY.with_suffix(".pub"), folder / "authorized_keys")
    config = folder / "sshd_config"
    config.write_text(
        f"ListenAddress {HOSTS['storage']}\nPort 22\nHostKey {folder / 'host_key'}\n"
        f"PidFile {folder / 'sshd.pid'}\nAuthorizedKeysFile {folder / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\n"
        # The state folder is under /var/tmp (world-writable), which StrictModes refuses.
        "StrictModes no\nSubsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    sh(sshd, "-t", "-f", config)
    sh(*netns("storage", sshd, "-f", config, "-E", folder / "sshd.log"))
    wait_for_port("worker1", HOSTS["storage"], 22)


# --- up, down, status ------------------------------------------------------------------------


def is_up() -> bool:
    """Every namespace there, set-up finished, and both servers still running."""
    if len(existing_namespaces()) != len(HOSTS) + 1 or not CLIENT_ENV.exists():
        return False
    return all(namespace_pids(namespace(host)) for host in ("tracking", "storage"))


def up() -> None:
    """Create the cluster; a cluster already up is left as it is, a partial one is removed
    first (an earlier ``up`` that failed or was interrupted)."""
    if is_up():
        print(f"cluster {PREFIX}* is already up; state in {STATE}")
        return
    down(quiet=True)
    STATE.mkdir(parents=True)
    STATE.chmod(0o711)  # PostgreSQL (its own user) must traverse it to its data folder
    names = ("DB_PASSWORD", "ADMIN_PASSWORD", "PIPELINE_PASSWORD", "FLASK_SECRET_KEY")
    secret = {name: secrets.token_urlsafe(18) for name in names}
    private(STATE / "secrets.env", "".join(f"{k}={v}\n" for k, v in secret.items()))
    try:
        make_network()
        start_postgres(secret["DB_PASSWORD"])
        start_mlflow(secret)
        start_sshd()
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
    data = STATE / "tracking" / "pg" / "data"
    bindir = postgres_bindir()
    if (data / "postmaster.pid").exists() and bindir:
        # A fast shutdown (rolls back open transactions) rather than a signal per process.
        subprocess.run(["runuser", "-u", "postgres", "--", bindir / "pg_ctl", "-D", data,
                        "-m", "fast", "-w", "stop"], capture_output=True, timeout=60)  # fmt: skip
    for name in existing_namespaces():
        stop_processes(name)
        sh("ip", "netns", "del", name)
    if not keep_state:
        shutil.rmtree(STATE, ignore_errors=True)
    if not quiet:
        print(f"cluster {PREFIX}* removed (namespaces, links, processes, {STATE})")


def status() -> None:
    """What runs where, and how to use it."""
    if not is_up():
        print(f"cluster {PREFIX}* is not up (make cluster starts it)")
        return
    for host, address in HOSTS.items():
        pids = namespace_pids(namespace(host))
        print(f"  {namespace(host):<16} {address:<13} {len(pids)} processes")
    print(
        f"tracking: {TRACKING_URI} (user {PIPELINE_USER}), DVC remote: {REMOTE_URL}\n"
        f"a shell on a worker, as a client: python -m tools.cluster run worker1 -- bash\n"
        f"(client settings, with the password: {CLIENT_ENV})"
    )


def client_env() -> dict[str, str]:
    """This process's environment plus the clients' settings (client.env)."""
    pairs = (line.split("=", 1) for line in CLIENT_ENV.read_text().splitlines() if "=" in line)
    return {**os.environ, **dict(pairs)}


def run(host: str, command: list[str]) -> None:
    """Become ``command`` in ``host``'s namespace, with the client settings."""
    if host not in HOSTS:
        raise ClusterError(f"no host {host!r}: one of {', '.join(HOSTS)}")
    if not is_up():
        raise ClusterError(f"cluster {PREFIX}* is not up (make cluster starts it)")
    argv = netns(host, *(command or ["bash"]))
    os.execvpe(argv[0], argv, client_env())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status", "run"])
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
            {"up": up, "down": down, "status": status}[args.action]()
    except (ClusterError, OSError, subprocess.TimeoutExpired) as exc:
        sys.exit(f"error: cluster {args.action}: {exc}")


if __name__ == "__main__":
    main()
