"""The report of `make bench`: ``figures`` (each target's value and verdict) and ``render``
(bench/results.md), both from the results dictionary bench/run.py assembles; nothing here
runs or times anything.

``render`` joins one function per section: the header (machine, load, baseline), the targets
table, the table of every measurement, the notes under it, the import profiles, serving
(bench/serving.py) and the earlier targets. Each section's lines end with a blank one.
"""

from __future__ import annotations

import statistics

from bench import serving
from bench.measure import FLOP_PER_SAMPLE, STAGES

#: The targets of issue 16: (key, figure, target, stretch, unit); "x" is a ratio to the
#: baseline's median, "s" seconds. Lower is better for all of them.
TARGETS = (
    ("cold_repro", "cold `dvc repro` (empty cache and outputs), wall", 1.8, 1.4, "x"),
    ("train", "train stage, wall", 1.0, 0.85, "x"),
    ("evaluate", "evaluate stage, wall", 0.45, 0.3, "x"),
    ("download_preprocess", "download + preprocess, wall", 4.0, 2.5, "s"),
    ("peak_memory", "peak memory, largest stage", 1.0, 0.8, "x"),
    ("import_tensorflow", "`import tensorflow`, stages' env / TF-only env", 1.1, 1.0, "x"),
    (
        "import_tensorflow_in_stage",
        "`import tensorflow` after `import mlflow`, as a stage pays it / TF-only env",
        1.1,
        1.0,
        "x",
    ),
    ("noop_repro", "no-op `dvc repro`", 1.5, None, "s"),
    ("ui_start", "`make ui`: start to its printed address, store with runs", 10.0, None, "s"),
)


