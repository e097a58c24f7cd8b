"""The scoring server ``make serve`` runs: MLflow's ``/invocations`` contract, without its
per-request overhead.

MLflow's own server (``mlflow models serve``) spends most of a 64-image request outside the
model: it parses the JSON body twice, deep-copies the parsed lists before casting them
(``mlflow.utils.proto_json_utils._cast_schema_type``, 3.17.2) and writes the answer with the
standard ``json`` module: 59 ms of CPU for a 64-image request, three quarters of it in that
copy, the model a few ms (docs/performance.md, "Serving"). This app answers the same
requests the same way — the same registered pyfunc model, its signature enforced by
``PyFuncModel.predict``, the same answer ``{"predictions": [...]}`` and MLflow's error body
``{"error_code", "message"}`` with its status — but parses once with ``orjson``, converts
straight to the signature's dtype and refuses a body over a size limit (413) without keeping
it, so a huge request costs no memory.

Started by ``serving.server`` through uvicorn, one process per worker: each worker calls
``create_app``, which loads the model named by ``MODEL_ENV`` (set by the command) once.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

log = logging.getLogger(__name__)

#: The model URI the workers load (``models:/mnist@champion``): set by ``serving.server``.
MODEL_ENV = "MNIST_SERVE_MODEL"
#: The largest request body accepted, in bytes; larger ones get 413.
MAX_BYTES_ENV = "MNIST_SERVE_MAX_BYTES"
#: 16 MiB: about 3,000 images written as MNIST's grey levels over 255 with 4 decimals.
DEFAULT_MAX_BYTES = 16 * 2**20
#: A body over the limit is read and dropped up to this many times the limit (so the client
#: gets its 413), beyond that the connection is closed.
DRAIN_FACTOR = 4
#: The request keys MLflow's server takes for a batch of tensors (TF Serving's formats).
TENSOR_KEYS = ("inputs", "instances")
JSON = "application/json"


def error(message: str, status: int = 400, code: str = "BAD_REQUEST") -> Response:
    """An error in MLflow's format (what its clients and ``MlflowException`` parse)."""
    body = orjson.dumps({"error_code": code, "message": message})
    return Response(body, status_code=status, media_type=JSON)


class Scorer:
    """A loaded pyfunc model and the one conversion its signature asks for."""

    def __init__(self, model_uri: str) -> None:
        import mlflow

        self.model = mlflow.pyfunc.load_model(model_uri)
        self.dtype = tensor_dtype(self.model.metadata.get_input_schema())
        self.version = mlflow.__version__

    def score(self, body: bytes) -> Response:
        """One request body -> the model's answer, or a 400 that says what is wrong."""
        from mlflow.exceptions import MlflowException

        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return error(f"the request body is not valid JSON: {exc}")
        keys = [k for k in TENSOR_KEYS if isinstance(request, dict) and k in request]
        if len(keys) != 1 or len(request) != 1:
            got = sorted(request) if isinstance(request, dict) else type(request).__name__
            return error(
                'expected a JSON object with one key, "inputs" (or "instances"): '
                f'{{"inputs": [[784 values in [0, 1]], ...]}}; got {got}'
            )
        try:
            x = np.asarray(request[keys[0]], dtype=self.dtype)
        except (TypeError, ValueError) as exc:
            return error(f"pixel values must be numbers in equal-length rows: {exc}")
        try:
            answer = self.model.predict(x)
        except MlflowException as exc:  # the signature's or the contract's refusal
            return Response(exc.serialize_as_json(), exc.get_http_status_code(), media_type=JSON)
        return Response(orjson.dumps({"predictions": records(answer)}), media_type=JSON)


def tensor_dtype(schema: Any) -> Any:
    """The dtype a tensor signature asks for (None: as the JSON gives it). A model whose
    signature names columns (a DataFrame model) is not one this server can feed."""
    if schema is None:
        return None
    if not schema.is_tensor_spec() or len(schema.inputs) != 1:
        raise ValueError(
            "the model's signature is not one tensor (it names columns): serve it with "
            "`mlflow models serve`, which converts JSON to DataFrames"
        )
    return schema.numpy_types()[0]


def records(answer: Any) -> Any:
    """The answer as MLflow's server writes it: a DataFrame's rows as objects, an array as
    nested lists."""
    import pandas as pd

    if isinstance(answer, pd.DataFrame):
        return answer.to_dict(orient="records")
    return np.asarray(answer).tolist()


def expects_go_ahead(request: Request) -> bool:
    """``Expect: 100-continue`` (curl's way with a large body): the client waits for the
    server's go-ahead, which uvicorn sends only when the body is first read."""
    return request.headers.get("expect", "").lower() == "100-continue"


def create_app() -> Starlette:
    """The app of one worker, its model loaded (uvicorn's factory, called in each worker)."""
    scorer = Scorer(os.environ[MODEL_ENV])
    limit = int(os.environ.get(MAX_BYTES_ENV, DEFAULT_MAX_BYTES))

    async def invocations(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != JSON:
            return error(f"send the batch as {JSON}", 415, "INVALID_PARAMETER_VALUE")
        too_large = error(
            f"the request body is over the server's limit of {limit} bytes: send fewer "
            f"images per request (or start the server with {MAX_BYTES_ENV} set higher)",
            413,
            "REQUEST_LIMIT_EXCEEDED",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit and expects_go_ahead(request):
            return too_large  # the client sends the body only once told to: never
        body, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                body += chunk
            elif size > DRAIN_FACTOR * limit:
                return too_large  # the connection closes with the rest unread
            else:  # read and dropped: a client that reads only once it has sent all
                body = bytearray()  # (urllib, requests, ab) would otherwise see a reset
        if size > limit:
            return too_large
        return scorer.score(bytes(body))

    async def ping(request: Request) -> Response:
        return Response("\n", media_type=JSON)

    async def version(request: Request) -> Response:
        return Response(scorer.version, media_type=JSON)

    routes = [
        Route("/invocations", invocations, methods=["POST"]),
        Route("/ping", ping),
        Route("/health", ping),
        Route("/version", version),
    ]
    return Starlette(routes=routes)
