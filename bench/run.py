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

    python -m bench.run --mirror /path/to/mnist --baseline-python bench/.venv-tf/bin/python
    python -m bench.run --ui-only       # just `make ui`'s start-up, printed (a minute)

Writes bench/results.md and bench/results.json.

bench/measure.py holds what measures (and the constants the modules share), bench/report.py
the figures and results.md; this module is the command line and the order of the phases.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import serving
from bench.measure import (
    FLOP_PER_SAMPLE,
    STAGES,
    LoadSampler,
    Sample,
    clear_outputs,
    extra_packages,
    import_profile,
    machine,
    matmul_throughput,
    measure,
    summary,
    top_imports,
    ui_starts,
)
from bench.report import figures, render
from tools.workspace import copy_project

ROOT = Path(__file__).resolve().parents[1]

#: The full run's reports that must come out byte-identical to the committed ones (same
#: seed, same machine): the headline metrics and the per-class accuracies.
REFERENCE_REPORTS = ("metrics.json", "per_class.json")

#: A stage's command, as dvc.yaml runs it: ``python -m mnist_pipeline.<stage>`` with params.
STAGE = (sys.executable, "-m")
PARAMS = ("--config-dir", ".", "--config-name", "params")


@dataclass
class Workspace:
    """The project's copy the commands run in, and the environments they run with."""

    tmp: Path  # the temporary folder holding the copy and the MLflow stores
    work: Path  # the project's copy
    log: Path  # every command's output, appended
    env: dict[str, str]  # the project's .venv first on PATH, a store of its own
    base_env: dict[str, str]  # the baseline's: nothing of the project's environment
    stage_env: dict[str, str]  # as dvc.yaml runs the stages
    baseline_python: Path


