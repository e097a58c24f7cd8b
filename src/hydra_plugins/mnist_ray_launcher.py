"""Hydra launcher that runs sweep jobs as tasks on a running Ray cluster.

Selected with ``hydra/launcher=ray_cluster`` (``conf/hydra/launcher/ray_cluster.yaml``).
Hydra only accepts launchers from the ``hydra_plugins`` namespace, hence this module's place.

Why not the ``hydra-ray-launcher`` plugin (1.2.2, its latest release): against a cluster
started with ``ray start`` it fails twice.

- It always passes ``object_store_memory`` to ``ray.init``, which Ray refuses when connecting
  to an existing cluster (hydra issue #2893; fixed upstream, not released).
- Its jobs run in the raylet's working directory (wherever ``ray start`` ran), not the
  sweep's, so the relative sweep folder and data paths point elsewhere: the first job fails
  reading its sweep's ``mlflow_sweep.json``. The plugin has no option to change that.

This launcher runs each job in the directory the sweep was started from, which must exist at
the same path on every node (one machine, or a shared file system), and gives every job the
environment the runs need: Ray workers inherit the raylet's environment, not this shell's.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

# Hydra imports every plugin for any command that composes conf/ (`dvc exp run -S` too): only
# the light error module here, the tracking and sweep code when a sweep launches.
from mnist_pipeline.core.errors import ConfigError, exit_on_error

log = logging.getLogger(__name__)

#: How often the sweep looks whether a node running one of its jobs was declared dead. How
#: soon that happens is the cluster's setting (Ray's ``RAY_health_check_*``; docs/operations.md).
NODE_POLL_S = 1.0
#: In the sweep folder: each job's node id, written when the job starts.
NODES_DIR = ".ray_nodes"


class RayClusterLauncher(Launcher):
    def __init__(self, address: str, num_cpus: float, env: Sequence[str]) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.env = list(env)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from mnist_pipeline.experiments.sweep_tracking import abort_sweep
        from mnist_pipeline.tracking import tracking_uri

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        # The store this process resolved (and put the sweep's parent run in), so that the
        # children land beside their parent whatever the workers' environment says.
        env = {name: os.environ[name] for name in self.env if name in os.environ}
        env["MLFLOW_TRACKING_URI"] = tracking_uri()
        log.info("Ray cluster %s: launching %d jobs", self.address, len(job_overrides))
        sweep_dir = self.config.hydra.sweep.dir
        with exit_on_error():
            ray = None
            try:
                ray = require_ray()
                return self._launch(job_overrides, initial_job_idx, env)
            except BaseException as exc:  # no cluster, a refused store, Ctrl-C: no parent left open
                abort_sweep(sweep_dir, exc)
                raise
            finally:
                if ray is not None:
                    ray.shutdown()

    def _launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, env: dict[str, str]
    ) -> list[JobReturn]:
        import ray

        assert self.config is not None and self.hydra_context is not None
        sweep_dir = self.config.hydra.sweep.dir
        connect(self.address)
        # Nodes by address, not hostname: hosts may share one (containers, network namespaces).
        nodes = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        here = ray.util.get_node_ip_address()
        problem = store_problem(env["MLFLOW_TRACKING_URI"], nodes - {here})
        if problem:
            raise ConfigError(problem)
        job = ray.remote(_run_job)
        nodes_dir = Path(sweep_dir).resolve() / NODES_DIR
        nodes_dir.mkdir(parents=True, exist_ok=True)
        refs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            sweep_config = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            with open_dict(sweep_config):
                sweep_config.hydra.job.num = idx
            # No retries: a retried job would log a second run under the sweep's parent.
            task = job.options(name=f"sweep-job-{idx}", num_cpus=self.num_cpus, max_retries=0)
            refs.append(
                task.remote(
                    self.hydra_context,
                    sweep_config,
                    self.task_function,
                    Singleton.get_state(),
                    env,
                    str(nodes_dir / str(idx)),
                )
            )
        jobs = {
            idx: (ref, list(overrides))
            for idx, (ref, overrides) in enumerate(
                zip(refs, job_overrides, strict=True), start=initial_job_idx
            )
        }
        return collect_all(jobs, sweep_dir, nodes_dir)


def require_ray() -> Any:
    """Ray, or what to install: it is the optional ``cluster`` extra."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "hydra/launcher=ray_cluster needs Ray, the project's optional `cluster` extra: "
            "uv sync --inexact --extra cluster (make test installs it)"
        ) from None
    return ray


