"""make bench: the pipeline against the book's plain Keras script, side by side.

The baseline is the book's script run the way its readers run it: in an environment holding
only TensorFlow, Keras and NumPy at uv.lock's versions (``--baseline-python``; ``make bench``
builds it from bench/requirements-tf.txt), not in the project's ``.venv``.

Measures, each several times (median and spread): the baseline script, each stage alone
(download, preprocess, train with the same hyperparameters, evaluate), a full `dvc repro`
from an empty cache and empty outputs, a no-op `dvc repro`, ``import tensorflow`` in both
environments, ``make ui`` from start to its printed address (on the store the runs filled
and on a fresh one), and a 4-job sweep run sequentially and in parallel. For each: wall time, CPU
time and peak memory of the whole process tree, the ratio to the baseline, and the accuracy
reached; whether the full run's metrics are those committed in reports/metrics.json; and
each stage's ``-X importtime`` profile. Also measures the machine's float32 matrix-multiply
throughput and, from it, the shortest possible time for the training's arithmetic. The load
average is sampled throughout: other work on the machine inflates every figure.

    python bench/run.py --mirror /path/to/mnist --baseline-python bench/.venv-tf/bin/python
    python bench/run.py --ui-only       # just `make ui`'s start-up, printed (a minute)

Writes bench/results.md and bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/run.py`: the project copy is the tests' helper
from tests.helpers.workspace import copy_project  # noqa: E402

OUTPUTS = ["data", "models", "reports", "dvc.lock", ".dvc/cache", ".dvc/tmp"]

# Training arithmetic per sample per epoch for Dense(784->512) -> Dense(512->10):
# forward and weight gradients of both layers, plus the input gradient of the second.
FLOP_PER_SAMPLE = 2 * (784 * 512 + 512 * 10) * 2 + 2 * 512 * 10


@dataclass
class Sample:
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
    out = {}
    for field in Sample.__dataclass_fields__:
        values = [getattr(s, field) for s in samples]
        out[field] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["n"] = len(samples)
    return out


def clear_outputs(work: Path) -> None:
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


#: What the stages' environment imports that the TF-only one does not is reported by package;
#: these are the packages `import tensorflow` should not pay for (Keras imports them if found).
PROFILE_TOP = 6

#: The targets of issue 16: (key, figure, target, stretch, unit); "x" is a ratio to the
#: baseline's median, "s" seconds. Lower is better for all of them.
TARGETS = (
    ("cold_repro", "cold `dvc repro` (empty cache and outputs), wall", 1.8, 1.4, "x"),
    ("train", "train stage, wall", 1.0, 0.85, "x"),
    ("evaluate", "evaluate stage, wall", 0.45, 0.3, "x"),
    ("download_preprocess", "download + preprocess, wall", 4.0, 2.5, "s"),
    ("peak_memory", "peak memory, largest stage", 1.0, 0.8, "x"),
    ("import_tensorflow", "`import tensorflow`, stages' env / TF-only env", 1.1, 1.0, "x"),
    ("noop_repro", "no-op `dvc repro`", 1.5, None, "s"),
    ("ui_start", "`make ui`: start to its printed address, store with runs", 10.0, None, "s"),
)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mirror",
        default=os.environ.get("MNIST_MIRROR"),
        help="folder or URL with the four MNIST files (default: $MNIST_MIRROR)",
    )
    parser.add_argument(
        "--baseline-python",
        type=Path,
        default=ROOT / "bench/.venv-tf/bin/python",
        help="the TF-only environment's python (make bench builds bench/.venv-tf)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-sweep", action="store_true", help="skip the 4-job sweeps")
    parser.add_argument(
        "--ui-only", action="store_true", help="only time `make ui`'s start-up, print it"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args()
    # Absolute (the commands run in the copy), but not resolved: a venv's python is a link to
    # the base interpreter, and resolving it would leave the venv.
    args.baseline_python = Path(os.path.abspath(args.baseline_python))
    if args.ui_only:  # on the project's own store, as a user starts it
        with LoadSampler() as load, tempfile.TemporaryDirectory() as tmp_ui:
            starts = ui_starts(ROOT, dict(os.environ), Path(tmp_ui) / "mlflow.db", args.repeat)
        print(json.dumps({"ui_start_s": starts, "load_average": load.summary()}, indent=2))
        return
    if not args.baseline_python.exists():
        raise SystemExit(
            f"error: no baseline environment at {args.baseline_python}; run `make bench`, "
            "which builds it from bench/requirements-tf.txt"
        )

    tmp = Path(tempfile.mkdtemp(prefix="mnist-bench-"))
    log = args.out / "bench.log"
    log.write_text("")
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    if args.mirror:
        env["MNIST_MIRROR"] = args.mirror
    # The baseline sees nothing of the project's environment.
    base_env = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    base_env["PATH"] = os.environ["PATH"].replace(f"{Path(sys.executable).parent}{os.pathsep}", "")
    work = copy_project(tmp / "project", env)
    results: dict = {"machine": machine(), "repeat": args.repeat}
    stage = [sys.executable, "-m"]
    params = ["--config-dir", ".", "--config-name", "params"]
    stage_env = {**env, "PYTHONPATH": "src"}  # as dvc.yaml runs them

    with LoadSampler() as load:
        print("full dvc repro from empty cache and outputs ...", flush=True)
        full, full_metrics = [], []
        for _ in range(args.repeat):
            clear_outputs(work)
            full.append(measure(["dvc", "repro"], work, env, log))
            full_metrics.append(
                {name: (work / "reports" / name).read_bytes() for name in REFERENCE_REPORTS}
            )
        metrics = json.loads(full_metrics[-1]["metrics.json"])
        reference = {name: (ROOT / "reports" / name).read_bytes() for name in REFERENCE_REPORTS}
        identical = all(m == reference for m in full_metrics)

        print("no-op dvc repro ...", flush=True)
        noop = [measure(["dvc", "repro"], work, env, log) for _ in range(args.repeat)]

        print("make ui: start to its printed address ...", flush=True)
        ui = ui_starts(work, env, tmp / "fresh-ui.db", args.repeat)

        print("baseline script and each stage alone, interleaved ...", flush=True)
        # The book's script is unseeded (a new random start each run); the train stage is
        # seeded. For a fair accuracy comparison its repetitions use seeds 42, 43, ...
        baseline, baseline_runs, train_fit, train_acc = [], [], [], []
        stages: dict[str, list[Sample]] = {s: [] for s in STAGES}
        for i in range(args.repeat):
            baseline.append(
                measure(
                    [str(args.baseline_python), str(ROOT / "bench/baseline.py"), "data/raw"],
                    work,
                    base_env,
                    log,
                )
            )
            lines = [ln for ln in log.read_text().splitlines() if ln.startswith('{"fit_seconds"')]
            baseline_runs.append(json.loads(lines[-1]))
            shutil.rmtree(work / "data/raw")  # as dvc repro does: a stage's outputs go first
            for name in STAGES:
                seed = [f"seed={42 + i}"] if name == "train" else []
                cmd = [*stage, f"mnist_pipeline.{name}", *params, *seed]
                stages[name].append(measure(cmd, work, stage_env, log))
            train_fit.append(json.loads((work / "models/run.json").read_text())["fit_seconds"])
            train_acc.append(
                json.loads((work / "reports/metrics.json").read_text())["test_accuracy"]
            )

        print("import tensorflow in both environments ...", flush=True)
        imports = {
            "tensorflow (TF-only env)": [
                measure([str(args.baseline_python), "-c", "import tensorflow"], work, base_env, log)
                for _ in range(args.repeat)
            ],
            "tensorflow": [
                measure([sys.executable, "-c", "import tensorflow"], work, env, log)
                for _ in range(args.repeat)
            ],
        }
        for lib in ("numpy", "hydra", "mlflow"):
            imports[lib] = [measure([sys.executable, "-c", f"import {lib}"], work, env, log)]

        sequential, parallel = [], []
        if not args.no_sweep:
            print("4-job sweep, sequential and parallel ...", flush=True)
            # The book's network at four widths, trained as the book trains it (5 epochs).
            sweep = [*stage, "mnist_pipeline.pipeline", "-m", "model.units=64,128,256,512"]
            sequential = [measure(sweep, work, env, log) for _ in range(args.repeat)]
            parallel = [
                measure(
                    [*sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], work, env, log
                )
                for _ in range(args.repeat)
            ]

        print("profile: each stage's imports (-X importtime) ...", flush=True)
        shutil.rmtree(work / "data/raw")
        profiles = {
            name: top_imports(
                import_profile([*stage, f"mnist_pipeline.{name}", *params], work, stage_env)
            )
            for name in STAGES
        }
        tf_here = import_profile([sys.executable, "-c", "import tensorflow"], work, env)
        tf_only = import_profile(
            [str(args.baseline_python), "-c", "import tensorflow"], work, base_env
        )
        profiles["import tensorflow"] = top_imports(tf_here, 1)
        profiles["import tensorflow (TF-only env)"] = top_imports(tf_only, 1)
        tf_extra = extra_packages(tf_here, tf_only)

        print("matrix-multiply throughput ...", flush=True)
        throughput = matmul_throughput(env)

    base = summary(baseline)
    fit_base = statistics.median(r["fit_seconds"] for r in baseline_runs)
    fit_train = statistics.median(train_fit)
    base_acc = statistics.median(r["test_accuracy"] for r in baseline_runs)
    train_test_accuracy = statistics.median(train_acc)
    min_fit = 60000 * 5 * FLOP_PER_SAMPLE / (throughput["square_2048"] * 1e9)
    stage_summaries = {name: summary(samples) for name, samples in stages.items()}
    import_summaries = {name: summary(samples) for name, samples in imports.items()}
    results.update(
        load_average=load.summary(),
        baseline={
            **base,
            "python": str(args.baseline_python.relative_to(ROOT))
            if args.baseline_python.is_relative_to(ROOT)
            else str(args.baseline_python),
            "fit_s": fit_base,
            "test_accuracy": base_acc,
            "test_accuracy_all": [r["test_accuracy"] for r in baseline_runs],
            "fit_s_all": [r["fit_seconds"] for r in baseline_runs],
        },
        stages={
            **stage_summaries,
            "download_preprocess_s_all": [
                a.wall_s + b.wall_s
                for a, b in zip(stages["download"], stages["preprocess"], strict=True)
            ],
        },
        train_stage={
            **stage_summaries["train"],
            "fit_s": fit_train,
            "fit_s_all": train_fit,
            "test_accuracy": train_test_accuracy,
            "test_accuracy_all": train_acc,
        },
        full_repro={
            **summary(full),
            "test_accuracy": metrics["test_accuracy"],
            "metrics": metrics,
            "reports_identical_to_committed": identical,
        },
        noop_repro=summary(noop),
        ui_start_s=ui,
        imports=import_summaries,
        profile={**profiles, "import tensorflow, packages the TF-only env lacks": tf_extra},
        matmul_gflops=throughput,
        min_fit_s=min_fit,
    )
    if sequential:
        results.update(sweep_sequential=summary(sequential), sweep_parallel=summary(parallel))
    results["figures"] = figures(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(render(results))
    print(render(results))
    shutil.rmtree(tmp, ignore_errors=True)


STAGES = ("download", "preprocess", "train", "evaluate")
#: The full run's reports that must come out byte-identical to the committed ones (same
#: seed, same machine): the headline metrics and the per-class accuracies.
REFERENCE_REPORTS = ("metrics.json", "per_class.json")


def figures(r: dict) -> dict:
    """Each target's measured value (ratio or seconds), its limits and whether it is met."""
    med = lambda d: d["wall_s"]["median"]  # noqa: E731
    base_wall = med(r["baseline"])
    base_mem = r["baseline"]["peak_process_mb"]["median"]
    stages = r["stages"]
    largest = max(STAGES, key=lambda s: stages[s]["peak_process_mb"]["median"])
    values = {
        "cold_repro": med(r["full_repro"]) / base_wall,
        "train": med(stages["train"]) / base_wall,
        "evaluate": med(stages["evaluate"]) / base_wall,
        "download_preprocess": statistics.median(stages["download_preprocess_s_all"]),
        "peak_memory": stages[largest]["peak_process_mb"]["median"] / base_mem,
        "import_tensorflow": med(r["imports"]["tensorflow"])
        / med(r["imports"]["tensorflow (TF-only env)"]),
        "noop_repro": med(r["noop_repro"]),
        "ui_start": r["ui_start_s"]["store with runs"]["median"],
    }
    out = {}
    for key, label, target, stretch, unit in TARGETS:
        v = values[key]
        out[key] = {
            "figure": label,
            "value": round(v, 3),
            "unit": unit,
            "target": target,
            "stretch": stretch,
            "met": v <= target,
            "stretch_met": None if stretch is None else v <= stretch,
        }
    out["peak_memory"]["stage"] = largest
    out["metrics_identical"] = {
        "figure": "metrics bit-identical to the committed reports (seed 42)",
        "met": r["full_repro"]["reports_identical_to_committed"],
    }
    earlier = {
        "train fit <= 0.85 x baseline fit": r["train_stage"]["fit_s"]
        <= 0.85 * r["baseline"]["fit_s"],
        "test accuracy within 0.2 points of baseline": abs(
            r["train_stage"]["test_accuracy"] - r["baseline"]["test_accuracy"]
        )
        <= 0.002,
    }
    if "sweep_parallel" in r:
        earlier["parallel sweep faster than sequential"] = med(r["sweep_parallel"]) < med(
            r["sweep_sequential"]
        )
    out["earlier"] = earlier
    return out


