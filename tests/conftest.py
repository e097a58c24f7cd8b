"""Shared fixtures: tiny MNIST-format data, an isolated MLflow store, composed configs, the
tiny DVC project reproduced once per session."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

from mnist_pipeline.core.config import PipelineConfig
from tests.helpers.config import compose_config, sha_overrides
from tests.helpers.data import make_mirror
from tests.helpers.faults import digests
from tests.helpers.processes import run_pipeline
from tools.workspace import NETAUDIT_ENV, TESTRUN

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _audit_the_network() -> None:
    """The network rule, enforced (``tools/testrun/netaudit.py``): this process and every
    Python process the tests start record any attempt to reach an address off this machine;
    the session fails if one did (``pytest_sessionfinish``). Set up once, by the process
    pytest was started as: pytest-xdist's workers inherit the log and the path (and load
    ``tools/testrun``'s start-up, with coverage's cost cut, like every process after)."""
    if not os.environ.get(NETAUDIT_ENV):
        folder = Path(tempfile.mkdtemp(prefix="mnist-netaudit-"))
        os.environ[NETAUDIT_ENV] = str(folder / "attempts.log")
        path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTRUN), path]))
    if "netaudit" not in sys.modules:  # not loaded at start-up: this process started before
        spec = importlib.util.spec_from_file_location("netaudit", TESTRUN / "netaudit.py")
        sys.modules["netaudit"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_audit_the_network()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run if any process of it tried to leave this machine (the first process
    only: pytest-xdist's workers share its log)."""
    log = Path(os.environ[NETAUDIT_ENV])
    if os.environ.get("PYTEST_XDIST_WORKER") or not log.exists() or not log.read_text():
        return
    sys.stderr.write(
        "\nerror: the network rule was broken: processes of this test run tried to reach "
        f"addresses off this machine (only loopback and 198.18.0.0/15 are allowed):\n"
        f"{log.read_text()}\n"
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _absl_on_the_process_stderr() -> None:
    """absl (TensorFlow's Python logging) binds its handler to the ``sys.stderr`` of its
    import, here pytest's capture stream. A command run in-process under Hydra configures
    logging with ``dictConfig``, which closes every handler, and absl's ``close`` closes a
    stream that is not the current ``sys.stderr`` (``capsys``'s, then): pytest's own capture
    then fails. The process's stderr (captured at the descriptor) is never closed."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


_absl_on_the_process_stderr()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first: pytest-xdist (``--dist loadfile``: a file's tests on one
    worker, so a module-scoped set-up is made once) hands files out in this order (make test
    passes ``--no-loadscope-reorder``), so no worker is left with a long file at the end while
    the other idles. Files marked ``heavy`` (a minute or more: a trained DVC project, a
    server, long races) first, then by their number of slow tests; the order within a file
    stays."""
    weight: dict[Path, tuple[int, int]] = {}
    for item in items:
        heavy, slow = weight.get(item.path, (0, 0))
        weight[item.path] = (
            heavy or bool(item.get_closest_marker("heavy")),
            slow + bool(item.get_closest_marker("slow")),
        )
    items.sort(key=lambda item: tuple(-w for w in weight[item.path]))


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A local mirror of tiny MNIST-format data and the checksums that verify it."""
    folder = tmp_path_factory.mktemp("mirror")
    return folder, make_mirror(folder)


@pytest.fixture
def tracking_store(tmp_path, monkeypatch, store_template) -> str:
    """A fresh SQLite MLflow store for one test (never the project's own), already created:
    a copy of the session's empty store, so no test pays MLflow's schema migrations.

    MLflow's process-wide URI (set by earlier stages in this process) outranks the
    environment variable, so it is set here too and cleared afterwards.
    """
    import mlflow

    from tests.helpers.store import seed

    database = seed(store_template, tmp_path / "store" / "mlflow.db")
    uri = f"sqlite:///{database}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run stages in a temporary folder: their relative output paths land there."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def tiny_cfg(tiny_mirror, tracking_store, workdir, monkeypatch) -> PipelineConfig:
    """The default config on tiny data: 1 epoch, the tiny mirror as MNIST_MIRROR."""
    folder, sha = tiny_mirror
    monkeypatch.setenv("MNIST_MIRROR", str(folder))
    return compose_config([*sha_overrides(sha), "train.epochs=1", "model.units=32"])


@pytest.fixture
def prepared(tiny_cfg) -> PipelineConfig:
    """``tiny_cfg`` with its data downloaded and preprocessed in the working folder."""
    from mnist_pipeline.stages import download, preprocess

    download.download(tiny_cfg)
    preprocess.preprocess(tiny_cfg)
    return tiny_cfg


@pytest.fixture(autouse=True)
def stderr_stays_pytests(monkeypatch):
    """A command called in-process (``main(argv)``) would route this process's fd 2 through
    TensorFlow's noise filter for good, and fd 2 is pytest's. Subprocesses still filter."""
    monkeypatch.setattr("mnist_pipeline.core.log_filter.filter_native_stderr", lambda: None)


@pytest.fixture(autouse=True)
def no_public_mirrors(monkeypatch):
    """Tests never reach the network: only the mirrors a test names are tried."""
    monkeypatch.setattr("mnist_pipeline.stages.download.DEFAULT_MIRRORS", ())


@pytest.fixture
def https_mirror(tiny_mirror, tmp_path, monkeypatch):
    """A real HTTPS server on loopback serving the tiny files, good or broken by path.

    Timeouts and backoff are shortened so the failure tests take seconds."""
    import trustme

    from tests.helpers.https_mirror import MirrorServer

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.setattr("mnist_pipeline.stages.download.TIMEOUT_S", 0.5)
    monkeypatch.setattr("mnist_pipeline.stages.download.BACKOFF_S", 0.01)
    server = MirrorServer(tiny_mirror[0], ca_file, ca.issue_cert("127.0.0.1"))
    yield server
    server.close()


@pytest.fixture
def sweep(tiny_mirror, tracking_store, workdir, monkeypatch, request):
    """Run a sweep on tiny data in a subprocess, or with ``in_process=True`` through the
    entry point in this process (``tests.helpers.cli.app_result``: a subprocess pays seconds
    of imports; the one real subprocess per command checks the wiring); return (the completed
    process, the sweep's parent run, its child runs)."""
    import mlflow

    from mnist_pipeline import pipeline
    from tests.helpers.cli import app_result

    folder, sha = tiny_mirror
    env = {**os.environ, "MNIST_MIRROR": str(folder)}
    monkeypatch.setenv("MNIST_MIRROR", str(folder))

    def run(*overrides: str, in_process: bool = False):
        args = ["-m", *sha_overrides(sha), "train.epochs=1", *overrides]
        if in_process:
            result = app_result(request.getfixturevalue("capfd"), pipeline.main, *args)
        else:
            result = run_pipeline(workdir, env, *args)
        parents = mlflow.search_runs(
            search_all_experiments=True,
            output_format="list",
            filter_string="tags.sweep_role = 'parent'",
        )
        assert len(parents) == 1, result.stderr[-3000:]
        parent = parents[0]
        sweep_id = parent.data.tags["sweep_parent"]
        children = mlflow.search_runs(
            search_all_experiments=True,
            output_format="list",
            filter_string=f"tags.sweep_id = '{sweep_id}'",
        )
        return result, parent, children

    return run


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, made once: creating one runs every schema migration
    (seconds, minutes on a busy machine); copies of it (``tests.helpers.store.seed``) cost
    nothing."""
    import mlflow

    path = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


class Reproduced(NamedTuple):
    """The session's reproduced tiny project (``tests.helpers.workspace.reproduce_template``):
    its folder, to copy (``copy_reproduced``), never to change; what its cold `dvc repro`
    printed; and its files' digests once built (a test checks that no copy wrote to it)."""

    folder: Path
    output: str
    digests: dict[str, str]


@pytest.fixture(scope="session")
def reproduced_template(tmp_path_factory, tiny_mirror) -> Reproduced:
    """The tiny project after a cold `dvc repro`, made once per test session: under
    pytest-xdist in the folder the workers share (their base temporary folders' parent), the
    first worker builds it under a file lock and the others wait, then copy it. A template a
    failed build left half-made (no digests written) is built again. Its folder has a space in
    its name, as a user's may."""
    from filelock import FileLock

    from tests.helpers.workspace import reproduce_template

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "reproduced project"
    log, done = shared / "reproduced.log", shared / "reproduced.digests.json"
    with FileLock(shared / "reproduced.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            log.write_text(reproduce_template(folder, *tiny_mirror))
            done.write_text(json.dumps(digests(folder)))
    return Reproduced(folder, log.read_text(), json.loads(done.read_text()))