class NodeLost(RuntimeError):
    """The Ray node a job ran on was declared dead: its host went down or was cut off."""


def collect_all(
    jobs: dict[int, tuple[Any, list[str]]], sweep_dir: str, nodes_dir: Path
) -> list[JobReturn]:
    """Every job's result, by job number, each as soon as it is known.

    A job whose node the cluster declares dead (its raylet missed Ray's health checks: a host
    down or cut off) is lost at once, instead of ``ray.get`` waiting for the dead node's
    connection to time out: the job's task is not failed until the owner's gRPC call to its
    worker breaks, which over a cut link (no reset, only silence) takes gRPC's keepalive,
    minutes (seen with Ray 2.60). Each job writes the id of its node to ``nodes_dir`` when it
    starts."""
    import ray

    pending = dict(jobs)
    results: dict[int, JobReturn] = {}
    while pending:
        refs = [ref for ref, _ in pending.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=NODE_POLL_S)
        dead = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if not n["Alive"]}
        for idx, (ref, overrides) in list(pending.items()):
            if ref in ready:
                results[idx] = collect(ref, sweep_dir, idx, overrides)
            else:
                node = job_node(nodes_dir / str(idx))
                if node not in dead:
                    continue
                lost = NodeLost(
                    f"the Ray node {dead[node]} it ran on (node id {node[:12]}) was declared "
                    "dead: its host is down or cut off from the cluster (it missed the "
                    "cluster's health checks)"
                )
                results[idx] = record_lost(sweep_dir, idx, overrides, lost)
            del pending[idx]
    return [results[idx] for idx in sorted(results)]


def job_node(path: Path) -> str | None:
    """The id of the node a job started on, as it wrote it; None before it started."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def collect(ref: Any, sweep_dir: str, idx: int, overrides: list[str]) -> JobReturn:
    """A job's result. A job that died without one (its worker crashed, or the node lacks the
    project folder) is recorded as a FAILED run and the sweep goes on, as for any failed job,
    instead of the first such error ending the sweep and losing the others' results."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        return record_lost(sweep_dir, idx, overrides, exc)


def record_lost(sweep_dir: str, idx: int, overrides: list[str], exc: BaseException) -> JobReturn:
    """Record a job that will report nothing as FAILED with ``exc``; the sweep goes on."""
    from mnist_pipeline.experiments.sweep_tracking import record_lost_job

    log.error("job %d (%s) was lost: %s", idx, " ".join(overrides), exc)
    record_lost_job(sweep_dir, idx, overrides, exc)
    return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=None)


def connect(address: str, timeout_s: float = 5.0) -> None:
    """Connect to the cluster; fail in seconds, with what to do, when there is none
    (``ray.init`` retries an address that does not answer for minutes).

    No ``runtime_env``: with one, Ray starts its workers through ``bash -c`` (``ray/_private/
    runtime_env/context.py``) with the interpreter's path unquoted, so a project in a folder
    with a space never gets a worker (seen with Ray 2.60; the class of ray-project/ray#28331,
    closed). The jobs' environment travels with each task instead (``_run_job``)."""
    import ray

    try:
        # "auto" means $RAY_ADDRESS first: a stale one would make ray.init retry for minutes.
        target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
        if ":" in target and "://" not in target:
            host, _, port = target.rpartition(":")
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
            check_token(target)
        ray.init(address=address)
    except ray.exceptions.AuthenticationError:
        raise ConfigError(refused(address)) from None
    except (OSError, ValueError) as exc:  # ConnectionError is an OSError
        if isinstance(exc.__cause__, ray.exceptions.AuthenticationError):
            raise ConfigError(refused(address)) from None
        raise ConfigError(
            f"no Ray cluster at address={address} ({exc}); start one with "
            "`ray start --head` or set hydra.launcher.address=HOST:PORT"
        ) from None


