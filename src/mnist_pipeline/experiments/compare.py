"""Compare runs: a table of the params that differ and the train/test gap, and a picture.

    python -m mnist_pipeline.compare                      # the experiment's runs, best first
    python -m mnist_pipeline.compare --sweep              # the latest sweep or Optuna study
    python -m mnist_pipeline.compare --sweep 20261129-041200-ab12cd
    python -m mnist_pipeline.compare --experiment mnist --filter "params.model.units = '512'"
    python -m mnist_pipeline.compare --sort accuracy_gap --markdown t.md --csv t.csv --plot g.png

Reads the configured MLflow store (``MLFLOW_TRACKING_URI`` or the project's own).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from mnist_pipeline import tracking
from mnist_pipeline.core import atomic, figures, log_filter
from mnist_pipeline.core.errors import PipelineError, exit_on_error
from mnist_pipeline.experiments import sweep_tracking

#: The table's metric columns, in reading order: ``artifacts.HEADLINE_METRICS`` but
#: ``train_loss`` (the table stays within a terminal's width).
HEADLINE = ["fit_accuracy", "train_accuracy", "test_accuracy", "accuracy_gap", "test_loss"]
#: Shown when the runs have them: an Optuna study's validation accuracy and objective.
SEARCH_METRICS = ["val_accuracy", "objective"]


def select_runs(
    sweep_id: str | None = None, experiment: str | None = None, filter_string: str = ""
) -> list[Any]:
    """Finished training runs (one per pipeline run: a `dvc repro`, a `dvc exp run`, a sweep
    job) matching an MLflow filter string: of one sweep (``latest``: the latest), else of an
    experiment (by default the project's, ``tracking.experiment_name``)."""
    mlflow = tracking.configured_mlflow()
    kwargs: dict[str, Any] = {"search_all_experiments": True}
    if sweep_id is not None:
        if sweep_id == "latest":
            sweep_id = sweep_tracking.latest_sweep_id()
        filter_string = " and ".join(
            filter(None, [filter_string, sweep_tracking.jobs_filter(sweep_id)])
        )
    else:
        experiment = experiment or default_experiment()
        kwargs = {"experiment_names": [experiment]}
    clauses = ["tags.stage = 'train'", "attributes.status = 'FINISHED'", filter_string]
    try:
        runs = mlflow.search_runs(
            filter_string=" and ".join(c for c in clauses if c), output_format="list", **kwargs
        )
    except mlflow.exceptions.MlflowException as exc:
        raise PipelineError(f"bad selection: {exc.message}") from None
    if not runs:
        where = " in ".join(
            filter(None, [filter_string, experiment and f"experiment {experiment}"])
        )
        raise PipelineError(f"no finished training runs match: {where}")
    return runs


def default_experiment() -> str:
    """The experiment the pipeline logs to, as conf/ says (``tracking.experiment_name``)."""
    from mnist_pipeline.core.params import pipeline_config

    return pipeline_config().tracking.experiment_name


def varying_params(runs: list[Any]) -> list[str]:
    """The params whose values differ among ``runs`` (the ones a comparison is about).
    Output locations (``paths.*``) differ between sweep jobs by design and are left out."""
    frame = pd.DataFrame([r.data.params for r in runs])
    return sorted(
        c
        for c in frame.columns
        if not c.startswith("paths.") and frame[c].nunique(dropna=False) > 1
    )


def ranking(runs: list[Any]) -> tuple[str, bool]:
    """How a sweep's jobs are ranked, best first: the metric and whether lower is better.
    An Optuna study's trials by its objective, in its direction; jobs that held out a
    validation split by ``val_accuracy``; only a sweep without either by ``test_accuracy``.
    A job without the metric (a failed trial, a job with no split) ranks after the others,
    so one such job never turns a search into a choice made on the test set."""
    if any("objective" in r.data.metrics or "optuna_study" in r.data.tags for r in runs):
        return "objective", {r.data.tags.get("optuna_direction") for r in runs} == {"minimize"}
    if any("val_accuracy" in r.data.metrics for r in runs):
        return "val_accuracy", False
    return "test_accuracy", False


def runs_table(runs: list[Any], sort: str | None = None, ascending: bool = False) -> pd.DataFrame:
    """One row per run: name, the varying params, headline metrics and duration. Sorted by
    ``sort``; by default the best first (``ranking``)."""
    params = varying_params(runs)
    metrics = HEADLINE + [m for m in SEARCH_METRICS if any(m in r.data.metrics for r in runs)]
    if sort is None:
        sort, ascending = ranking(runs)
        if sort not in metrics:  # a study none of whose trials got a value
            metrics.append(sort)
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.info.run_name}
        row.update({p: _number(run.data.params.get(p)) for p in params})
        row.update({m: run.data.metrics.get(m) for m in metrics})
        end = run.info.end_time or run.info.start_time
        row["duration_s"] = round((end - run.info.start_time) / 1000, 1)
        row["run_id"] = run.info.run_id
        rows.append(row)
    table = pd.DataFrame(rows)
    if sort not in table.columns:
        raise PipelineError(f"cannot sort by {sort!r}; columns: {', '.join(table.columns)}")
    return table.sort_values(sort, ascending=ascending, kind="stable").reset_index(drop=True)


