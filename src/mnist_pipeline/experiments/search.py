"""Hyperparameter search: what the project's Optuna sweeper needs to know about this project.

The sweeper (``src/hydra_plugins/mnist_optuna_sweeper.py``) is Hydra and Optuna mechanics:
it asks Optuna for trials, launches them and tells Optuna the results. This module holds the
project's side of a study: which number a job's metrics reduce to (the objective, never a
test-set metric), where the study is stored (beside the MLflow store), and what the study's
MLflow parent run gets (best trial, figures). The parent and child runs themselves
are the sweep machinery's (``mnist_pipeline.sweep_runs``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any

from mnist_pipeline import tracking
from mnist_pipeline.core import atomic, diagnosis, locks
from mnist_pipeline.core.errors import ConfigError
from mnist_pipeline.core.project import project_root
from mnist_pipeline.experiments import sweep_tracking
from mnist_pipeline.tracking import address

log = logging.getLogger(__name__)

#: Metrics measured on the test set: choosing hyperparameters by them would make the reported
#: test accuracy optimistic, so an objective may not use them.
TEST_METRICS = ("test_", "accuracy_gap", "per_class_accuracy")
#: What an objective may use: the training and validation metrics every job returns.
OBJECTIVE_METRICS = ("val_accuracy", "val_loss", "train_accuracy", "train_loss", "fit_accuracy")
#: Where a study's Optuna storage goes when ``hydra.sweeper.storage`` is not set.
STORAGE_ENV = "OPTUNA_STORAGE"
STORAGE_FILE = "optuna.db"
#: The Optuna study's link to its MLflow parent run, kept in the study (so a resumed study
#: adds its trials to the same parent).
PARENT_ATTR = "mlflow_parent_run_id"
SWEEP_ATTR = "mlflow_sweep_id"
OBJECTIVE_ATTR = "objective"
#: The numbers of the trials a call never finished (killed, Ctrl-C, a crash): FAIL in Optuna,
#: but not among the study's ``n_trials``, so the same command runs trials in their place.
INTERRUPTED_ATTR = "interrupted_trials"

_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.USub,
    ast.UAdd,
)


class MissingMetric(ConfigError):
    """A finished job did not return a metric the objective needs: every trial would fail."""


class Objective:
    """The number a trial is judged by: a job's metric (``val_accuracy``) or arithmetic over
    its metrics (``val_accuracy - 0.5 * (train_accuracy - val_accuracy)``).

    Only metric names, numbers, ``+ - * /`` and parentheses are accepted, so evaluating it
    runs nothing else; test-set metrics are refused."""

    def __init__(self, expression: str) -> None:
        self.expression = str(expression).strip()
        try:
            tree = ast.parse(self.expression, mode="eval")
        except SyntaxError:
            raise ConfigError(
                f"hydra.sweeper.objective={expression!r} is not an expression"
            ) from None
        for node in ast.walk(tree):
            if not isinstance(node, _NODES) or (
                isinstance(node, ast.Constant) and not isinstance(node.value, int | float)
            ):
                raise ConfigError(
                    f"hydra.sweeper.objective={expression!r}: only metric names, numbers, "
                    "+ - * / and parentheses are allowed"
                )
        self.names = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)})
        if not self.names:
            raise ConfigError(f"hydra.sweeper.objective={expression!r} names no metric")
        leaks = [n for n in self.names if n.startswith(TEST_METRICS)]
        if leaks:
            raise ConfigError(
                f"hydra.sweeper.objective={expression!r} uses test-set metrics "
                f"({', '.join(leaks)}): choosing hyperparameters by them makes the test "
                "accuracy optimistic; use validation metrics (val_accuracy, val_loss) with "
                "data.val_split > 0"
            )
        unknown = [n for n in self.names if n not in OBJECTIVE_METRICS]
        if unknown:
            raise ConfigError(
                f"hydra.sweeper.objective={expression!r}: unknown metric {', '.join(unknown)} "
                f"(metrics: {', '.join(OBJECTIVE_METRICS)})"
            )
        self._code = compile(tree, "<objective>", "eval")

    def __call__(self, metrics: dict[str, Any]) -> float:
        missing = [n for n in self.names if not isinstance(metrics.get(n), int | float)]
        if missing:
            hint = ""
            if any(n.startswith("val_") for n in missing):
                hint = " (validation metrics need data.val_split > 0)"
            raise MissingMetric(
                f"the objective {self.expression!r} needs {', '.join(missing)}, which the "
                f"job did not return{hint}; it returned: {', '.join(sorted(metrics))}"
            )
        try:
            value = eval(self._code, {"__builtins__": {}}, {n: metrics[n] for n in self.names})
        except ZeroDivisionError:
            return math.nan
        return float(value)

    def check_config(self, val_split: Any) -> None:
        """Fail before any trial when the objective needs a validation set there is none of."""
        needs_val = any(n.startswith("val_") for n in self.names)
        if needs_val and isinstance(val_split, int | float) and val_split <= 0:
            raise ConfigError(
                f"the objective {self.expression!r} is measured on a validation split, but "
                "data.val_split=0: set it (e.g. 0.1), as hparams_search=mnist_optuna does"
            )


def storage_url(storage: str | None) -> str:
    """The study's Optuna storage: as configured, else ``$OPTUNA_STORAGE``, else a SQLite
    file beside the MLflow store (``optuna.db`` next to ``mlflow.db``), else (a tracking
    server) one in the project folder."""
    url = storage or os.environ.get(STORAGE_ENV)
    if not url:
        database = address.sqlite_path(tracking.tracking_uri())
        folder = project_root() if database is None else database.parent
        url = address.sqlite_uri(folder / STORAGE_FILE)
    url = str(url)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        raise ConfigError(
            f"Optuna storage {url} is relative to the working directory; use an absolute "
            "path (sqlite:////abs/path/optuna.db)"
        )
    if "://" not in url:
        raise ConfigError(
            f"Optuna storage {url!r} is not a database URL (sqlite:////abs/path/optuna.db "
            "or postgresql+psycopg://user@host/db)"
        )
    return url


def storage_fault(exc: BaseException, storage: str) -> str | None:
    """One line for a fault of the study's own storage (a full disk, a locked or read-only
    database), naming it (``/abs/optuna.db``, not "the MLflow store" that
    ``exit_on_error`` would otherwise say); None when ``exc`` did not come from Optuna's
    storage. Told by where it was raised (Optuna's storage code, or its
    ``StorageInternalError`` wrapping SQLAlchemy's error), since both stores are SQLite
    databases failing in the same words."""
    link: BaseException | None = exc
    seen: set[int] = set()
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        frames = traceback.extract_tb(link.__traceback__)
        if type(link).__module__.startswith("optuna.") or any(
            f"{os.sep}optuna{os.sep}storages{os.sep}" in frame.filename for frame in frames
        ):
            database = address.sqlite_path(storage)
            label = str(database) if database else f"the Optuna storage {address.redact(storage)}"
            return diagnosis.describe(exc, store=label)
        link = link.__cause__ or link.__context__
    return None


def check_study(study: Any, direction: str, objective: Objective) -> None:
    """Refuse to resume a study towards another goal: its earlier trials' values would mean
    something else (Optuna itself ignores the direction of a study it loads)."""
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study {study.study_name!r} was created to {study.direction.name.lower()} its "
            f"objective, not {direction}: use another hydra.sweeper.study_name"
        )
    previous = study.user_attrs.get(OBJECTIVE_ATTR)
    if previous is None:
        study.set_user_attr(OBJECTIVE_ATTR, objective.expression)
    elif previous != objective.expression:
        raise ConfigError(
            f"study {study.study_name!r} optimises {previous!r}, not {objective.expression!r}: "
            "use another hydra.sweeper.study_name"
        )


def study_lock(storage: str, study_name: str | None) -> Path:
    key = hashlib.sha256(str(study_name).encode()).hexdigest()[:12]
    return tracking.store_lock(f"study-{key}", storage)


def claim_lock(storage: str, study_name: str | None) -> Any:
    """The lock held while a call opens a study, takes or joins its parent run, and before
    each of its asks (``study_calls``): two calls started together would otherwise both find
    no parent, or both ask the study's last trial."""
    path = study_lock(storage, study_name)
    return locks.exclusive(path, f"another call of Optuna study {study_name!r}")


def link_parent(study: Any, sweep_dir: str | Path) -> dict[str, str]:
    """Tie the study to one MLflow parent run: a new study keeps this sweep's parent; a
    resumed one takes back the parent of its first call (if it is still in the store), and a
    call joining a study another call is running adds its trials to that call's open parent
    (``study_calls``), so all the study's trials are children of one run."""
    info = sweep_tracking.read_sweep(sweep_dir)
    # Runs a crashed earlier call left RUNNING (its parent, its last trial) end KILLED first.
    tracking.close_dead_runs(tracking.ensure_experiment(info["experiment"]))
    previous = study.user_attrs.get(PARENT_ATTR)
    if previous and previous != info["parent_run_id"]:
        try:
            resumed = sweep_tracking.resume_parent(
                sweep_dir, previous, study.user_attrs[SWEEP_ATTR]
            )
        except ConfigError:  # its parent run is open: another call runs the study; join it
            joined = sweep_tracking.join_parent(sweep_dir, previous, study.user_attrs[SWEEP_ATTR])
            log.info("joining the call running study %s (parent %s)", study.study_name, previous)
            return mark_study(sweep_dir, joined, study.study_name)
        if resumed is not None:
            log.info("study %s resumed: MLflow parent run %s", study.study_name, previous)
            return mark_study(sweep_dir, resumed, study.study_name)
        log.warning("the study's MLflow parent run %s is gone; using a new one", previous)
    study.set_user_attr(PARENT_ATTR, info["parent_run_id"])
    study.set_user_attr(SWEEP_ATTR, info["sweep_id"])
    return mark_study(sweep_dir, info, study.study_name)


def mark_study(sweep_dir: str | Path, info: dict[str, str], study_name: str) -> dict[str, str]:
    """Record in the sweep's file that it runs a study (``sweep_tracking.sweep_failed`` then lets
    some trials fail without failing the whole sweep)."""
    info = {**info, "study": study_name}
    sweep_tracking.write_sweep(sweep_dir, info)
    return info


def interrupted(study: Any) -> list[int]:
    return list(study.user_attrs.get(INTERRUPTED_ATTR, []))


def mark_interrupted(study: Any, numbers: list[int]) -> None:
    """Tell Optuna the trials ``numbers`` failed and record that they were interrupted (not
    that their parameters failed): ``trials_done`` leaves them out."""
    import optuna

    for number in numbers:
        study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    if numbers:
        study.set_user_attr(INTERRUPTED_ATTR, sorted({*interrupted(study), *numbers}))


def trials_done(study: Any) -> int:
    """The trials that count towards ``n_trials``: all but the interrupted ones."""
    skipped = set(interrupted(study))
    return sum(t.number not in skipped for t in study.trials)


def record_trial(trial: Any, parent_run_id: str, value: float | None, metrics: dict) -> None:
    """Before the trial is told: put its number, state and objective on its MLflow run, and
    the run's id and its validation and test metrics on the Optuna trial (what the best
    trial's report shows)."""
    for key in ("val_accuracy", "test_accuracy", "accuracy_gap", "train_accuracy"):
        if isinstance(metrics.get(key), int | float):
            trial.set_user_attr(key, float(metrics[key]))
    run = sweep_tracking.job_run(parent_run_id, trial.number)
    if run is None:
        return
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    tags = {
        "trial_number": trial.number,
        "optuna_study": trial.study.study_name,
        "optuna_direction": trial.study.direction.name.lower(),
        "optuna_state": "COMPLETE" if value is not None else "FAIL",
    }
    tracking.set_run_tags(run.info.run_id, tags)
    if value is not None:
        tracking.log_metric_to(run.info.run_id, "objective", value)


def report_study(
    study: Any, info: dict[str, str], objective: Objective, storage: str, to_parent: bool = True
) -> dict:
    """The study's summary on its parent run: best trial (params as tags, value and its test
    metrics as metrics), Optuna's optimisation-history and importance figures, and
    ``optuna_best.json``. Returns the summary (also written by the sweeper to the sweep dir).
    Not ``to_parent``: another call of the study still runs, and the last call to end puts its
    summary, of every trial, on the parent (this one's could land after it)."""
    import optuna

    states = [t.state for t in study.trials]
    done = optuna.trial.TrialState
    summary: dict[str, Any] = {
        "study_name": study.study_name,
        "storage": address.redact(storage),
        "direction": study.direction.name.lower(),
        "objective": objective.expression,
        "n_trials": len(states),
        "n_complete": states.count(done.COMPLETE),
        "n_failed": states.count(done.FAIL),
    }
    parent = info["parent_run_id"]
    tags = {f"optuna_{k}": v for k, v in summary.items() if isinstance(v, str)}
    step = summary["n_trials"]
    metrics = {"n_trials_complete": summary["n_complete"], "n_trials_failed": summary["n_failed"]}
    if summary["n_complete"]:
        best = study.best_trial
        summary.update(
            best_trial=best.number,
            best_value=best.value,
            best_params=best.params,
            best_run_id=best.user_attrs.get("mlflow_run_id"),
            best_metrics={k: v for k, v in best.user_attrs.items() if isinstance(v, int | float)},
        )
        tags.update(best_trial=best.number, best_run_id=summary["best_run_id"] or "unknown")
        tags.update({f"best.{k}": v for k, v in best.params.items()})
        metrics["best_value"] = best.value
        metrics.update({f"best_{k}": v for k, v in summary["best_metrics"].items()})
    if not to_parent:
        return summary
    tracking.set_run_tags(parent, tags)
    for key, value in metrics.items():
        tracking.log_metric_to(parent, key, value, step=step)
    with tempfile.TemporaryDirectory() as tmp:
        best_file = Path(tmp) / "optuna_best.json"
        best_file.write_text(json.dumps(summary, indent=2, default=str))
        store = tracking.client()
        for path in [best_file, *write_figures(study, Path(tmp), objective.expression)]:
            store.log_artifact(parent, str(path))
    return summary


def write_figures(study: Any, folder: Path, target_name: str) -> list[Path]:
    """Optuna's own optimisation-history and parameter-importance figures, as HTML pages
    with plotly's script inside (``mlflow ui`` shows them in the run's artifacts, offline
    too; about 5 MB each). With no finished trial yet there is nothing to show: none is
    written, with a warning. Importances by PedANOVA: Optuna 4's default, fANOVA, needs
    scikit-learn, which .venv leaves out."""
    import optuna

    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        log.warning("no optimization_history.html or param_importances.html: no finished trial")
        return []
    figures = {
        "optimization_history.html": lambda: optuna.visualization.plot_optimization_history(
            study, target_name=target_name
        ),
        "param_importances.html": lambda: optuna.visualization.plot_param_importances(
            study,
            evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
            target_name=target_name,
        ),
    }
    written = []
    for name, draw in figures.items():
        figure = draw()
        with atomic.atomic_path(folder / name) as tmp:
            figure.write_html(tmp, include_plotlyjs=True, full_html=True)
        written.append(folder / name)
    return written
