"""``make ui``: ``mlflow ui`` on the project's store, opened where runs are compared.

    python -m mnist_pipeline.ui                      # http://127.0.0.1:5000, this machine only
    python -m mnist_pipeline.ui --port 5001
    python -m mnist_pipeline.ui --host 0.0.0.0 --allowed-hosts "$(hostname):5000"

Three things make the page useful, and each is MLflow's own mechanism:

- The address. MLflow 3's UI opens an experiment as a GenAI experiment (traces) unless the
  URL says ``workflowType=machine_learning`` or the browser remembers that choice; the
  printed address says it, so a fresh browser lands on the runs.
- A saved runs-table view. MLflow keeps shared views as experiment tags
  (``mlflow.sharedViewState.<key>``, opened by ``viewStateShareKey=<key>``); the project keeps
  one, ``VIEW_KEY``, showing the headline metrics, the params that differ between training
  runs and each run's stage. It is rewritten when ``make ui`` starts and when a sweep ends,
  so it lists the params that differ then.
- A quick start. ``mlflow ui`` starts four web workers and, by default, a job runner with
  several Huey consumers (for GenAI evaluation jobs); on two busy cores that takes from 15 s
  to minutes. One person's browser needs one worker and no jobs: ``--workers 1`` and
  ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``, both documented MLflow settings. The server
  is started first, and this process imports MLflow while the server does (two cores, two
  imports at once); the store is prepared once the server answers: ``mlflow server``
  creates or migrates the store before it starts answering, and two processes migrating
  one fresh SQLite store at once make one of them fail.

Any other option goes to ``mlflow server`` as it is. With ``MLFLOW_TRACKING_URI`` pointing at
a tracking server, nothing is started: the view is set there and its address printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

from mnist_pipeline import MLFLOW_JOBS_OFF, tracking
from mnist_pipeline.core.errors import PipelineError, exit_on_error
from mnist_pipeline.core.project import PROJECT_ROOT, mlflow_command
from mnist_pipeline.core.supervised import Server, ServerExited
from mnist_pipeline.tracking import mlflow_compat

log = logging.getLogger(__name__)

#: The name of the project's runs-table view (``viewStateShareKey=`` in the address).
VIEW_KEY = "mnist-compare"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
#: The metrics that show the train/test gap, in the order they appear as columns.
METRICS = ("test_accuracy", "train_accuracy", "accuracy_gap")
#: Beyond this many differing params the table gets unreadable; the first ones are kept.
MAX_PARAMS = 12
#: The environment that makes ``mlflow server`` start in seconds (see the module docstring):
#: the package's default for every server it starts, forced here even if the caller's
#: environment says otherwise.
FAST_START_ENV = MLFLOW_JOBS_OFF


def view_state(params: list[str]) -> dict[str, Any]:
    """The runs-table view as MLflow 3.17's UI stores a shared view: its search facets and
    its UI state, as one JSON object. Columns are named as the UI names them
    (``metrics.`name```); every run is listed, newest first, sweeps collapsed under their
    parent run."""
    columns = [f"metrics.`{m}`" for m in METRICS]
    columns += [f"params.`{p}`" for p in params[:MAX_PARAMS]]
    columns.append("tags.`stage`")
    return {
        # search facets
        "searchFilter": "",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        # UI state
        "selectedColumns": columns,
        "columnOrder": [],
        "columnWidths": {},
        "runsHiddenMode": "SHOW_ALL",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "groupBy": None,
        "groupsExpanded": {},
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
    }


def differing_params(experiment_id: str) -> list[str]:
    """The params that differ between the experiment's finished training runs."""
    from mnist_pipeline.experiments.compare import varying_params

    mlflow = tracking.configured_mlflow()
    runs = mlflow.search_runs(
        [experiment_id],
        filter_string="tags.stage = 'train' and attributes.status = 'FINISHED'",
        output_format="list",
        max_results=1000,
    )
    return varying_params(runs) if len(runs) > 1 else []


def refresh_view(experiment_name: str) -> str:
    """Create the experiment if needed, mark it a model-training experiment and (re)write
    the project's runs-table view on it; return the experiment id."""
    experiment_id = tracking.ensure_experiment(experiment_name)
    client = tracking.client()
    for key, value in tracking.EXPERIMENT_TAGS.items():  # experiments made before the tag
        client.set_experiment_tag(experiment_id, key, value)
    state = view_state(differing_params(experiment_id))
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(state))
    return experiment_id


def try_refresh_view(experiment_name: str) -> None:
    """``refresh_view`` for the end of a pipeline run: the view is a convenience, so a
    failure is a warning, never a failed stage."""
    try:
        refresh_view(experiment_name)
    except Exception as exc:  # any store trouble: the results themselves are logged
        log.warning("the runs-table view in mlflow ui was not updated: %s", exc)


