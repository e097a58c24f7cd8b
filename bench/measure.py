"""What `make bench` measures, and how: nothing here knows the report or the command line.

``measure`` runs a command and returns a ``Sample`` (its wall time, and the CPU time and peak
memory of its whole process tree); ``summary`` reduces repetitions to median, min and max.
Also here: ``make ui``'s start-up time (``ui_start``, ``ui_starts``), the machine's description
(``machine``) and float32 matmul throughput (``matmul_throughput``), the load average sampled
while the bench runs (``LoadSampler``), ``-X importtime`` profiles (``import_profile``,
``top_imports``, ``extra_packages``), and ``clear_outputs``, which empties a project copy for
a cold ``dvc repro``. The constants shared with bench/run.py and bench/report.py (``STAGES``,
``FLOP_PER_SAMPLE``) live here.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from mnist_pipeline.core.supervised import free_port

#: The pipeline's DVC stages, in the order they run (each also timed alone).
STAGES = ("download", "preprocess", "train", "evaluate")

#: What a project copy holds after a run; ``clear_outputs`` removes it for a cold `dvc repro`.
OUTPUTS = ["data", "models", "reports", "dvc.lock", ".dvc/cache", ".dvc/tmp"]

# Training arithmetic per sample per epoch for Dense(784->512) -> Dense(512->10):
# forward and weight gradients of both layers, plus the input gradient of the second.
FLOP_PER_SAMPLE = 2 * (784 * 512 + 512 * 10) * 2 + 2 * 512 * 10

#: How many of the costliest imports (or packages) a profile lists. What the stages'
#: environment imports that the TF-only one does not is reported by package: these are the
#: packages `import tensorflow` should not pay for (Keras imports them if found).
PROFILE_TOP = 6


@dataclass
class Sample:
    """One run of a command: its wall time, and its process tree's CPU time and peak memory."""

    wall_s: float
    cpu_s: float
    peak_process_mb: float  # the largest single process (exact, from the kernel)
    peak_tree_mb: float  # all processes of the tree at once (sampled every 20 ms)


def measure(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> Sample:
    """Run ``cmd``; return its wall time, the CPU time and peak memory of its process tree."""
    peak_tree = 0
    done = threading.Event()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)

        def sample() -> None:
            nonlocal peak_tree
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    tree = [root, *root.children(recursive=True)]
                    peak_tree = max(peak_tree, sum(p.memory_info().rss for p in tree))
                except psutil.Error:
                    pass
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(
            f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}; see {log}"
        )
    return Sample(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_process_mb=usage.ru_maxrss / 1024,  # Linux reports KiB
        peak_tree_mb=peak_tree / 2**20,
    )


def ui_start(cwd: Path, env: dict[str, str], timeout_s: float = 600) -> float:
    """Seconds from starting ``python -m mnist_pipeline.ui`` (what ``make ui`` runs) to the
    address it prints once its server answers; then it is stopped as Ctrl-C would. Past
    ``timeout_s`` it gives up itself and exits, which ends the wait here."""
    port = free_port()
    started = time.monotonic()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mnist_pipeline.ui",
            "--port",
            str(port),
            "--timeout",
            str(timeout_s),
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in process.stdout:  # the address comes after the server answered
            if "#/experiments/" in line:
                return time.monotonic() - started
        raise SystemExit(f"error: make ui printed no address (exit status {process.poll()})")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def ui_starts(cwd: Path, env: dict[str, str], fresh_store: Path, repeat: int) -> dict:
    """``ui_start`` on the store in ``env`` and on a fresh store, ``repeat`` times each."""
    fresh_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{fresh_store}"}
    times: dict[str, list[float]] = {"store with runs": [], "fresh store": []}
    for _ in range(repeat):
        times["store with runs"].append(ui_start(cwd, env))
        fresh_store.unlink(missing_ok=True)
        times["fresh store"].append(ui_start(cwd, fresh_env))
    return {
        name: {"median": statistics.median(values), "all": [round(v, 2) for v in values]}
        for name, values in times.items()
    }