def figures(r: dict) -> dict:
    """Each target's measured value (ratio or seconds), its limits and whether it is met."""
    med = lambda d: d["wall_s"]["median"]  # noqa: E731
    base_wall = med(r["baseline"])
    base_mem = r["baseline"]["peak_process_mb"]["median"]
    stages = r["stages"]
    largest = max(STAGES, key=lambda s: stages[s]["peak_process_mb"]["median"])
    values = {
        # Against the script run right after each repro (bench/run.py, time_repro).
        "cold_repro": med(r["full_repro"]) / med(r["full_repro"]["baseline_beside"]),
        "train": med(stages["train"]) / base_wall,
        "evaluate": med(stages["evaluate"]) / base_wall,
        "download_preprocess": statistics.median(stages["download_preprocess_s_all"]),
        "peak_memory": stages[largest]["peak_process_mb"]["median"] / base_mem,
        "import_tensorflow": med(r["imports"]["tensorflow"])
        / med(r["imports"]["tensorflow (TF-only env)"]),
        "import_tensorflow_in_stage": (
            med(r["imports"]["mlflow, tensorflow"]) - med(r["imports"]["mlflow"])
        )
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
    """bench/results.md: the sections below, in order."""
    return "\n".join(
        [
            *_header(r),
            *_targets(r),
            *_measurements(r),
            *_notes(r),
            *_profile(r),
            *([*serving.render(r["serving"]), ""] if "serving" in r else []),
            *_earlier(r),
        ]
    )


def _header(r: dict) -> list[str]:
    """The title, the machine, its load during the run and what the baseline is."""
    m, load = r["machine"], r["load_average"]
    return [
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
    ]


def _value(fig: dict) -> str:
    return f"{fig['value']:.2f}x" if fig["unit"] == "x" else f"{fig['value']:.1f} s"


def _limit(v: float | None, unit: str) -> str:
    return "" if v is None else (f"<= {v}x" if unit == "x" else f"<= {v} s")


def _verdict(fig: dict) -> str:
    if fig["met"]:
        return "met" + (", stretch too" if fig.get("stretch_met") else "")
    over = fig["value"] / fig["target"]
    return f"missed ({over:.2f} x the target)"


def _targets(r: dict) -> list[str]:
    """Issue 16's targets: measured, target, stretch and verdict; then the untargeted rows."""
    f = r["figures"]
    lines = [
        "## Targets",
        "",
        "| figure | measured | target | stretch | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, *_ in TARGETS:
        if key not in f:  # a figure added after this run was made
            continue
        fig = f[key]
        label = fig["figure"] + (f" ({fig['stage']})" if key == "peak_memory" else "")
        lines.append(
            f"| {label} | {_value(fig)} | {_limit(fig['target'], fig['unit'])} "
            f"| {_limit(fig['stretch'], fig['unit'])} | {_verdict(fig)} |"
        )
    same = f["metrics_identical"]["met"]
    return [
        *lines,
        f"| {f['metrics_identical']['figure']} | {'yes' if same else 'no'} | identical | "
        f"| {'met' if same else 'missed'} |",
        f"| `make ui` on a fresh store (it creates the tables first) "
        f"| {r['ui_start_s']['fresh store']['median']:.1f} s | | | no target |",
        "",
    ]


def _cell(d: dict, key: str, fmt: str = "{:.1f}") -> str:
    m = d[key]
    return f"{fmt.format(m['median'])} ({fmt.format(m['min'])}-{fmt.format(m['max'])})"


def _measurements(r: dict) -> list[str]:
    """Every measured command: median (min-max) and the ratio to the baseline's median."""
    stages = r["stages"]
    beside = r["full_repro"]["baseline_beside"]
    rows = [
        ("baseline script (book), TF-only env", r["baseline"], r["baseline"]["test_accuracy"]),
        ("baseline script, right after each full `dvc repro`", beside, None),
        (
            "full `dvc repro`, empty cache (x: the script run right after it)",
            r["full_repro"],
            r["full_repro"]["test_accuracy"],
        ),
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
    lines = [
        "## Every measurement",
        "",
        "| what | wall s | x baseline | CPU s | x baseline | peak MB (largest process) "
        "| x baseline | peak MB (tree) | test accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, d, acc in rows:
        base = beside if d is r["full_repro"] else r["baseline"]
        base_wall = base["wall_s"]["median"]
        base_cpu = base["cpu_s"]["median"]
        base_mem = base["peak_process_mb"]["median"]
        lines.append(
            f"| {name} | {_cell(d, 'wall_s')} | {d['wall_s']['median'] / base_wall:.2f} "
            f"| {_cell(d, 'cpu_s')} | {d['cpu_s']['median'] / base_cpu:.2f} "
            f"| {_cell(d, 'peak_process_mb', '{:.0f}')} "
            f"| {d['peak_process_mb']['median'] / base_mem:.2f} "
            f"| {_cell(d, 'peak_tree_mb', '{:.0f}')} | {'' if acc is None else f'{acc:.4f}'} |"
        )
    return [*lines, ""]


def _notes(r: dict) -> list[str]:
    """Under the table: each repetition's figures, `fit` alone, accuracy, the machine's limit."""
    fit_b, fit_t = r["baseline"]["fit_s"], r["train_stage"]["fit_s"]
    g = r["matmul_gflops"]
    return [
        "Cold `dvc repro`, then the book's script right after it, each pair: "
        + ", ".join(
            f"{a:.1f} s / {b:.1f} s ({a / b:.2f}x)" for a, b in r["full_repro"]["pairs_wall_s"]
        )
        + ".",
        "",
        "Download + preprocess, each repetition: "
        + ", ".join(f"{v:.1f} s" for v in r["stages"]["download_preprocess_s_all"])
        + ". Other imports in the stages' env (median wall): "
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
    ]


def _profile(r: dict) -> list[str]:
    """Each process's import time and costliest imports, and what `import tensorflow` loads in
    the stages' environment that the TF-only one lacks."""
    prof = r["profile"]
    lines = [
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
    return [
        *lines,
        "",
        "`import tensorflow` in the stages' env loads these packages the TF-only env does not "
        "have (cumulative s, nested ones overlap): "
        + (", ".join(f"{k} {v:.2f}" for k, v in extra) or "none")
        + ".",
        "",
    ]


def _earlier(r: dict) -> list[str]:
    """The targets of the issues before 16, met or not."""
    return [
        "Earlier targets (issues before 16):",
        "",
        "| target | met |",
        "| --- | --- |",
        *(f"| {k} | {'yes' if v else 'no'} |" for k, v in r["figures"]["earlier"].items()),
        "",
    ]
