"""Hydra sweeper that runs an Optuna study with Optuna's ask-and-tell interface.

Selected with ``hydra/sweeper=optuna`` (``conf/hydra/sweeper/optuna.yaml``; the search of
this project: ``hparams_search=mnist_optuna``). Hydra only accepts sweepers from the
``hydra_plugins`` namespace, hence this module's place.

Why not ``hydra-optuna-sweeper``: its latest release (1.3.0) pins ``optuna<3``. The config
keeps that plugin's shape (``params`` in Hydra's override grammar, ``direction``,
``n_trials``, ``n_jobs``, ``sampler``, ``study_name``, ``storage``), with two differences a
user of it should know:

- ``objective`` names the number a trial is judged by, computed from the metrics the job
  returns (``val_accuracy``), instead of the job returning one float.
- ``n_trials`` is the study's total: a call runs the trials the study still lacks, so the same
  command resumes a crashed study, ``n_trials=40`` after 20 runs 20 more, and two calls at
  once share the study (``mnist_pipeline.experiments.study_calls``).

Each batch of ``n_jobs`` trials goes to Hydra's launcher (basic, joblib, the project's Ray
launcher), with job numbers equal to trial numbers. A trial whose job fails, diverges or
returns no usable objective is told to Optuna as FAIL and the study goes on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

# Hydra imports every plugin of every search path for any command that composes conf/, DVC's
# `dvc exp run -S` included: only the light error module here, the sweep's code when it runs.
from mnist_pipeline.core.errors import ConfigError, PipelineError, exit_on_error
from mnist_pipeline.tracking import address

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
RESULTS_FILE = "optimization_results.yaml"


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: Any,
        direction: str = "maximize",
        objective: str = "val_accuracy",
        storage: str | None = None,
        study_name: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        params: dict[str, str] | None = None,
        **unknown: Any,
    ) -> None:
        self.sampler = sampler
        self.direction = direction
        self.objective = objective
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.params = dict(params or {})
        self.unknown = sorted(unknown)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None
        #: While this call is among the study's calls: (study, storage, sweep folder).
        self._joined: tuple[Any, str, str] | None = None
        self._storage: str | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        """Run the study; on any error close the sweep's MLflow parent run as FAILED (Hydra
        then skips the callback that would close it) and exit with one line."""
        assert self.config is not None
        sweep_dir = self.config.hydra.sweep.dir
        with exit_on_error():
            try:
                return self._sweep(arguments)
            except BaseException as exc:
                from mnist_pipeline.experiments.search import storage_fault
                from mnist_pipeline.experiments.study_calls import leave_after_error
                from mnist_pipeline.experiments.sweep_tracking import abort_sweep

                joined, self._joined = self._joined, None
                if not leave_after_error(joined, self.study_name):
                    abort_sweep(sweep_dir, exc)
                fault = storage_fault(exc, self._storage) if self._storage else None
                if fault:  # the study's storage, named (not "the MLflow store")
                    raise PipelineError(fault) from None
                raise

    def _sweep(self, arguments: list[str]) -> Any:

        from mnist_pipeline.experiments import search, study_calls

        assert self.config is not None
        started = time.perf_counter()
        self._check_settings()
        objective = search.Objective(self.objective)
        space, fixed = search_space(self.params, arguments)
        base = self.hydra_context.config_loader.load_sweep_config(self.config, fixed)
        # Every searched key must exist: found now, not as a failed trial in the study.
        self._validate([[*fixed, *trial_overrides({k: lowest(d) for k, d in space.items()})]])
        if "data.val_split" not in space:
            objective.check_config(OmegaConf.select(base, "data.val_split"))
        storage = self._storage = search.storage_url(self.storage)
        self._sampler(0)  # a bad sampler setting stops the call before the study is touched
        sweep_dir = self.config.hydra.sweep.dir
        # Opened under the lock too: two calls creating one new SQLite storage at once race
        # on its schema (UNIQUE constraint failed: alembic_version.version_num).
        with study_calls.study_lock(storage, self.study_name):
            study = self._open_study(storage)
            search.check_study(study, self.direction, objective)
            info = search.link_parent(study, sweep_dir)
            running = study_calls.join(study)
            self._joined = (study, storage, sweep_dir)
            stale = study_calls.fail_stale_trials(study)
        if stale:
            log.warning(
                "trials %s of an earlier call never finished: marked FAIL, and run again", stale
            )
        done = search.trials_done(study)
        log.info(
            "Optuna study %s in %s: %d trials so far, %d to run, %d at a time%s; objective %s (%s)",
            *(study.study_name, address.redact(storage), done, max(self.n_trials - done, 0)),
            self.n_jobs,
            f", shared with {len(running)} running call(s)" if running else "",
            *(objective.expression, self.direction),
        )
        returns: list[JobReturn] = []
        parent = info["parent_run_id"]
        asked = study_calls.Asks(study, storage, parent, self.n_trials, self.n_jobs)
        for batch in asked.batches(space, self._sampler):
            returns += self._run_batch(study, batch, fixed, objective, parent)
        if not returns:
            log.info("the study already has n_trials=%d trials: nothing to run", self.n_trials)
        self._joined = None
        last = not study_calls.leave(study, storage, sweep_dir, self.study_name)
        summary = search.report_study(study, info, objective, storage, to_parent=last)
        summary["wall_s"] = round(time.perf_counter() - started, 1)
        OmegaConf.save(
            OmegaConf.create(to_plain(summary)), Path(sweep_dir).resolve() / RESULTS_FILE
        )
        if summary["n_complete"]:
            log.info(
                "best trial %d: %s = %.4f with %s",
                summary["best_trial"],
                objective.expression,
                summary["best_value"],
                " ".join(f"{k}={v}" for k, v in summary["best_params"].items()),
            )
        return returns

    def _open_study(self, storage: str) -> Any:
        """The study, created or resumed; one line for a database that cannot be used."""
        import optuna

        from mnist_pipeline.experiments import search

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            return optuna.create_study(
                study_name=self.study_name,
                storage=storage,
                direction=self.direction,
                load_if_exists=True,
            )
        except Exception as exc:  # an unreachable database, a missing folder or driver
            if (search.storage_fault(exc, storage) or "").startswith("no space left"):
                raise  # ``sweep`` names the full disk
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"cannot open Optuna study {self.study_name!r} in {address.redact(storage)}: "
                f"{reason}"
            ) from None

    def _check_settings(self) -> None:
        if self.unknown:
            raise ConfigError(
                f"hydra.sweeper has no setting {', '.join(self.unknown)} (settings: sampler, "
                "direction, objective, storage, study_name, n_trials, n_jobs, params)"
            )
        if self.direction not in DIRECTIONS:
            raise ConfigError(
                f"hydra.sweeper.direction must be maximize or minimize, got {self.direction!r}"
            )
        for key in ("n_trials", "n_jobs"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"hydra.sweeper.{key} must be an integer >= 1, got {value!r}")

    def _sampler(self, trials_so_far: int) -> Any:
        """The configured sampler. Its seed is offset by the study's trials so far: a resumed
        study would otherwise draw its first random trials again (the same seed, the same
        sequence); a new study gets the seed as configured."""
        import optuna

        config = self.sampler
        if config is None:
            return optuna.samplers.TPESampler()
        try:
            if isinstance(config, DictConfig | dict):
                config = OmegaConf.create(OmegaConf.to_container(config))
                if config.get("seed") is not None:
                    config.seed = int(config.seed) + trials_so_far
            sampler = instantiate(config) if isinstance(config, DictConfig) else config
        except Exception as exc:
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"hydra.sweeper.sampler: {reason}") from None
        if not isinstance(sampler, optuna.samplers.BaseSampler):
            raise ConfigError(f"hydra.sweeper.sampler is not an Optuna sampler: {sampler!r}")
        return sampler

    def _validate(self, batch: list[list[str]]) -> None:
        try:
            self.validate_batch_is_legal(batch)
        except Exception as exc:
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"the trials' overrides do not compose: {reason}") from None

    def _run_batch(
        self,
        study: Any,
        trials: list[Any],
        fixed: list[str],
        objective: Any,
        parent_run_id: str,
    ) -> list[JobReturn]:
        """Launch one batch of trials and tell Optuna how each went. Trials asked but never
        launched (an invalid override, Ctrl-C) are told FAIL as interrupted, never left
        RUNNING, and the same command runs trials in their place."""
        import optuna

        from mnist_pipeline.experiments import search

        FAIL = optuna.trial.TrialState.FAIL
        pending = {t.number: t for t in trials}
        try:
            overrides = [[*fixed, *trial_overrides(t.params)] for t in trials]
            self._validate(overrides)
            returns: list[JobReturn] = []
            for group in consecutive(trials):
                first = group[0].number
                log.info("trials %d-%d", first, group[-1].number)
                batch = [overrides[trials.index(t)] for t in group]
                returns += self.launcher.launch(batch, initial_job_idx=first)
            for trial, ret in zip(trials, returns, strict=True):
                metrics, value, error = outcome(ret, objective)
                search.record_trial(trial, parent_run_id, value, metrics)
                if value is None:
                    log.warning("trial %d failed: %s", trial.number, error)
                    study.tell(trial, state=FAIL)
                else:
                    log.info("trial %d: %s = %.4f", trial.number, objective.expression, value)
                    study.tell(trial, value)
                del pending[trial.number]
                if isinstance(error, search.MissingMetric):
                    raise error  # every later trial would fail the same way
            return returns
        finally:
            search.mark_interrupted(study, list(pending))


def outcome(ret: JobReturn, objective: Any) -> tuple[dict, float | None, Exception | None]:
    """A job's metrics, its objective value (None: the trial failed) and why it failed."""
    from mnist_pipeline.experiments.search import MissingMetric

    if ret.status != JobStatus.COMPLETED:
        error = ret._return_value
        return {}, None, error if isinstance(error, Exception) else RuntimeError(str(error))
    metrics = ret.return_value
    if not isinstance(metrics, dict):
        return {}, None, RuntimeError("the job failed (its MLflow run has the error)")
    try:
        value = objective(metrics)
    except MissingMetric as exc:
        return metrics, None, exc
    if not math.isfinite(value):
        return metrics, None, RuntimeError(f"the objective is {value}")
    return metrics, value, None