def summary(samples: list[Sample]) -> dict:
    """Median, min and max of each field over the repetitions, and their number."""
    out = {}
    for field in Sample.__dataclass_fields__:
        values = [getattr(s, field) for s in samples]
        out[field] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["n"] = len(samples)
    return out


def clear_outputs(work: Path) -> None:
    """Remove a run's outputs and DVC's cache from ``work``: the next `dvc repro` is cold."""
    for name in OUTPUTS:
        path = work / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def matmul_throughput(env: dict[str, str]) -> dict:
    """Sustained float32 GFLOP/s of TensorFlow's matmul (the kernel training runs on)."""
    code = """
import json, time, tensorflow as tf
def rate(m, k, n, seconds=3.0):
    a, b = tf.random.normal((m, k)), tf.random.normal((k, n))
    f = tf.function(lambda: tf.matmul(a, b))
    f().numpy()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        f().numpy(); count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9
print(json.dumps({"square_2048": rate(2048, 2048, 2048),
                  "batch_128x784x512": rate(128, 784, 512)}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """The CPU, cores, memory, OS and the versions of the tools the figures depend on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    from mnist_pipeline.tracking.provenance import package_version

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": version("tensorflow"),
        "keras": version("keras"),
        "dvc": version("dvc"),
        "mlflow": package_version("mlflow"),  # mlflow-skinny in .venv
    }


class LoadSampler:
    """The machine's 1-minute load average, sampled every few seconds while the bench runs:
    with other work on the cores every figure is inflated, so the results say how busy it was."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.values: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._done.is_set():
            self.values.append(os.getloadavg()[0])
            self._done.wait(every_s)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.values.append(os.getloadavg()[0])

    def summary(self) -> dict:
        v = self.values or [os.getloadavg()[0]]
        return {
            "start": v[0],
            "end": v[-1],
            "median": statistics.median(v),
            "max": max(v),
            "cores": os.cpu_count(),
        }


def import_profile(cmd: list[str], cwd: Path, env: dict[str, str]) -> list[tuple[str, float, int]]:
    """``python -X importtime``: (module, cumulative seconds, nesting depth) per import, in
    the order Python prints them (a module after everything it imported)."""
    python, *rest = cmd
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(
            [python, "-X", "importtime", *rest],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )
        err.seek(0)
        text = err.read()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}")
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|", 2)
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((name.strip(), int(cumulative) / 1e6, depth))
    return rows


def top_imports(rows: list[tuple[str, float, int]], n: int = PROFILE_TOP) -> dict:
    """Total import time and the costliest top-level imports (those the program itself, or a
    function of it, made: lazy imports inside the stages show up here)."""
    top = sorted((r for r in rows if r[2] == 0), key=lambda r: -r[1])
    return {
        "total_s": round(sum(r[1] for r in rows if r[2] == 0), 3),
        "top": [[name, round(s, 3)] for name, s, _ in top[:n]],
    }


def extra_packages(
    rows: list[tuple[str, float, int]], reference: list[tuple[str, float, int]]
) -> list[list]:
    """The packages one import profile pays for and ``reference`` does not (an import that
    fails there costs a fraction of a millisecond), costliest first, each by its costliest
    module's cumulative time (``matplotlib.pyplot`` for matplotlib; nested ones overlap)."""

    def by_package(profile: list[tuple[str, float, int]]) -> dict[str, float]:
        cost: dict[str, float] = {}
        for name, seconds, _ in profile:
            package = name.split(".")[0]
            if not package.startswith("_"):
                cost[package] = max(cost.get(package, 0.0), seconds)
        return cost

    here, there = by_package(rows), by_package(reference)
    extra = {k: v for k, v in here.items() if v > 0.01 and there.get(k, 0.0) < 0.01}
    ranked = sorted(extra.items(), key=lambda kv: -kv[1])
    return [[k, round(v, 3)] for k, v in ranked[:PROFILE_TOP]]