def parse_args() -> argparse.Namespace:
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
    parser.add_argument("--no-serving", action="store_true", help="skip the serving loads")
    parser.add_argument(
        "--soak",
        type=float,
        default=0,
        metavar="SECONDS",
        help="also run the project's server that long at 8 clients (issue 24: 600)",
    )
    parser.add_argument(
        "--serving-only",
        action="store_true",
        help="one cold dvc repro, then only the serving loads, printed",
    )
    parser.add_argument(
        "--ui-only", action="store_true", help="only time `make ui`'s start-up, print it"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args()
    # Absolute (the commands run in the copy), but not resolved: a venv's python is a link to
    # the base interpreter, and resolving it would leave the venv.
    args.baseline_python = Path(os.path.abspath(args.baseline_python))
    return args


def ui_only(repeat: int) -> None:
    """``--ui-only``: `make ui`'s start-up on the project's own store, as a user starts it."""
    with LoadSampler() as load, tempfile.TemporaryDirectory() as tmp_ui:
        starts = ui_starts(ROOT, dict(os.environ), Path(tmp_ui) / "mlflow.db", repeat)
    print(json.dumps({"ui_start_s": starts, "load_average": load.summary()}, indent=2))


def set_up(args: argparse.Namespace) -> Workspace:
    """The project copied into a temporary folder, an empty log, and the environments."""
    if not args.baseline_python.exists():
        raise SystemExit(
            f"error: no baseline environment at {args.baseline_python}; run `make bench`, "
            "which builds it from bench/requirements-tf.txt"
        )
    tmp = Path(tempfile.mkdtemp(prefix="mnist-bench-"))
    args.out.mkdir(parents=True, exist_ok=True)  # --out may name a folder not made yet
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
    return Workspace(
        tmp=tmp,
        work=work,
        log=log,
        env=env,
        base_env=base_env,
        stage_env={**env, "PYTHONPATH": "src"},  # as dvc.yaml runs them
        baseline_python=args.baseline_python,
    )


def baseline_cmd(ws: Workspace) -> list[str]:
    """The book's script on the raw files in the workspace (the download stage's output)."""
    return [str(ws.baseline_python), str(ROOT / "bench/baseline.py"), "data/raw"]


def time_repro(ws: Workspace, repeat: int) -> dict:
    """A full `dvc repro` from an empty cache and outputs (are its reports the committed
    ones?), then a no-op one: ``full_repro`` and ``noop_repro`` of the results."""
    print("full dvc repro from empty cache and outputs ...", flush=True)
    full, full_metrics, beside = [], [], []
    for _ in range(repeat):
        clear_outputs(ws.work)
        full.append(measure(["dvc", "repro"], ws.work, ws.env, ws.log))
        full_metrics.append(
            {name: (ws.work / "reports" / name).read_bytes() for name in REFERENCE_REPORTS}
        )
        # The book's script right after each repro, on the files it downloaded: the repro's
        # ratio is taken side by side, as the stages' are (interleaved with the script), not
        # against runs minutes later on a machine whose speed has drifted since.
        beside.append(measure(baseline_cmd(ws), ws.work, ws.base_env, ws.log))
    metrics = json.loads(full_metrics[-1]["metrics.json"])
    reference = {name: (ROOT / "reports" / name).read_bytes() for name in REFERENCE_REPORTS}
    identical = all(m == reference for m in full_metrics)

    print("no-op dvc repro ...", flush=True)
    noop = [measure(["dvc", "repro"], ws.work, ws.env, ws.log) for _ in range(repeat)]
    return {
        "full_repro": {
            **summary(full),
            "baseline_beside": summary(beside),
            "pairs_wall_s": [[f.wall_s, b.wall_s] for f, b in zip(full, beside, strict=True)],
            "test_accuracy": metrics["test_accuracy"],
            "metrics": metrics,
            "reports_identical_to_committed": identical,
        },
        "noop_repro": summary(noop),
    }


def time_ui(ws: Workspace, repeat: int) -> dict:
    """`make ui` from start to its printed address, on the runs' store and on a fresh one."""
    print("make ui: start to its printed address ...", flush=True)
    return ui_starts(ws.work, ws.env, ws.tmp / "fresh-ui.db", repeat)


@dataclass
class StageRuns:
    """The baseline script's and each stage's repetitions, as measured."""

    baseline: list[Sample]
    baseline_runs: list[dict]  # what the script printed: fit_seconds, test_accuracy
    stages: dict[str, list[Sample]]
    train_fit: list[float]  # the train stage's `fit` seconds (models/run.json)
    train_acc: list[float]  # its test accuracy (reports/metrics.json)


def time_baseline_and_stages(ws: Workspace, repeat: int) -> StageRuns:
    """The book's script, then each stage alone, ``repeat`` times, interleaved."""
    print("baseline script and each stage alone, interleaved ...", flush=True)
    # The book's script is unseeded (a new random start each run); the train stage is
    # seeded. For a fair accuracy comparison its repetitions use seeds 42, 43, ...
    runs = StageRuns([], [], {s: [] for s in STAGES}, [], [])
    for i in range(repeat):
        runs.baseline.append(measure(baseline_cmd(ws), ws.work, ws.base_env, ws.log))
        lines = [ln for ln in ws.log.read_text().splitlines() if ln.startswith('{"fit_seconds"')]
        runs.baseline_runs.append(json.loads(lines[-1]))
        shutil.rmtree(ws.work / "data/raw")  # as dvc repro does: a stage's outputs go first
        for name in STAGES:
            seed = [f"seed={42 + i}"] if name == "train" else []
            cmd = [*STAGE, f"mnist_pipeline.{name}", *PARAMS, *seed]
            runs.stages[name].append(measure(cmd, ws.work, ws.stage_env, ws.log))
        runs.train_fit.append(json.loads((ws.work / "models/run.json").read_text())["fit_seconds"])
        runs.train_acc.append(
            json.loads((ws.work / "reports/metrics.json").read_text())["test_accuracy"]
        )
    return runs


def time_imports(ws: Workspace, repeat: int) -> dict[str, list[Sample]]:
    """``import tensorflow`` in both environments; numpy, hydra and mlflow in the stages'."""
    print("import tensorflow in both environments ...", flush=True)
    imports = {
        "tensorflow (TF-only env)": [
            measure(
                [str(ws.baseline_python), "-c", "import tensorflow"], ws.work, ws.base_env, ws.log
            )
            for _ in range(repeat)
        ],
        "tensorflow": [
            measure([sys.executable, "-c", "import tensorflow"], ws.work, ws.env, ws.log)
            for _ in range(repeat)
        ],
    }
    for lib in ("numpy", "hydra"):
        imports[lib] = [measure([sys.executable, "-c", f"import {lib}"], ws.work, ws.env, ws.log)]
    # A stage imports MLflow too, which loads pandas itself: what TensorFlow adds there is
    # the difference of these two.
    for what, code in (
        ("mlflow", "import mlflow"),
        ("mlflow, tensorflow", "import mlflow, tensorflow"),
    ):
        imports[what] = [
            measure([sys.executable, "-c", code], ws.work, ws.env, ws.log) for _ in range(repeat)
        ]
    return imports


def time_sweeps(ws: Workspace, repeat: int) -> tuple[list[Sample], list[Sample]]:
    """The 4-job sweep run sequentially, then with 2 parallel jobs."""
    print("4-job sweep, sequential and parallel ...", flush=True)
    # The book's network at four widths, trained as the book trains it (5 epochs).
    sweep = [*STAGE, "mnist_pipeline.pipeline", "-m", "model.units=64,128,256,512"]
    sequential = [measure(sweep, ws.work, ws.env, ws.log) for _ in range(repeat)]
    parallel = [
        measure(
            [*sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], ws.work, ws.env, ws.log
        )
        for _ in range(repeat)
    ]
    return sequential, parallel


def profile_imports(ws: Workspace) -> dict:
    """Each stage's and ``import tensorflow``'s ``-X importtime`` profile, and the packages
    the stages' env loads with TensorFlow that the TF-only one does not: ``profile``."""
    print("profile: each stage's imports (-X importtime) ...", flush=True)
    shutil.rmtree(ws.work / "data/raw")
    profiles = {
        name: top_imports(
            import_profile([*STAGE, f"mnist_pipeline.{name}", *PARAMS], ws.work, ws.stage_env)
        )
        for name in STAGES
    }
    tf_here = import_profile([sys.executable, "-c", "import tensorflow"], ws.work, ws.env)
    tf_only = import_profile(
        [str(ws.baseline_python), "-c", "import tensorflow"], ws.work, ws.base_env
    )
    profiles["import tensorflow"] = top_imports(tf_here, 1)
    profiles["import tensorflow (TF-only env)"] = top_imports(tf_only, 1)
    tf_extra = extra_packages(tf_here, tf_only)
    return {**profiles, "import tensorflow, packages the TF-only env lacks": tf_extra}


def time_matmul(ws: Workspace) -> dict:
    """The machine's float32 matmul throughput, GFLOP/s: ``matmul_gflops``."""
    print("matrix-multiply throughput ...", flush=True)
    return matmul_throughput(ws.env)


def stage_sections(runs: StageRuns, baseline_python: Path) -> dict:
    """``baseline``, ``stages`` and ``train_stage`` of the results, from the runs."""
    base = summary(runs.baseline)
    stage_summaries = {name: summary(samples) for name, samples in runs.stages.items()}
    return {
        "baseline": {
            **base,
            "python": str(baseline_python.relative_to(ROOT))
            if baseline_python.is_relative_to(ROOT)
            else str(baseline_python),
            "fit_s": statistics.median(r["fit_seconds"] for r in runs.baseline_runs),
            "test_accuracy": statistics.median(r["test_accuracy"] for r in runs.baseline_runs),
            "test_accuracy_all": [r["test_accuracy"] for r in runs.baseline_runs],
            "fit_s_all": [r["fit_seconds"] for r in runs.baseline_runs],
        },
        "stages": {
            **stage_summaries,
            "download_preprocess_s_all": [
                a.wall_s + b.wall_s
                for a, b in zip(runs.stages["download"], runs.stages["preprocess"], strict=True)
            ],
        },
        "train_stage": {
            **stage_summaries["train"],
            "fit_s": statistics.median(runs.train_fit),
            "fit_s_all": runs.train_fit,
            "test_accuracy": statistics.median(runs.train_acc),
            "test_accuracy_all": runs.train_acc,
        },
    }


def assemble_results(
    results: dict,
    *,
    load_average: dict,
    runs: StageRuns,
    baseline_python: Path,
    repro: dict,
    ui: dict,
    imports: dict[str, list[Sample]],
    profile: dict,
    throughput: dict,
    sweeps: tuple[list[Sample], list[Sample]],
) -> None:
    """Fill ``results`` (machine and repeat already in it) in bench/results.json's order."""
    results.update(
        load_average=load_average,
        **stage_sections(runs, baseline_python),  # baseline, stages, train_stage
        **repro,  # full_repro, noop_repro
        ui_start_s=ui,
        imports={name: summary(samples) for name, samples in imports.items()},
        profile=profile,
        matmul_gflops=throughput,
        min_fit_s=60000 * 5 * FLOP_PER_SAMPLE / (throughput["square_2048"] * 1e9),
    )
    sequential, parallel = sweeps
    if sequential:
        results.update(sweep_sequential=summary(sequential), sweep_parallel=summary(parallel))
    results["figures"] = figures(results)


def write_results(results: dict, out: Path) -> None:
    """bench/results.json and bench/results.md; the report is printed too."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render(results))
    print(render(results))


def update_serving(measured: dict, out: Path) -> None:
    """``--serving-only``: the serving section of bench/results.json and results.md replaced
    (the rest kept, from its own run), with the machine it was measured on; printed too."""
    measured["machine"] = machine() | {"date": datetime.date.today().isoformat()}
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if "figures" in results:
        results["serving"] = measured
        write_results(results, out)
    else:  # no full run to add it to: printed only
        print("\n".join(serving.render(measured)))


def main() -> None:
    args = parse_args()
    if args.ui_only:
        ui_only(args.repeat)
        return
    ws = set_up(args)
    if args.serving_only:
        clear_outputs(ws.work)
        measure(["dvc", "repro"], ws.work, ws.env, ws.log)
        load_start = os.getloadavg()[0]
        measured = serving.measure_serving(ws.work, ws.env, ws.log, ws.tmp, args.soak)
        measured["load_average"] = [load_start, os.getloadavg()[0]]
        update_serving(measured, args.out)
        shutil.rmtree(ws.tmp, ignore_errors=True)
        return
    results: dict = {"machine": machine(), "repeat": args.repeat}
    with LoadSampler() as load:
        repro = time_repro(ws, args.repeat)
        if not args.no_serving:
            print("serving: make serve and mlflow models serve under ab ...", flush=True)
            results["serving"] = serving.measure_serving(ws.work, ws.env, ws.log, ws.tmp, args.soak)
        ui = time_ui(ws, args.repeat)
        runs = time_baseline_and_stages(ws, args.repeat)
        imports = time_imports(ws, args.repeat)
        sweeps = ([], []) if args.no_sweep else time_sweeps(ws, args.repeat)
        profile = profile_imports(ws)
        throughput = time_matmul(ws)
    assemble_results(
        results,
        load_average=load.summary(),
        runs=runs,
        baseline_python=args.baseline_python,
        repro=repro,
        ui=ui,
        imports=imports,
        profile=profile,
        throughput=throughput,
        sweeps=sweeps,
    )
    write_results(results, args.out)
    shutil.rmtree(ws.tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