def search_space(params: dict[str, str], arguments: Sequence[str]) -> tuple[dict, list[str]]:
    """Optuna distributions for the swept keys, and the overrides every trial gets.

    ``params`` come from the config; command-line arguments add to them: a sweep there
    (``model.units=choice(64,128)``) replaces the config's, a plain value fixes the key for all
    trials and takes it out of the search."""
    parser = OverridesParser.create()
    configured = [f"{k}={v}" for k, v in params.items()]
    try:
        parsed = parser.parse_overrides(configured) + parser.parse_overrides(list(arguments))
    except Exception as exc:
        raise ConfigError(f"hydra.sweeper.params: {str(exc).splitlines()[0]}") from None
    by_key: dict[str, Override] = {}
    for override in parsed:
        by_key.pop(override.get_key_element(), None)
        by_key[override.get_key_element()] = override
    space: dict[str, Any] = {}
    fixed: list[str] = []
    for key, override in by_key.items():
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed.append(override.input_line)
    if not space:
        raise ConfigError("nothing to search: hydra.sweeper.params is empty")
    return space, fixed


def distribution(override: Override) -> Any:
    """The Optuna distribution for one swept key, as Hydra's grammar reads it:
    ``choice(a,b)`` categorical; ``range(1,4)`` the integers 1..3 (as Hydra's own ``range``:
    the end is excluded); ``interval(a,b)`` floats, ``int(interval(a,b))`` integers, both
    with the end included; ``tag(log, ...)`` sampled on a log scale."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key = override.get_key_element()
    value = override.value()
    if override.is_choice_sweep() or (isinstance(value, RangeSweep) and value.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if not choices:
            raise ConfigError(f"{key}: choice() needs at least one value")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"{key}={override.get_value_element_as_str()} is empty")
        step = value.step
        if all(isinstance(v, int) for v in values) and isinstance(step, int) and step > 0:
            return IntDistribution(values[0], values[-1], step=step)
        return CategoricalDistribution(values)  # float or descending: exactly Hydra's values
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        log_scale = "log" in value.tags
        if low is None or high is None or not low < high:
            raise ConfigError(f"{key}: interval() needs start < end, got {low}, {high}")
        if log_scale and low <= 0:
            raise ConfigError(f"{key}: a log-scale interval needs start > 0, got {low}")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log_scale)
        return FloatDistribution(float(low), float(high), log=log_scale)
    raise ConfigError(f"{key}: {override.input_line} is not a sweep Optuna can sample")


def lowest(distribution: Any) -> Any:
    """A value the distribution can sample (to check the overrides compose)."""
    choices = getattr(distribution, "choices", None)
    return choices[0] if choices is not None else distribution.low


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """A trial's sampled values as Hydra overrides (``model.units=256``)."""
    out = []
    for key, value in params.items():
        if isinstance(value, bool):
            text = str(value).lower()
        elif value is None:
            text = "null"
        elif isinstance(value, float):
            text = repr(value)
        else:
            text = str(value)
        out.append(f"{key}={text}")
    return out


def consecutive(trials: list[Any]) -> list[list[Any]]:
    """Trials in runs of consecutive numbers, so that each run is launched with
    job number == trial number (another process asking the same study can leave gaps)."""
    groups: list[list[Any]] = []
    for trial in trials:
        if groups and trial.number == groups[-1][-1].number + 1:
            groups[-1].append(trial)
        else:
            groups.append([trial])
    return groups


def to_plain(value: Any) -> Any:
    """The summary with numpy scalars and tuples made YAML-safe."""
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)