def check_token(gcs_address: str) -> None:
    """Raise Ray's ``AuthenticationError`` at once if the cluster refuses this client's token
    (none, or a wrong one). ``ray.init`` would retry a refused token for 20 s, writing a
    warning line a second to stderr from Ray's C++ client, and then report only "Failed to
    connect". One request of the client ``ray.init`` itself uses (``ray._raylet.GcsClient``,
    Ray 2.60), with stderr (fd 2, where that C++ code writes) held aside meanwhile; any other
    failure is left for ``ray.init`` to report."""
    import ray
    from ray._raylet import GcsClient

    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        GcsClient(address=gcs_address).cluster_id  # noqa: B018 (the request is the point)
    except ray.exceptions.AuthenticationError:
        raise
    except Exception as exc:
        log.debug("token check of %s: %s", gcs_address, exc)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def refused(address: str) -> str:
    """The one line for a cluster that refuses this client's token."""
    return (
        f"the Ray cluster at address={address} refused this client: its token is missing or "
        "wrong (Ray's token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH "
        "to a file holding the cluster's token; docs/operations.md)"
    )


def store_problem(tracking_uri: str, other_hosts: set[str]) -> str | None:
    """Why jobs on ``other_hosts`` could not log to ``tracking_uri``, or None if they can.

    A SQLite store is a file on this machine: jobs elsewhere would each write their own copy
    at that path (and SQLite's locking is not safe on network file systems)."""
    if not tracking_uri.startswith("sqlite:") or not other_hosts:
        return None
    return (
        f"the MLflow store {tracking_uri} is a file on this machine, but the Ray cluster has "
        f"nodes on {', '.join(sorted(other_hosts))}, whose runs would not reach it: use a "
        "tracking server (MLFLOW_TRACKING_URI=http://...)"
    )


def _run_job(
    hydra_context: HydraContext,
    sweep_config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
    env: dict[str, str],
    node_file: str,
) -> JobReturn:
    """One job, in a Ray worker: in the sweep's working directory, with Hydra's state and the
    launching process's ``env`` (its store above all), put back as it was afterwards: the
    worker process runs other sweeps' jobs later. The job's run records the address of the
    node it ran on (``NODE_ADDRESS_ENV``): nodes may share a hostname. First it writes its
    node's id to ``node_file``, for the sweep to know whose death loses it (``collect_all``)."""
    import ray

    from mnist_pipeline.tracking.provenance import NODE_ADDRESS_ENV

    Path(node_file).write_text(ray.get_runtime_context().get_node_id())
    env = {**env, NODE_ADDRESS_ENV: ray.util.get_node_ip_address()}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return _run_job_here(hydra_context, sweep_config, task_function, singleton_state)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_job_here(
    hydra_context: HydraContext,
    sweep_config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
) -> JobReturn:
    import ray

    cwd = sweep_config.hydra.runtime.cwd
    if not os.path.isdir(cwd):
        raise RuntimeError(
            f"{cwd} does not exist on {socket.gethostname()}: every Ray node needs the project "
            "at the same path as the machine that starts the sweep (a shared file system)"
        )
    os.chdir(cwd)
    setup_globals()
    Singleton.set_state(singleton_state)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = ray.get_runtime_context().get_task_id()
    HydraConfig.instance().set_config(sweep_config)
    return run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
