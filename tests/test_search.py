"""Optuna studies through the project's Hydra sweeper (`-m hparams_search=mnist_optuna`).

The end-to-end tests run real studies on tiny data, each trial a real training; the search
space is the config's, only the epochs are fixed to one. The command's wiring (exit status,
stderr, joblib's worker processes) is checked by one real subprocess per path; the rest runs
through the same entry point in this process (``tests.helpers.cli.app_result``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hydra_plugins.mnist_optuna_sweeper import (
    OptunaSweeper,
    distribution,
    outcome,
    search_space,
    trial_overrides,
)
from mnist_pipeline.core.errors import ConfigError
from mnist_pipeline.core.project import CONF_DIR
from mnist_pipeline.experiments import search
from mnist_pipeline.tracking.address import redact
from tests.helpers.faults import one_error_line

pytestmark = pytest.mark.heavy

STUDY = ("hparams_search=mnist_optuna", "train.epochs=1")


def configured_space() -> dict[str, object]:
    """The study's search space as conf/hparams_search/mnist_optuna.yaml declares it, as
    Optuna distributions keyed by the MLflow param each one sets (``optimizer`` is the
    ``optimizer.name`` param); keys the tests pin (``train.epochs``) are left out."""
    config = yaml.safe_load((Path(CONF_DIR) / "hparams_search/mnist_optuna.yaml").read_text())
    pinned = {line.split("=")[0] for line in STUDY}
    return {
        ("optimizer.name" if key == "optimizer" else key): distribution(parse(f"{key}={value}"))
        for key, value in config["hydra"]["sweeper"]["params"].items()
        if key not in pinned
    }


def load_study(store: str) -> optuna.Study | None:
    """The study in the Optuna storage beside the test's MLflow store (the default), if any."""
    path = Path(store.removeprefix("sqlite:///")).parent / "optuna.db"
    if not path.exists():
        return None
    return optuna.load_study(study_name="mnist_optuna", storage=f"sqlite:///{path}")


def trial_runs(children: list) -> dict[int, object]:
    runs = {int(r.data.tags["trial_number"]): r for r in children}
    assert len(runs) == len(children)
    return runs


def assert_in_space(params: dict[str, str]) -> None:
    for key, allowed in configured_space().items():
        if isinstance(allowed, CategoricalDistribution):
            assert params[key] in {str(c) for c in allowed.choices}, (key, params[key])
        else:
            assert allowed.low <= float(params[key]) <= allowed.high, (key, params[key])


def test_the_checked_space_is_the_configured_one():
    space = configured_space()
    assert {"model.units", "model.dropout", "optimizer.name", "train.batch_size"} <= set(space)
    assert "train.epochs" not in space  # pinned to 1 by the tests


# -- the pieces, in-process ------------------------------------------------------------------


def parse(line: str):
    return OverridesParser.create().parse_overrides([line])[0]


def test_a_diverged_or_failed_trial_gets_no_value():
    """A trial whose objective is not a finite number (a network that diverged: NaN loss and
    accuracy), that lacks the objective's metric, or whose job failed is told FAIL (no
    value), with the reason; a finite one is told its value."""
    from hydra.core.utils import JobReturn, JobStatus

    objective = search.Objective("val_accuracy")

    def done(metrics: dict) -> JobReturn:
        ret = JobReturn()
        ret.status, ret.return_value = JobStatus.COMPLETED, metrics
        return ret

    assert outcome(done({"val_accuracy": 0.97}), objective)[1:] == (0.97, None)
    for metrics in ({"val_accuracy": math.nan}, {"val_accuracy": math.inf}, {"test_loss": 0.1}):
        _, value, why = outcome(done(metrics), objective)
        assert value is None and why is not None, metrics
    failed = JobReturn()
    failed.status, failed._return_value = JobStatus.FAILED, ValueError("boom")
    _, value, why = outcome(failed, objective)
    assert value is None and str(why) == "boom"


