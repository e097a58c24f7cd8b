"""The cluster's servers: PostgreSQL and ``mlflow server`` on the tracking host, sshd on the
storage host. Each is set up once (``setup_*``: data, keys, users) and started by ``start``,
which ``up`` calls again on a cluster that is up to bring back a server that stopped."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tools.cluster import (
    HOSTS,
    KEY,
    MLFLOW_PORT,
    PG_PORT,
    PIPELINE_USER,
    STATE,
    TRACKING_URI,
    ClusterError,
    answers,
    netns,
    private,
    sh,
    spawn,
    wait_for_port,
)  # fmt: skip

PG = STATE / "tracking" / "pg"
AS_POSTGRES = ["runuser", "-u", "postgres", "--"]


def postgres_bindir() -> Path | None:
    """Debian installs PostgreSQL's server outside PATH, under /usr/lib/postgresql/<major>/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


# --- the tracking host ----------------------------------------------------------------------


def setup_postgres(password: str) -> None:
    """A private PostgreSQL cluster with password login; the password file is removed once
    initdb has read it."""
    bindir = require_postgres()
    PG.mkdir(parents=True)
    shutil.chown(PG, "postgres")
    PG.chmod(0o700)
    pwfile = PG / "pwfile"
    private(pwfile, password)
    shutil.chown(pwfile, "postgres")
    sh(*AS_POSTGRES, bindir / "initdb", "-D", PG / "data", "--username=mlflow",
       f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8")  # fmt: skip
    pwfile.unlink()
    start_postgres()
    env = {**os.environ, "PGPASSWORD": password}
    sh(*AS_POSTGRES, bindir / "createdb", "-h", PG, "-p", str(PG_PORT), "-U", "mlflow", "mlflow",
       env=env)  # fmt: skip


def require_postgres() -> Path:
    bindir = postgres_bindir()
    if bindir is None:
        raise ClusterError("PostgreSQL not found (Debian: apt-get install postgresql)")
    return bindir


def postgres_running() -> bool:
    """Whether the postmaster its lock file names runs. ``pg_ctl status`` (and PostgreSQL's
    own start-up check) take a killed postmaster that is not yet reaped (a zombie) for a live
    one: ``up`` then did not start it again. Such a lock file is stale: it goes."""
    from mnist_pipeline.core.liveness import pid_alive  # the venv's (``down`` runs without)

    lock = PG / "data" / "postmaster.pid"
    try:
        pid = int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    if pid_alive(pid):
        return True
    lock.unlink(missing_ok=True)
    return False


def start_postgres() -> None:
    """On the tracking host's loopback only: the MLflow server beside it is its one client,
    so no other host can reach it."""
    options = f"-p {PG_PORT} -k {PG} -c listen_addresses=127.0.0.1"
    sh(*netns("tracking", *AS_POSTGRES, require_postgres() / "pg_ctl", "-D", PG / "data",
              "-l", PG / "server.log", "-o", options, "-w", "start"))  # fmt: skip


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


def create_pipeline_user(secret: dict[str, str]) -> None:
    """The clients' user, created by the admin through the server's own API, from a worker."""
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

SSHD_DIR = STATE / "storage"


def setup_sshd() -> None:
    """Keys of this cluster only: no password login, the clients' public key the one
    authorised."""
    (SSHD_DIR / "remote").mkdir(parents=True)
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mnist-cluster", "-f", KEY)
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", SSHD_DIR / "host_key")
    shutil.copy(KEY.with_suffix(".pub"), SSHD_DIR / "authorized_keys")
    (SSHD_DIR / "sshd_config").write_text(
        f"ListenAddress {HOSTS['storage']}\nPort 22\nHostKey {SSHD_DIR / 'host_key'}\n"
        f"PidFile {SSHD_DIR / 'sshd.pid'}\nAuthorizedKeysFile {SSHD_DIR / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\n"
        # The state folder is under /var/tmp (world-writable), which StrictModes refuses.
        "StrictModes no\nSubsystem sftp internal-sftp\n"
    )


def start_sshd() -> None:
    """OpenSSH's server on the storage host's address."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        raise ClusterError("sshd not found (Debian: apt-get install openssh-server)")
    config = SSHD_DIR / "sshd_config"
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    sh(sshd, "-t", "-f", config)
    sh(*netns("storage", sshd, "-f", config, "-E", SSHD_DIR / "sshd.log"))
    wait_for_port("worker1", HOSTS["storage"], 22)


# --- all of them --------------------------------------------------------------------------


def setup(secret: dict[str, str]) -> None:
    """A new cluster's servers, each started once set up."""
    setup_postgres(secret["DB_PASSWORD"])
    start_mlflow(secret)
    create_pipeline_user(secret)
    setup_sshd()
    start_sshd()


def start_stopped(secret: dict[str, str]) -> list[str]:
    """Start again, with their data, the servers of a set-up cluster that do not run; their
    names."""
    started = []
    if not postgres_running():
        start_postgres()
        started.append("PostgreSQL")
    if not answers("worker1", HOSTS["tracking"], MLFLOW_PORT):
        start_mlflow(secret)
        started.append("mlflow server")
    if not answers("worker1", HOSTS["storage"], 22):
        start_sshd()
        started.append("sshd")
    return started
