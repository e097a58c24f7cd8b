"""`make bench`'s serving section: the real HTTP server under a real load generator.

Three servers, one after the other, on the model a cold `dvc repro` just trained:

- **project**: ``python -m mnist_pipeline.serve`` (what ``make serve`` runs: the project's
  app under uvicorn, ``serving/app.py``) on the registry's ``mnist@champion``;
- **mlflow pyfunc**: ``mlflow models serve`` of the same ``mnist@champion``, MLflow's own
  server on the same model and contract (what ``make serve`` ran before);
- **anchor**: ``mlflow models serve`` of the plain Keras-flavour model the train stage logs
  (``model_uri`` in ``models/run.json``), what a user would otherwise pick.

Each is driven by Apache Bench (``ab``, Debian's ``apache2-utils``) with the README's
request format, ``{"inputs": [[784 values in [0, 1]], ...]}``, made from real test images, at
the loads of ``LOADS``, for ``SECONDS`` each after a warm-up. ``ab`` reports requests per
second, failed requests and the latency percentiles; the server's resident memory (its whole
process tree) is read before and after. The project's server then takes the good load again
with bad requests mixed in (``BAD``: raw pixels, wrong shapes, not JSON, 50 MB bodies), and,
with ``--soak SECONDS``, a long run at 8 clients.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

from mnist_pipeline.core.supervised import Server, free_port
from mnist_pipeline.stages.artifacts import scaled

#: (what, images per request, concurrent clients)
LOADS = (
    ("1 image, 1 client", 1, 1),
    ("1 image, 8 clients", 1, 8),
    ("64 images, 4 clients", 64, 4),
)
SECONDS = 10  # per load: ab's -t
#: Between two bad requests: a steady trickle beside the good load, not a second flood (the
#: sender shares the 2 cores; flat out it would measure its own CPU, not the server).
BAD_PAUSE_S = 0.1


def payloads(processed: Path, folder: Path) -> dict[int, Path]:
    """One request body per batch size of ``LOADS``, from the processed test images (values
    written as a client would, 4 decimals)."""
    x = np.load(processed / "x_test.npy", mmap_mode="r")
    bodies = {}
    for images in sorted({n for _, n, _ in LOADS}):
        rows = np.round(scaled(x[:images]).astype(np.float64), 4).tolist()
        bodies[images] = folder / f"request-{images}.json"
        bodies[images].write_text(json.dumps({"inputs": rows}))
    return bodies


def ab(url: str, body: Path, clients: int, seconds: float) -> dict:
    """One ``ab`` run: requests/s, failed and non-2xx requests, p50/p99 latency (ms)."""
    command = ["ab", "-q", "-k", "-t", str(seconds), "-n", "10000000", "-c", str(clients)]
    command += ["-p", str(body), "-T", "application/json", url]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120).stdout

    def number(label: str) -> float:
        match = re.search(rf"^{label}:\s+([\d.]+)", out, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"ab printed no {label!r}:\n{out[-2000:]}")
        return float(match[1])

    def percentile(p: int) -> float:
        match = re.search(rf"^\s+{p}%\s+(\d+)", out, re.MULTILINE)
        return float(match[1]) if match else float("nan")

    non_2xx = re.search(r"^Non-2xx responses:\s+(\d+)", out, re.MULTILINE)
    return {
        "requests_per_s": number("Requests per second"),
        "complete": int(number("Complete requests")),
        "failed": int(number("Failed requests")) + (int(non_2xx[1]) if non_2xx else 0),
        "p50_ms": percentile(50),
        "p99_ms": percentile(99),
    }


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children (the server's workers)."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total / 2**20


def drive(
    command: list[str],
    cwd: Path,
    env: dict,
    log: Path,
    bodies: dict[int, Path],
    extra: tuple = (),
) -> dict:
    """Start ``command`` (with ``{port}`` filled in), wait until it answers, warm it up, run
    every load, then each of ``extra`` (functions of the URL and the bodies, whose results
    are kept under their names); the server stops whatever happens."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    filled = [part.replace("{port}", str(port)) for part in command]
    with (
        log.open("a") as out,
        Server(
            filled, f"{url}/ping", env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT
        ) as server,
    ):
        started_s = server.wait_until_up(timeout_s=300)
        for body in bodies.values():  # the first calls trace the model's function
            warm = ab(f"{url}/invocations", body, 1, 2)
            if warm["failed"]:  # timing refusals would say nothing about serving
                raise SystemExit(f"error: the server refused the bench's request {body}")
        rss_start = tree_rss_mb(server.process.pid)
        loads = {}
        for what, images, clients in LOADS:
            result = ab(f"{url}/invocations", bodies[images], clients, SECONDS)
            loads[what] = result | {"images_per_s": result["requests_per_s"] * images}
        rss_end = tree_rss_mb(server.process.pid)
        results = {"start_s": started_s, "rss_mb": [rss_start, rss_end], "loads": loads}
        for step in extra:
            results[step.__name__] = step(f"{url}/invocations", bodies, server.process.pid)
    return results