def _number(value: str | None) -> Any:
    """MLflow stores params as text; show numbers as numbers so they sort and plot."""
    if value is None:
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _float_format(column: pd.Series) -> str:
    """Four decimals, or scientific notation for a column of tiny values (an L2 factor of
    1e-6 would show as 0.0000)."""
    values = pd.to_numeric(column, errors="coerce").abs()
    tiny = values[(values > 0) & values.notna()]
    return ".2e" if len(tiny) and tiny.max() < 1e-2 else ".4f"


def _formatter(spec: str) -> Any:
    return lambda value: format(value, spec)


def to_text(table: pd.DataFrame) -> str:
    table = table.drop(columns="run_id")
    formatters = {
        c: _formatter(_float_format(table[c]))
        for c in table.columns
        if pd.api.types.is_float_dtype(table[c])
    }
    return table.to_string(index=False, formatters=formatters)


def to_markdown(table: pd.DataFrame) -> str:
    table = table.drop(columns="run_id")
    formats = [_float_format(table[c]) for c in table.columns]
    return table.to_markdown(index=False, floatfmt=formats)


def plot(table: pd.DataFrame, runs: list[Any], path: Path) -> None:
    """The gap picture (PNG): ``gap_spec`` drawn by vl-convert."""
    figures.save_png(gap_spec(table, runs), path)


def gap_spec(table: pd.DataFrame, runs: list[Any]) -> dict[str, Any]:
    """A Vega-Lite spec. Left: train and test accuracy per run, as bars named by the params
    that differ, or as lines against the one param that does when it is a number. Right:
    the per-epoch training accuracy of every run, overlaid."""
    shown = {"run", "run_id", "duration_s", *HEADLINE, *SEARCH_METRICS}
    params = [c for c in table.columns if c not in shown]
    by_id = {r.info.run_id: r for r in runs}
    names = [
        _label(row, params) or by_id[row["run_id"]].info.run_name for _, row in table.iterrows()
    ]
    metrics = ("train_accuracy", "test_accuracy")
    size = {"width": 480, "height": 340}  # each half
    accuracy = {"field": "accuracy", "type": "quantitative", "scale": {"zero": False}}
    colour = {"field": "metric", "type": "nominal", "sort": list(metrics)}
    if len(params) == 1 and pd.api.types.is_numeric_dtype(table[params[0]]):
        points = [
            {"x": float(row[params[0]]), "metric": m, "accuracy": float(row[m])}
            for _, row in table.sort_values(params[0]).iterrows()
            for m in metrics
        ]
        x = {"field": "x", "type": "quantitative", "title": params[0], "scale": {"zero": False}}
        if pd.api.types.is_integer_dtype(table[params[0]]):
            x["axis"] = {"tickMinStep": 1, "format": "d"}
        encoding = {"x": x, "y": accuracy, "color": colour}
        mark: Any = {"type": "line", "point": True}
    else:
        points = [
            {"x": name, "metric": m, "accuracy": float(row[m])}
            for name, (_, row) in zip(names, table.iterrows(), strict=True)
            for m in metrics
        ]
        x = {"field": "x", "type": "nominal", "title": None, "sort": names}
        x["axis"] = {"labelAngle": -30, "labelLimit": 200}
        mark = {"type": "bar", "clip": True}
        low = min(table["test_accuracy"].min(), table["train_accuracy"].min())
        bars = {**accuracy, "scale": {"domain": [max(0.0, low - 0.02), 1.0]}}
        offset = {"field": "metric", "sort": list(metrics)}  # the two bars side by side
        encoding = {"x": x, "y": bars, "color": colour, "xOffset": offset}
    title = "Train vs test accuracy (the gap)"
    left = {"title": title, "data": {"values": points}, "mark": mark, "encoding": encoding, **size}
    right = _curves_spec(names, list(table["run_id"]), accuracy) | size
    return {"hconcat": [left, right], "resolve": {"scale": {"color": "independent"}}}


