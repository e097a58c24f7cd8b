"""`make bench`'s serving section: the real HTTP server under a real load generator.

Two servers, one after the other, on the model a cold `dvc repro` just trained:

- **the project's**: ``python -m mnist_pipeline.serve`` (what ``make serve`` runs) on the
  registry's ``mnist@champion``, the pyfunc behind the serving contract;
- **the anchor**: ``mlflow models serve`` of the plain Keras-flavour model the train stage
  logs (``model_uri`` in ``models/run.json``), what a user would otherwise pick.

Each is driven by Apache Bench (``ab``, Debian's ``apache2-utils``) with the README's
request format, ``{"inputs": [[784 values in [0, 1]], ...]}``, made from real test images, at
the loads of ``LOADS``, for ``SECONDS`` each after a warm-up. ``ab`` reports requests per
second, failed requests and the latency percentiles; the server's resident memory (its whole
process tree) is read before and after.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil

from mnist_pipeline.core.supervised import Server, free_port

#: (what, images per request, concurrent clients)
LOADS = (
    ("1 image, 1 client", 1, 1),
    ("1 image, 8 clients", 1, 8),
    ("64 images, 4 clients", 64, 4),
)
SECONDS = 10  # per load: ab's -t


def payloads(processed: Path, folder: Path) -> dict[int, Path]:
    """One request body per batch size of ``LOADS``, from the processed test images (values
    written as a client would, 4 decimals)."""
    x = np.load(processed / "x_test.npy", mmap_mode="r")
    bodies = {}
    for images in sorted({n for _, n, _ in LOADS}):
        rows = np.round(np.asarray(x[:images], dtype=np.float64), 4).tolist()
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


def drive(command: list[str], cwd: Path, env: dict, log: Path, bodies: dict[int, Path]) -> dict:
    """Start ``command`` (with ``{port}`` filled in), wait until it answers, warm it up, run
    every load; the server stops whatever happens."""
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
            ab(f"{url}/invocations", body, 1, 2)
        rss_start = tree_rss_mb(server.process.pid)
        loads = {}
        for what, images, clients in LOADS:
            result = ab(f"{url}/invocations", bodies[images], clients, SECONDS)
            loads[what] = result | {"images_per_s": result["requests_per_s"] * images}
        rss_end = tree_rss_mb(server.process.pid)
    return {"start_s": started_s, "rss_mb": [rss_start, rss_end], "loads": loads}


def measure_serving(work: Path, env: dict, log: Path, tmp: Path) -> dict:
    """Register and promote the workspace's model, then drive both servers."""
    if shutil.which("ab") is None:
        raise SystemExit("error: ab not found: apt-get install apache2-utils (make bench does)")
    python = [sys.executable, "-m"]
    for flags in ([], ["--promote"]):
        subprocess.run([*python, "mnist_pipeline.register", *flags], cwd=work, env=env, check=True)
    model_uri = json.loads((work / "models" / "run.json").read_text())["model_uri"]
    bodies = payloads(work / "data" / "processed", tmp)
    project = [*python, "mnist_pipeline.serve", "--port", "{port}"]
    anchor = [*python, "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    anchor += ["--host", "127.0.0.1", "--port", "{port}"]
    return {
        "project": drive(project, work, env, log, bodies),
        "anchor": drive(anchor, work, env, log, bodies),
    }


def render(serving: dict) -> list[str]:
    """The section of results.md."""
    lines = [
        "## Serving",
        "",
        "Apache Bench against the real HTTP server, the README's request format, "
        f"{SECONDS} s per load after a warm-up. *project*: `make serve` (the registry's "
        "`mnist@champion`, the serving contract); *anchor*: `mlflow models serve` of the "
        "Keras-flavour model the train stage logs.",
        "",
        "| load | server | requests/s | images/s | p50 ms | p99 ms | failed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for what, _, _ in LOADS:
        for name in ("project", "anchor"):
            r = serving[name]["loads"][what]
            lines.append(
                f"| {what} | {name} | {r['requests_per_s']:.0f} | {r['images_per_s']:.0f} | "
                f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['failed']} of {r['complete']} |"
            )
    for name in ("project", "anchor"):
        start, end = serving[name]["rss_mb"]
        lines.append("")
        lines.append(
            f"{name}: answered {serving[name]['start_s']:.1f} s after it started; resident "
            f"memory (all its processes) {start:.0f} MB after the warm-up, {end:.0f} MB after "
            "the loads."
        )
    return lines