#: Requests outside the contract, sent in a loop beside the good load: (what, body, chunked).
def bad_requests(good: bytes) -> list[tuple[str, bytes, bool]]:
    rows = json.loads(good)["inputs"]
    raw = json.dumps({"inputs": [[round(v * 255) for v in rows[0]]]}).encode()
    row = json.dumps(rows[0]).encode()
    big = b'{"inputs": [' + b",".join([row] * (50 * 2**20 // len(row) + 1)) + b"]}"  # 50 MB
    return [
        ("raw 0-255 pixels", raw, False),
        (
            "28x28 rows",
            json.dumps({"inputs": [rows[0][i : i + 28] for i in range(0, 784, 28)]}).encode(),
            False,
        ),
        ("783 values", json.dumps({"inputs": [rows[0][:783]]}).encode(), False),
        ("not JSON", b"inputs=0.5,0.5", False),
        (f"{len(big) / 2**20:.0f} MB body", big, False),
        (f"{len(big) / 2**20:.0f} MB body, chunked", big, True),
    ]


def post(url: str, body: bytes, chunked: bool) -> str:
    """One request on a new connection: its status, or how the connection ended."""
    parsed = url.removeprefix("http://").split("/", 1)
    host, port = parsed[0].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        if chunked:
            chunks = (body[i : i + 2**20] for i in range(0, len(body), 2**20))
            connection.request(
                "POST",
                "/" + parsed[1],
                chunks,
                {"Content-Type": "application/json"},
                encode_chunked=True,
            )
        else:
            connection.request("POST", "/" + parsed[1], body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return str(response.status)
    except (ConnectionError, http.client.HTTPException) as exc:
        return f"connection closed ({type(exc).__name__})"
    finally:
        connection.close()


def under_bad_requests(url: str, bodies: dict[int, Path], pid: int) -> dict:
    """The 8-client load of one image alone, then again while a client loops over
    ``bad_requests``: is the good load as fast, and does every bad request get its 4xx?"""
    good = bodies[1]
    alone = ab(url, good, 8, SECONDS)
    stop, answers = threading.Event(), {}

    def loop() -> None:
        cases = bad_requests(good.read_bytes())
        while not stop.is_set():
            for what, body, chunked in cases:
                answers.setdefault(what, Counter())[post(url, body, chunked)] += 1
                stop.wait(BAD_PAUSE_S)

    sender = threading.Thread(target=loop, daemon=True)
    rss_start = tree_rss_mb(pid)
    sender.start()
    mixed = ab(url, good, 8, SECONDS)
    stop.set()
    sender.join(timeout=120)
    return {
        "alone": alone,
        "mixed": mixed,
        "bad": {what: dict(counts) for what, counts in answers.items()},
        "rss_mb": [rss_start, tree_rss_mb(pid)],
    }


def soak(seconds: float):
    """A step of ``drive``: ``seconds`` at 8 clients of one image, resident memory at the
    start and the end."""

    def soak_run(url: str, bodies: dict[int, Path], pid: int) -> dict:
        rss_start, started = tree_rss_mb(pid), time.monotonic()
        result = ab(url, bodies[1], 8, seconds)
        return result | {
            "seconds": time.monotonic() - started,
            "rss_mb": [rss_start, tree_rss_mb(pid)],
        }

    return soak_run


def measure_serving(work: Path, env: dict, log: Path, tmp: Path, soak_s: float = 0) -> dict:
    """Register and promote the workspace's model, then drive the three servers."""
    if shutil.which("ab") is None:
        raise SystemExit("error: ab not found: apt-get install apache2-utils (make bench does)")
    python = [sys.executable, "-m"]
    for flags in ([], ["--promote"]):
        subprocess.run([*python, "mnist_pipeline.register", *flags], cwd=work, env=env, check=True)
    model_uri = json.loads((work / "models" / "run.json").read_text())["model_uri"]
    bodies = payloads(work / "data" / "processed", tmp)
    project = [*python, "mnist_pipeline.serve", "--port", "{port}"]
    mlflow_serve = [*python, "mlflow", "models", "serve", "--env-manager", "local"]
    mlflow_serve += ["--host", "127.0.0.1", "--port", "{port}", "-m"]
    extra = (under_bad_requests, *([soak(soak_s)] if soak_s else []))
    return {
        "predict": predict_split(work, env, tmp / "pictures"),
        "project": drive(project, work, env, log, bodies, extra),
        "mlflow pyfunc": drive(
            [*mlflow_serve, "models:/mnist@champion", "--workers", "2"], work, env, log, bodies
        ),
        "anchor": drive([*mlflow_serve, model_uri], work, env, log, bodies),
    }


PICTURES = 1000


def predict_split(work: Path, env: dict, folder: Path) -> dict:
    """`predict` on a folder of ``PICTURES`` PNG files (test images enlarged to 112 px, dark
    on light, as a scan would be): the command's wall time, and, in this process, where the
    time goes: decoding the files, MNIST formatting, the model (the champion, loaded first)."""
    from PIL import Image

    from mnist_pipeline.serving import images, predict

    x = np.load(work / "data" / "processed" / "x_test.npy", mmap_mode="r")[:PICTURES]
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(x):
        grey = 255 - np.asarray(row).reshape(28, 28)  # the stored pixels, dark on light
        Image.fromarray(grey).resize((112, 112), Image.Resampling.BILINEAR).save(
            folder / f"{i:04d}.png"
        )
    command = [sys.executable, "-m", "mnist_pipeline.predict", "--model"]
    started = time.perf_counter()
    subprocess.run(
        [*command, "models:/mnist@champion", str(folder)],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - started
    files = sorted(folder.iterdir())
    store = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]  # the workspace's store
    try:
        with contextlib.chdir(work):
            classify = predict.load_classifier("models:/mnist@champion")
    finally:
        if store is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = store
    split = {}
    started = time.perf_counter()
    greys = [images.load_image(f) for f in files]
    split["decoding"] = time.perf_counter() - started
    started = time.perf_counter()
    pixels = np.stack([images.to_mnist(g).reshape(-1) for g in greys])
    split["MNIST formatting"] = time.perf_counter() - started
    started = time.perf_counter()
    classify(pixels)
    split["the model"] = time.perf_counter() - started
    return {"pictures": len(files), "command_s": wall, "split_s": split}


SERVERS = ("project", "mlflow pyfunc", "anchor")


def render(serving: dict) -> list[str]:
    """The section of results.md."""
    m = serving.get("machine")
    on = f" Measured on {m['cpu']}, {m['cores']} cores, {m['date']}" if m else ""
    if "load_average" in serving:
        on += ", load average (1 min) {:.2f} at the start, {:.2f} at the end".format(
            *serving["load_average"]
        )
    on += "." if on else ""
    lines = [
        "## Serving",
        "",
        f"`python -m bench.run --serving-only`.{on} "
        "Apache Bench against the real HTTP server, the README's request format, "
        f"{SECONDS} s per load after a warm-up. *project*: `make serve` (the project's app "
        "under uvicorn, one worker per core, on the registry's `mnist@champion`); *mlflow "
        "pyfunc*: `mlflow models serve --workers 2` of the same `mnist@champion` (MLflow's "
        "server, the same model and contract); *anchor*: `mlflow models serve` of the "
        "Keras-flavour model the train stage logs (its defaults: one worker).",
        "",
        "| load | server | requests/s | images/s | p50 ms | p99 ms | failed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for what, _, _ in LOADS:
        for name in SERVERS:
            r = serving[name]["loads"][what]
            lines.append(
                f"| {what} | {name} | {r['requests_per_s']:.0f} | {r['images_per_s']:.0f} | "
                f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['failed']} of {r['complete']} |"
            )
    for name in SERVERS:
        start, end = serving[name]["rss_mb"]
        lines.append("")
        lines.append(
            f"{name}: answered {serving[name]['start_s']:.1f} s after it started; resident "
            f"memory (all its processes) {start:.0f} MB after the warm-up, {end:.0f} MB after "
            "the loads."
        )
    lines += _bad_requests(serving["project"]["under_bad_requests"])
    if "predict" in serving:
        r = serving["predict"]
        split = ", ".join(f"{k} {v:.2f} s" for k, v in r["split_s"].items())
        lines += [
            "",
            f"`predict --model models:/mnist@champion` on a folder of {r['pictures']} PNG "
            f"files (112x112, dark on light): {r['command_s']:.1f} s, the command's start "
            f"(imports, loading the model) included. In one process, once the model is "
            f"loaded: {split}.",
        ]
    if "soak_run" in serving["project"]:
        r = serving["project"]["soak_run"]
        lines += [
            "",
            f"Soak, project: 1 image, 8 clients for {r['seconds']:.0f} s: {r['complete']} "
            f"requests, {r['failed']} failed, {r['requests_per_s']:.0f} requests/s, p99 "
            f"{r['p99_ms']:.0f} ms; resident memory {r['rss_mb'][0]:.0f} MB at the start, "
            f"{r['rss_mb'][1]:.0f} MB at the end.",
        ]
    return lines


def _bad_requests(r: dict) -> list[str]:
    alone, mixed = r["alone"], r["mixed"]
    lines = [
        "",
        "Bad requests beside the good load, project (1 image, 8 clients; one more client "
        f"sends the bad requests in turn, {BAD_PAUSE_S} s apart, each on a new connection):",
        "",
        "| good load | requests/s | p50 ms | p99 ms | failed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for what, g in (("alone", alone), ("with bad requests", mixed)):
        lines.append(
            f"| {what} | {g['requests_per_s']:.0f} | {g['p50_ms']:.0f} | {g['p99_ms']:.0f} | "
            f"{g['failed']} of {g['complete']} |"
        )
    lines += ["", "| bad request | answers |", "| --- | --- |"]
    for what, counts in r["bad"].items():
        said = ", ".join(f"{n} x {status}" for status, n in sorted(counts.items()))
        lines.append(f"| {what} | {said} |")
    start, end = r["rss_mb"]
    lines += ["", f"Resident memory, all processes: {start:.0f} MB before, {end:.0f} MB after."]
    return lines