def _curves_spec(names: list[str], run_ids: list[str], accuracy: dict[str, Any]) -> dict:
    """Every run's per-epoch training accuracy (MLflow's metric history), one line each."""
    client = tracking.client()
    curves = [
        {"run": name, "epoch": m.step, "accuracy": m.value}
        for name, run_id in zip(names, run_ids, strict=True)
        for m in sorted(client.get_metric_history(run_id, "accuracy"), key=lambda m: m.step)
    ]
    epoch = {"field": "epoch", "type": "quantitative", "axis": {"tickMinStep": 1, "format": "d"}}
    return {
        "title": "Learning curves",
        "data": {"values": curves},
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": epoch,
            "y": {**accuracy, "title": "training accuracy (running average)"},
            "color": {"field": "run", "type": "nominal", "sort": names},
        },
    }


def _label(row: pd.Series, params: list[str]) -> str:
    return ", ".join(f"{p.split('.')[-1]}={row[p]}" for p in params)


def write_outputs(
    table: pd.DataFrame,
    runs: list[Any],
    markdown: Path | None = None,
    csv: Path | None = None,
    png: Path | None = None,
) -> list[Path]:
    """Write whichever of the Markdown table, CSV table and picture are asked for."""
    if markdown:
        atomic.write_bytes(markdown, (to_markdown(table) + "\n").encode())
    if csv:
        atomic.write_bytes(csv, table.to_csv(index=False).encode())
    if png:
        plot(table, runs, png)
    return [p for p in (markdown, csv, png) if p]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_pipeline.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sweep",
        "--sweep-id",
        dest="sweep_id",
        metavar="ID",
        nargs="?",
        const="latest",
        help="the jobs of this sweep; without an ID, of the latest sweep or Optuna study",
    )
    parser.add_argument(
        "--experiment", help="runs of this MLflow experiment (default: the pipeline's)"
    )
    parser.add_argument("--filter", default="", help="an MLflow filter string")
    parser.add_argument(
        "--sort",
        help="column to sort by (default: a study's objective, else val_accuracy, "
        "else test_accuracy)",
    )
    parser.add_argument("--ascending", action="store_true")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument("--csv", type=Path, help="write the table as CSV here")
    parser.add_argument("--plot", type=Path, help="write the gap picture (PNG) here")
    args = parser.parse_args(argv)
    log_filter.quiet_command()
    with exit_on_error(expected=(PipelineError, OSError), store=tracking.store_label):
        tracking.require_existing_store()
        runs = select_runs(args.sweep_id, args.experiment, args.filter)
        table = runs_table(runs, args.sort, args.ascending)
        print(to_text(table))
        write_outputs(table, runs, args.markdown, args.csv, args.plot)
    return 0
