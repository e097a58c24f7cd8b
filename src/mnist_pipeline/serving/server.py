"""``make serve``: ``mlflow models serve`` for a registered model, checked first.

    python -m mnist_pipeline.serve                                   # models:/mnist@champion
    python -m mnist_pipeline.serve --model models:/mnist@candidate --port 5002
    python -m mnist_pipeline.serve --model models:/mnist/3

The store is the project's (``MLFLOW_TRACKING_URI`` or ``mlflow.db`` beside the code, read
as every command reads it), and the model must be in its registry: ``mlflow models serve``
would otherwise end in a traceback (``Registered Model with name=mnist not found``) after
seconds of imports. What is checked here is said in one line, with the command that fixes it.
Then it runs ``mlflow models serve`` as its child, whose processes (the server's workers)
write to this process's stderr, through the project's noise filter: TensorFlow's start-up
lines in every worker are dropped as in the stages. Ctrl-C reaches the whole process group;
``kill`` (SIGTERM, SIGHUP) of this process is passed on to the server.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys

from mnist_pipeline import tracking
from mnist_pipeline.core import log_filter
from mnist_pipeline.core.errors import PipelineError, exit_on_error

DEFAULT_MODEL = "models:/mnist@champion"
#: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: the registry's two forms.
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
HOW_TO_REGISTER = (
    "register the pipeline's model with `python -m mnist_pipeline.register`, then make it "
    "the champion with `python -m mnist_pipeline.register --promote` (docs/serving.md)"
)


def check_registered(model: str) -> None:
    """``model`` names a version in the store's registry, else a PipelineError saying how to
    get one there."""
    match = _REGISTERED.match(model)
    if match is None:
        raise PipelineError(
            f"--model {model!r}: expected models:/<name>@<alias> or models:/<name>/<version>"
        )
    mlflow = tracking.configured_mlflow()
    client = mlflow.MlflowClient()
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        raise PipelineError(
            f"no registered model {name!r} in {tracking.store_label()}: {HOW_TO_REGISTER}"
        ) from None
    try:
        if alias:
            client.get_model_version_by_alias(name, alias)
        else:
            client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise PipelineError(
            f"registered model {name!r} has no {what} in {tracking.store_label()}: "
            f"{HOW_TO_REGISTER}, or pick another with --model"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_pipeline.serve", description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="default: %(default)s")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 shares it on the network")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument(
        "--workers",
        type=int,
        default=usable_cores(),
        help="server processes, each with the model (default: the cores this process may use)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    log_filter.quiet_command()  # the server's processes inherit the filtered stderr
    with exit_on_error():
        uri = tracking.tracking_uri()
        tracking.check_store(uri)
        tracking.require_existing_store()  # serving never creates a store
        check_registered(args.model)
    serve = ["models", "serve", "-m", args.model, "--env-manager", "local"]
    serve += ["--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    print(f"+ MLFLOW_TRACKING_URI={uri} mlflow {' '.join(serve)}", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "mlflow", *serve]
    env = {**os.environ, **worker_threads(), "MLFLOW_TRACKING_URI": uri}
    # MLflow starts `uvicorn` from PATH: this environment's, also when run as .venv/bin/python.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return run_server(command, env)


def run_server(command: list[str], env: dict[str, str]) -> int:
    """Run the server until it ends; its exit status. Ctrl-C is the terminal's to deliver (to
    the whole foreground group, the server included); SIGTERM and SIGHUP sent to this process
    are passed on."""
    server = subprocess.Popen(command, env=env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda number, _frame: server.send_signal(number))
    return server.wait()


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's share), else all."""
    if hasattr(os, "sched_getaffinity"):  # not on macOS
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_threads() -> dict[str, str]:
    """One TensorFlow thread per worker (unless the environment says otherwise): a request's
    arithmetic is far below what pays for splitting it, and the workers, one per core,
    already fill the machine; with TensorFlow's default of a pool per core in each worker,
    they fought for the cores (make bench, "Serving")."""
    return {
        name: os.environ.get(name, "1")
        for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
    }