def prepare(experiment_name: str, store: str) -> str:
    """``refresh_view``, with any store trouble as a PipelineError naming the store."""
    try:
        return refresh_view(experiment_name)
    except PipelineError:
        raise
    except Exception as exc:  # MLflow and SQLAlchemy errors: one line, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"cannot use the MLflow store {store}: {first}") from None


def import_mlflow() -> None:
    """Import what ``prepare`` uses (MLflow's client and SQL store: seconds of imports)."""
    import mlflow
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def address(base_url: str, experiment_id: str) -> str:
    """The page where a person compares runs: the experiment's runs tab, as a model-training
    experiment, with the project's view. The runs tab itself, not the experiment, is named:
    the experiment page redirects to a tab and keeps only some of the URL's parameters."""
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def server_command(store_uri: str, host: str, port: int, extra: list[str]) -> list[str]:
    """``mlflow server`` (what ``mlflow ui`` runs) with one web worker."""
    return [
        *mlflow_command(),
        "server",
        "--backend-store-uri",
        store_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        *extra,
    ]


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise PipelineError(
                f"cannot listen on {host}:{port} ({exc.strerror}); is another mlflow ui "
                f"running? Pick another port: make ui PORT={port + 1}"
            ) from None


#: A traceback's last line: ``package.module.SomeError: message`` (SQLAlchemy adds the
#: driver's exception in brackets: ``(sqlite3.DatabaseError) file is not a database``).
_EXCEPTION_LINE = re.compile(
    r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit)\w*: (?:\([\w.]+\) )?(?P<message>.+)$"
)


class ServerOutput:
    """The server's output: kept (not shown) until it answers, then each new line passed on
    to stderr (its request log). A server that dies before answering (a store it cannot open,
    an option it does not know) has printed a traceback; what the user gets is its reason."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.held: list[str] = []
        self.passing = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            if self.passing.is_set():
                sys.stderr.write(line)
            else:
                self.held.append(line)

    def pass_on(self) -> None:
        self.passing.set()

    def reason(self) -> str:
        """The message of the last exception the server printed before it died, without
        the exception's class (``mlflow.exceptions.MlflowException: x`` -> ``x``), else its
        last line."""
        self.thread.join(timeout=5)
        lines = [line.rstrip() for line in self.held if line.strip()]
        for line in reversed(lines):
            match = _EXCEPTION_LINE.match(line)
            if match:
                return match["message"]
        return lines[-1].strip() if lines else "it printed nothing"


def wait_until_up(server: Server, output: ServerOutput, timeout_s: float, store: str) -> None:
    """Until the server answers; one line with its own reason if it dies first."""
    try:
        server.wait_until_up(timeout_s)
    except ServerExited as exc:
        raise PipelineError(
            f"mlflow server exited with status {exc.returncode}: {output.reason()} (store {store})"
        ) from None
    except TimeoutError:
        raise PipelineError(
            f"mlflow server did not answer at {server.health_url.removesuffix('/health')} "
            f"within {timeout_s:.0f} s"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_pipeline.ui",
        description=__doc__.split("\n\n")[0],
        epilog="Other options go to `mlflow server` (see `mlflow server --help`).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 shares it on the network")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--experiment", default="mnist", help="default: %(default)s")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for it")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with exit_on_error():
        store = tracking.tracking_uri()
        if store.startswith(("http://", "https://")):
            experiment_id = prepare(args.experiment, store)
            print(f"The runs are on the tracking server {store}; open:")
            print(address(store, experiment_id))
            return 0
        tracking.check_store(store)  # a store the server could not open, in one line
        check_port(args.host, args.port)
        server_store, folder = mlflow_compat.server_store(store)
        command = server_command(server_store, args.host, args.port, extra)
    # `kill` (SIGTERM) stops the server too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    url = f"http://{args.host}:{args.port}"
    # 0.0.0.0 is where it listens, not an address to open.
    reach = socket.gethostname() if args.host in ("0.0.0.0", "::") else args.host
    shown = f"http://{reach}:{args.port}"
    server = Server(
        command,
        url + "/health",
        # Unbuffered: its log goes through a pipe (ServerOutput), line by line as on a terminal.
        env={**os.environ, **FAST_START_ENV, "PYTHONUNBUFFERED": "1"},
        cwd=folder or PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = ServerOutput(server.process)
    try:
        import_mlflow()  # while the server imports it too
        with exit_on_error():
            wait_until_up(server, output, args.timeout, store)
            # Not before: the server creates or migrates a fresh store (see the docstring).
            experiment_id = prepare(args.experiment, store)
        print(
            f"\nMLflow UI for {store}\nCompare the runs here (Ctrl-C stops it):\n\n"
            f"    {address(shown, experiment_id)}\n",
            flush=True,
        )
        output.pass_on()
        return server.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
