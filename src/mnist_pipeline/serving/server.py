"""``make serve``: the scoring server for a registered model, checked first.

    python -m mnist_pipeline.serve                                   # models:/mnist@champion
    python -m mnist_pipeline.serve --model models:/mnist@candidate --port 5002
    python -m mnist_pipeline.serve --model models:/mnist/3

The store is the project's (``MLFLOW_TRACKING_URI`` or ``mlflow.db`` beside the code, read
as every command reads it), and the model must be in its registry: a missing one would
otherwise end in a traceback after seconds of imports. What is checked here is said in one
line, with the command that fixes it. Then uvicorn runs ``serving.app`` (MLflow's
``/invocations`` contract, faster: see there) with one process per core, each with the model
and one TensorFlow thread; its output goes through the project's noise filter, so
TensorFlow's start-up lines in every worker are dropped as in the stages. Ctrl-C and
``kill`` (SIGTERM) stop it gracefully: requests in flight are answered first.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys

from mnist_pipeline import tracking
from mnist_pipeline.core import log_filter
from mnist_pipeline.core.errors import PipelineError, exit_on_error
from mnist_pipeline.serving import app

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
    # What the workers would find only after seconds of imports, each of them, in a loop.
    signature = mlflow.models.get_model_info(model).signature
    try:
        app.tensor_dtype(signature.inputs if signature else None)
    except ValueError as exc:
        raise PipelineError(f"--model {model}: {exc}") from None


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
    os.environ.update({**worker_threads(), "MLFLOW_TRACKING_URI": uri, app.MODEL_ENV: args.model})
    print(
        f"serving {args.model} from {tracking.store_label()} on http://{args.host}:{args.port}"
        f" ({args.workers} worker{'s' if args.workers > 1 else ''}): POST /invocations",
        file=sys.stderr,
        flush=True,
    )
    return run_server(args.host, args.port, args.workers)


def run_server(host: str, port: int, workers: int) -> int:
    """uvicorn, until it is stopped: each worker imports ``serving.app`` and calls
    ``create_app`` (the model URI comes through the environment, set above)."""
    import uvicorn

    # uvicorn stops gracefully on SIGINT/SIGTERM, then puts back the handlers it found and
    # raises the signal again: with these, the process then exits 0 through its exit
    # handlers (the stderr filter's flush: the server's last lines), not killed by it.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stopped)
    uvicorn.run(
        "mnist_pipeline.serving.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,  # a line per request would cost more than the request
        timeout_graceful_shutdown=30,
    )
    return 0


def _stopped(signum: int, frame: object) -> None:
    raise SystemExit(0)


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