def test_grammar_maps_to_optuna_distributions():
    assert distribution(parse("a=choice(adam,rmsprop)")) == CategoricalDistribution(
        ["adam", "rmsprop"]
    )
    # range() excludes its end, as in Hydra's own grid sweeps.
    assert distribution(parse("a=range(1,4)")) == IntDistribution(1, 3)
    assert distribution(parse("a=range(64,257,64)")) == IntDistribution(64, 256, step=64)
    assert distribution(parse("a=interval(0,0.5)")) == FloatDistribution(0.0, 0.5)
    assert distribution(parse("a=int(interval(4,12))")) == IntDistribution(4, 12)
    assert distribution(parse("a=tag(log,interval(1e-4,1e-2))")) == FloatDistribution(
        1e-4, 1e-2, log=True
    )
    with pytest.raises(ConfigError, match="start > 0"):
        distribution(parse("a=tag(log,interval(0,1))"))
    with pytest.raises(ConfigError, match="start < end"):
        distribution(parse("a=interval(2,1)"))


def test_command_line_sweeps_replace_and_values_fix_search_params():
    params = {"model.units": "choice(256,512)", "model.dropout": "interval(0,0.5)"}
    space, fixed = search_space(params, ["model.units=choice(8,16)", "model.dropout=0.2", "x=1"])
    assert space == {"model.units": CategoricalDistribution([8, 16])}
    assert fixed == ["model.dropout=0.2", "x=1"]
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.params"):
        search_space({"model.units": "choice(256,"}, [])
    with pytest.raises(ConfigError, match="nothing to search"):
        search_space({}, ["model.units=8"])
    assert trial_overrides({"a": 1e-5, "b": True, "c": "adam", "d": 3}) == [
        "a=1e-05",
        "b=true",
        "c=adam",
        "d=3",
    ]


def test_objective_is_validation_arithmetic_never_the_test_set():
    penalised = search.Objective("val_accuracy - 0.5 * (train_accuracy - val_accuracy)")
    assert penalised({"val_accuracy": 0.9, "train_accuracy": 1.0}) == pytest.approx(0.85)
    for leak in ("test_accuracy", "val_accuracy - accuracy_gap", "-test_loss"):
        with pytest.raises(ConfigError, match="test-set metrics"):
            search.Objective(leak)
    with pytest.raises(ConfigError, match="unknown metric val_acc "):
        search.Objective("val_acc")
    for bad in ("__import__('os')", "val_accuracy.real", "max(val_accuracy)", "1 +", "2"):
        with pytest.raises(ConfigError):
            search.Objective(bad)
    with pytest.raises(search.MissingMetric, match=r"val_accuracy.*data.val_split > 0"):
        search.Objective("val_accuracy")({"test_accuracy": 0.9})
    assert math.isnan(
        search.Objective("val_accuracy / val_loss")({"val_accuracy": 1, "val_loss": 0})
    )
    with pytest.raises(ConfigError, match=r"data\.val_split=0"):
        search.Objective("val_accuracy").check_config(0.0)


def test_a_study_resumes_only_towards_the_same_goal():
    study = optuna.create_study(study_name="s", direction="maximize")
    search.check_study(study, "maximize", search.Objective("val_accuracy"))
    search.check_study(study, "maximize", search.Objective("val_accuracy"))
    with pytest.raises(ConfigError, match="not minimize"):
        search.check_study(study, "minimize", search.Objective("val_accuracy"))
    with pytest.raises(ConfigError, match="optimises 'val_accuracy', not '-val_loss'"):
        search.check_study(study, "maximize", search.Objective("-val_loss"))


def test_storage_defaults_beside_the_mlflow_store(tracking_store, monkeypatch):
    monkeypatch.delenv(search.STORAGE_ENV, raising=False)
    store = Path(tracking_store.removeprefix("sqlite:///"))
    assert search.storage_url(None) == f"sqlite:///{store.parent / 'optuna.db'}"
    monkeypatch.setenv(search.STORAGE_ENV, "postgresql+psycopg://u:pw@db/optuna")
    assert search.storage_url(None) == "postgresql+psycopg://u:pw@db/optuna"
    assert "pw" not in redact(search.storage_url(None))
    with pytest.raises(ConfigError, match="absolute path"):
        search.storage_url("sqlite:///optuna.db")


def test_sweeper_settings_are_checked():
    def settings(**kw):
        return OptunaSweeper(sampler=None, **kw)._check_settings()

    with pytest.raises(ConfigError, match="no setting n_trails"):
        settings(n_trails=3)
    with pytest.raises(ConfigError, match="maximize or minimize"):
        settings(direction="max")
    with pytest.raises(ConfigError, match=r"n_jobs must be an integer >= 1"):
        settings(n_jobs=0)
    settings(n_trials=3, n_jobs=2, direction="minimize")