def render(r: dict) -> str:
    base_wall = r["baseline"]["wall_s"]["median"]
    base_cpu = r["baseline"]["cpu_s"]["median"]
    base_mem = r["baseline"]["peak_process_mb"]["median"]

    def cell(d: dict, key: str, fmt: str = "{:.1f}") -> str:
        m = d[key]
        return f"{fmt.format(m['median'])} ({fmt.format(m['min'])}-{fmt.format(m['max'])})"

    stages = r["stages"]
    rows = [
        ("baseline script (book), TF-only env", r["baseline"], r["baseline"]["test_accuracy"]),
        ("full `dvc repro`, empty cache", r["full_repro"], r["full_repro"]["test_accuracy"]),
        ("no-op `dvc repro`", r["noop_repro"], None),
        ("download stage", stages["download"], None),
        ("preprocess stage", stages["preprocess"], None),
        ("train stage", r["train_stage"], None),
        ("evaluate stage", stages["evaluate"], r["train_stage"]["test_accuracy"]),
        ("`import tensorflow`, TF-only env", r["imports"]["tensorflow (TF-only env)"], None),
        ("`import tensorflow`, stages' env", r["imports"]["tensorflow"], None),
    ]
    if "sweep_sequential" in r:
        rows += [
            ("4-job sweep, sequential", r["sweep_sequential"], None),
            ("4-job sweep, 2 parallel jobs", r["sweep_parallel"], None),
        ]
    m, load = r["machine"], r["load_average"]
    f = r["figures"]

    def value(fig: dict) -> str:
        return f"{fig['value']:.2f}x" if fig["unit"] == "x" else f"{fig['value']:.1f} s"

    def limit(v: float | None, unit: str) -> str:
        return "" if v is None else (f"<= {v}x" if unit == "x" else f"<= {v} s")

    def verdict(fig: dict) -> str:
        if fig["met"]:
            return "met" + (", stretch too" if fig.get("stretch_met") else "")
        over = fig["value"] / fig["target"]
        return f"missed ({over:.2f} x the target)"

    lines = [
        "# Benchmark: the pipeline against the book's script",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}; "
        f"Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}, "
        f"DVC {m['dvc']}, MLflow {m['mlflow']}. Each row: median (min-max) of {r['repeat']} runs.",
        "",
        f"Load average (1 min) during the run: {load['start']:.2f} at the start, median "
        f"{load['median']:.2f}, max {load['max']:.2f}, {load['end']:.2f} at the end, on "
        f"{load['cores']} cores shared with other work: above {load['cores']} means the "
        "benchmark waited for the CPU and every figure is inflated (ratios less so: baseline "
        "and stages run interleaved).",
        "",
        "The baseline is the book's script (`bench/baseline.py`) in an environment holding only "
        f"TensorFlow, Keras and NumPy at uv.lock's versions (`{r['baseline']['python']}`, "
        "built by `make bench` from `bench/requirements-tf.txt`).",
        "",
        "## Targets",
        "",
        "| figure | measured | target | stretch | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, *_ in TARGETS:
        fig = f[key]
        label = fig["figure"] + (f" ({fig['stage']})" if key == "peak_memory" else "")
        lines.append(
            f"| {label} | {value(fig)} | {limit(fig['target'], fig['unit'])} "
            f"| {limit(fig['stretch'], fig['unit'])} | {verdict(fig)} |"
        )
    same = f["metrics_identical"]["met"]
    lines += [
        f"| {f['metrics_identical']['figure']} | {'yes' if same else 'no'} | identical | "
        f"| {'met' if same else 'missed'} |",
        f"| `make ui` on a fresh store (it creates the tables first) "
        f"| {r['ui_start_s']['fresh store']['median']:.1f} s | | | no target |",
        "",
        "## Every measurement",
        "",
        "| what | wall s | x baseline | CPU s | x baseline | peak MB (largest process) "
        "| x baseline | peak MB (tree) | test accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, d, acc in rows:
        lines.append(
            f"| {name} | {cell(d, 'wall_s')} | {d['wall_s']['median'] / base_wall:.2f} "
            f"| {cell(d, 'cpu_s')} | {d['cpu_s']['median'] / base_cpu:.2f} "
            f"| {cell(d, 'peak_process_mb', '{:.0f}')} "
            f"| {d['peak_process_mb']['median'] / base_mem:.2f} "
            f"| {cell(d, 'peak_tree_mb', '{:.0f}')} | {'' if acc is None else f'{acc:.4f}'} |"
        )
    fit_b, fit_t = r["baseline"]["fit_s"], r["train_stage"]["fit_s"]
    g = r["matmul_gflops"]
    prof = r["profile"]
    lines += [
        "",
        "Download + preprocess, each repetition: "
        + ", ".join(f"{v:.1f} s" for v in stages["download_preprocess_s_all"])
        + ". Other imports in the stages' env (one run each): "
        + ", ".join(
            f"{k} {v['wall_s']['median']:.1f} s"
            for k, v in r["imports"].items()
            if not k.startswith("tensorflow")
        )
        + ".",
        "",
        f"`fit` alone: baseline {fit_b:.2f} s, train stage {fit_t:.2f} s "
        f"(x{fit_t / fit_b:.2f}); all runs: baseline "
        f"{[round(v, 2) for v in r['baseline']['fit_s_all']]}, train stage "
        f"{[round(v, 2) for v in r['train_stage']['fit_s_all']]}.",
        "",
        "Test accuracy: the book's script is unseeded, so each run starts from another random "
        "init; the train stage's runs use seeds 42, 43, 44. Baseline runs: "
        f"{[round(v, 4) for v in r['baseline']['test_accuracy_all']]}; train stage runs: "
        f"{[round(v, 4) for v in r['train_stage']['test_accuracy_all']]}; the table shows "
        "medians. The full `dvc repro` uses the default seed, 42: "
        + ", ".join(f"{k} {v}" for k, v in sorted(r["full_repro"]["metrics"].items()))
        + ".",
        "",
        f"Machine limit: float32 matmul {g['square_2048']:.0f} GFLOP/s (2048x2048), "
        f"{g['batch_128x784x512']:.0f} GFLOP/s at the training's shape (128x784 by 784x512). "
        f"5 epochs x 60,000 samples x {FLOP_PER_SAMPLE / 1e6:.2f} MFLOP = "
        f"{60000 * 5 * FLOP_PER_SAMPLE / 1e9:.0f} GFLOP, so `fit` cannot take less than "
        f"{r['min_fit_s']:.2f} s here; the train stage's `fit` is "
        f"{fit_t / r['min_fit_s']:.1f}x that.",
        "",
        "## Profile: what each process imports (`python -X importtime`, one run each)",
        "",
        "Total time in top-level imports (a stage's lazy imports included) and the costliest "
        "of them, cumulative seconds (under load, so larger than on an idle machine):",
        "",
        "| process | imports total s | costliest top-level imports (s) |",
        "| --- | --- | --- |",
    ]
    for name, p in prof.items():
        if isinstance(p, dict):
            top = ", ".join(f"{k} {v:.2f}" for k, v in p["top"])
            lines.append(f"| {name} | {p['total_s']:.2f} | {top} |")
    extra = prof["import tensorflow, packages the TF-only env lacks"]
    lines += [
        "",
        "`import tensorflow` in the stages' env loads these packages the TF-only env does not "
        "have (cumulative s, nested ones overlap): "
        + (", ".join(f"{k} {v:.2f}" for k, v in extra) or "none")
        + ".",
        "",
        "Earlier targets (issues before 16):",
        "",
        "| target | met |",
        "| --- | --- |",
        *(f"| {k} | {'yes' if v else 'no'} |" for k, v in f["earlier"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