def test_training_reports_the_final_models_validation_accuracy(prepared, tiny_mirror):
    from mnist_pipeline.stages import evaluate, preprocess, train
    from tests.helpers.config import compose_config, sha_overrides

    assert "val_accuracy" not in train.train(prepared)  # no split: nothing to report
    cfg = compose_config(
        [
            *sha_overrides(tiny_mirror[1]),
            "data.val_split=0.25",
            "model.units=32",
            "train.epochs=30",
            "train.early_stopping_patience=2",
            "optimizer.learning_rate=0.5",  # validation loss bounces: weights get restored
        ]
    )
    preprocess.preprocess(cfg)
    metrics = train.train(cfg)
    result = evaluate.evaluate(cfg)
    assert result["val_accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    run_id = json.loads((Path(cfg.paths.models) / "run.json").read_text())["run_id"]
    # The run's val_accuracy is the final (restored) model's, logged after the epochs' values.
    assert mlflow.get_run(run_id).data.metrics["val_accuracy"] == pytest.approx(
        metrics["val_accuracy"]
    )
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_accuracy")
    assert max(m.step for m in history) == metrics["epochs_run"] + 1


# -- real studies on tiny data ---------------------------------------------------------------


@pytest.fixture
def study(sweep, tracking_store, monkeypatch):
    """Run ``hparams_search=mnist_optuna`` with extra overrides (in a subprocess, or in this
    process with ``in_process=True``); return (process, parent, children, the Optuna study)."""
    monkeypatch.delenv(search.STORAGE_ENV, raising=False)

    def run(*overrides: str, in_process: bool = False):
        result, parent, children = sweep(*STUDY, *overrides, in_process=in_process)
        return result, parent, children, load_study(tracking_store)

    return run


@pytest.mark.slow
def test_parallel_study_then_resumed_with_more_trials(study, capfd):
    result, parent, children, optuna_study = study(
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert parent.info.status == "FINISHED"
    runs = trial_runs(children)
    assert sorted(runs) == [0, 1]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    trials = {t.number: t for t in optuna_study.trials}
    assert [t.state.name for t in trials.values()] == ["COMPLETE"] * 2
    for number, run in runs.items():
        assert run.info.status == "FINISHED"
        assert_in_space(run.data.params)
        # What Optuna sampled is what the trial's job ran with.
        for key, value in trials[number].params.items():
            name = "optimizer.name" if key == "optimizer" else key
            assert run.data.params[name] == str(value), (key, value)
        metrics = run.data.metrics
        assert metrics["objective"] == pytest.approx(trials[number].value)
        assert metrics["objective"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)
        assert {"test_accuracy", "accuracy_gap"} <= set(metrics)
    best = optuna_study.best_trial
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.tags["best_run_id"] == runs[best.number].info.run_id
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(
        runs[best.number].data.metrics["test_accuracy"]
    )
    assert parent.data.tags["best.model.units"] == str(best.params["model.units"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {
        "optuna_best.json",
        "optimization_history.html",
        "param_importances.html",
        "comparison.md",
    } <= artifacts

    # Same study, more trials: the numbers continue, under the same parent run (the basic
    # launcher, in this process: the subprocess above was the command's wiring).
    result, again, children, optuna_study = study("hydra.sweeper.n_trials=3", in_process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert again.info.run_id == parent.info.run_id
    assert again.info.status == "FINISHED"
    assert sorted(trial_runs(children)) == [0, 1, 2]
    assert [t.number for t in optuna_study.trials] == [0, 1, 2]
    # The seeded sampler does not draw the first call's trials again.
    sampled = [tuple(sorted(t.params.items())) for t in optuna_study.trials]
    assert not set(sampled[2:]) & set(sampled[:2])
    assert "2 trials so far, 1 to run" in result.stdout + result.stderr
    for run in children:
        assert_in_space(run.data.params)
    assert again.data.metrics["n_trials_complete"] == 3

    # The comparison lists the whole study, best first.
    from mnist_pipeline.experiments import compare

    table = compare.runs_table(compare.select_runs(sweep_id="latest"))
    assert len(table) == 3
    assert list(table["objective"]) == sorted(table["objective"], reverse=True)
    capfd.readouterr()
    assert compare.main(["--sweep"]) == 0
    rows = capfd.readouterr().out.splitlines()
    best = optuna_study.best_value
    runs = trial_runs(children)  # the whole study's
    tops = {runs[t.number].info.run_name for t in optuna_study.trials if t.value == best}  # ties
    assert len(rows) == 4 and any(rows[1].strip().startswith(name) for name in tops), rows[:2]


def seed_sampling_both(key: str, values: tuple, n_trials: int, overrides: list[str]) -> int:
    """A sampler seed with which the study's first ``n_trials`` trials sample each of
    ``values`` for ``key`` at least once: the sweeper asks exactly like this."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(CONF_DIR)
    search_conf = OmegaConf.load(conf / "hparams_search/mnist_optuna.yaml").hydra.sweeper
    sampler_conf = OmegaConf.merge(
        OmegaConf.load(conf / "hydra/sweeper/sampler/tpe.yaml"), search_conf.sampler
    )
    space, _ = search_space(dict(search_conf.params), overrides)
    for seed in range(100):
        sampler_conf.seed = seed
        study = optuna.create_study(sampler=instantiate(sampler_conf), direction="maximize")
        drawn = set()
        for _ in range(n_trials):
            trial = study.ask(space)
            drawn.add(trial.params[key])
            study.tell(trial, 0.5)
        if drawn == set(values):
            return seed
    raise AssertionError("no seed samples every value")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The number of trials is too small")  # one COMPLETE trial
def test_failed_trials_are_told_and_the_study_completes(study):
    # A negative learning rate fails the job's config check: its trial fails. Two trials, one
    # of each (the seed makes it so); in this process, the basic launcher runs them one after
    # the other as it does in a command's.
    overrides = ["optimizer.learning_rate=choice(0.01,-1.0)"]
    seed = seed_sampling_both("optimizer.learning_rate", (0.01, -1.0), 2, overrides)
    result, parent, children, optuna_study = study(
        *overrides,
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.sampler.seed={seed}",
        in_process=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: job" in result.stderr and "must be > 0" in result.stderr
    states = {t.number: t.state.name for t in optuna_study.trials}
    assert sorted(states.values()) == ["COMPLETE", "FAIL"]
    for number, run in trial_runs(children).items():
        if float(run.data.params["optimizer.learning_rate"]) < 0:
            assert states[number] == "FAIL"
            assert run.info.status == "FAILED"
            assert run.data.tags["optuna_state"] == "FAIL"
            assert "must be > 0" in run.data.tags["error"]
        else:
            assert states[number] == "COMPLETE"
            assert run.info.status == "FINISHED"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_trials_failed"] == list(states.values()).count("FAIL")
    assert optuna_study.best_trial.params["optimizer.learning_rate"] == 0.01


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message", "in_process"),
    [
        # The command's wiring for a refusal (exit status, the one line on stderr): one real
        # subprocess; the other refusals take the same path, through the entry point here.
        (["hydra.sweeper.objective=test_accuracy"], "test-set metrics", False),
        (["data.val_split=0"], "data.val_split=0", True),
        (["model.units=int(interval(64,8))"], "start < end", True),
        (["model.unit=choice(8,16)"], "the trials' overrides do not compose", True),
        (["hydra.sweeper.storage=sqlite:////nonexistent/folder/optuna.db"], "cannot open", True),
    ],
)
def test_bad_settings_fail_before_any_trial(study, overrides, message, in_process):
    result, parent, children, _ = study(*overrides, in_process=in_process)
    one_error_line(result, message)
    assert parent.info.status == "FAILED"
    assert children == []


def test_figures_are_optunas_own_pages_that_open_offline(tmp_path):
    """Optuna's two figures, written as HTML with plotly's script inside: the run's artifact
    opens in `mlflow ui` with no network (no script from a CDN)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_int("u", 1, 4), n_trials=6)

    written = search.write_figures(study, tmp_path, "val_accuracy")
    assert [p.name for p in written] == ["optimization_history.html", "param_importances.html"]
    for path in written:
        page = path.read_text()
        assert "Plotly.newPlot" in page and "val_accuracy" in page
        assert not re.search(r"<script[^>]+src=", page), path.name
    assert "Hyperparameter Importances" in written[1].read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in written]  # no temp files


@pytest.mark.filterwarnings("ignore:The number of trials is too small")
def test_figures_of_a_study_with_no_finished_trial_are_skipped(tmp_path, caplog):
    study = optuna.create_study()
    assert search.write_figures(study, tmp_path, "val_accuracy") == []
    assert "no optimization_history.html" in caplog.text and not list(tmp_path.iterdir())
