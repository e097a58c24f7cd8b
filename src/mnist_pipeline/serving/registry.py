"""The model registry: register a trained model as `candidate`, promote it to `champion`.

    python -m mnist_pipeline.register                  # the pipeline's run (models/run.json)
    python -m mnist_pipeline.register --run-id ID      # any finished, evaluated training run
    python -m mnist_pipeline.register --best-of-sweep  # the best job of the latest sweep
    python -m mnist_pipeline.register --sweep-id ID    # the best job of that sweep
    python -m mnist_pipeline.register --promote        # candidate -> champion, by the rule
    python -m mnist_pipeline.register --promote --force --version 3    # override: roll back
    python -m mnist_pipeline.register --promote registry.max_gap=0.05  # Hydra overrides

Registering logs the run's Keras model once more, wrapped in the serving contract
(``contract.py``: checked inputs, digit and probability out), into the same run, and makes
it a version of the registered model ``registry.model_name`` on the same MLflow store as the
runs, tagged with what a reviewer needs: source run, test accuracy, gap, data hash, commit.
Promotion follows ``conf/registry/``: a higher test accuracy than the champion's (by more
than ``min_improvement``) and a gap of at most ``max_gap``; it says why it promotes or
refuses, and exits 1 when it refuses. Only ``--force`` moves `champion` against the rule.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_pipeline import tracking
from mnist_pipeline.core import locks, log_filter
from mnist_pipeline.core.config import PipelineConfig
from mnist_pipeline.core.errors import PipelineError, exit_on_error
from mnist_pipeline.stages import artifacts
from mnist_pipeline.tracking import mlflow_compat
from mnist_pipeline.tracking.logged import no_pip_version_warning
from mnist_pipeline.tracking.provenance import package_version

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
SERVING_MODEL = "serving_model"
#: Run tags copied onto each version (the version's own name for them on the right).
VERSION_TAGS = {
    "data.content_sha256": "data_sha256",
    "git.commit": "git_commit",
    "git.dirty": "git_dirty",
    "sweep_id": "sweep_id",
    "model_uri": "keras_model_uri",
}
REQUIRED_METRICS = ("test_accuracy", "accuracy_gap", "train_accuracy")


@dataclass
class Version:
    """A registered version and the numbers promotion compares."""

    number: str
    run_id: str
    test_accuracy: float
    accuracy_gap: float

    def describe(self) -> str:
        return (
            f"version {self.number} (run {self.run_id[:12]}): test_accuracy "
            f"{self.test_accuracy:.4f}, gap {self.accuracy_gap:.4f}"
        )


def current_run_id(cfg: PipelineConfig) -> str:
    """The run whose model the pipeline holds now (written by the train stage)."""
    path = Path(cfg.paths.models) / artifacts.RUN_FILE
    run_id = artifacts.read_run_ref(cfg.paths.models).get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise PipelineError(f"{path} names no run_id: re-run the train stage (dvc repro)")
    return run_id


def best_sweep_run(sweep_id: str | None) -> str:
    """The sweep's best job, ranked as ``compare`` ranks it (``compare.ranking``: an Optuna
    study by its objective, jobs with a validation split by ``val_accuracy``, else test
    accuracy), among the jobs that have that metric; ties go to the smaller train/test gap.
    For a study, Optuna's own best trial (its parent run's ``best_run_id``) wins ties, so the
    registered model is the one the study reports."""
    from mnist_pipeline.experiments.compare import ranking, select_runs

    runs = [
        r for r in select_runs(sweep_id=sweep_id or "latest") if "test_accuracy" in r.data.metrics
    ]
    if not runs:
        raise PipelineError("no job of the sweep was evaluated (no test_accuracy)")
    metric, lower_is_better = ranking(runs)
    ranked = [r for r in runs if r.data.metrics.get(metric) is not None]
    if not ranked:
        raise PipelineError(f"no job of the sweep has {metric}: none can be judged")
    sign = -1.0 if lower_is_better else 1.0
    best_value = max(sign * r.data.metrics[metric] for r in ranked)
    tied = [r for r in ranked if sign * r.data.metrics[metric] == best_value]
    reported = study_best_run_id(tied[0])
    best = next(
        (r for r in tied if r.info.run_id == reported),
        min(tied, key=lambda r: r.data.metrics.get("accuracy_gap", 1.0)),
    )
    log.info("best job of the sweep by %s: %s", metric, best.info.run_id)
    return best.info.run_id


def study_best_run_id(job: Any) -> str | None:
    """The run an Optuna study reports as its best (its parent run's ``best_run_id``), if
    ``job`` belongs to a study whose parent recorded one."""
    parent_id = job.data.tags.get("mlflow.parentRunId")
    if "optuna_study" not in job.data.tags or not parent_id:
        return None
    return tracking.get_run(parent_id).data.tags.get("best_run_id")


def check_run(run_id: str) -> Any:
    """A finished training run that the evaluate stage has scored, or a clear error."""
    run = tracking.get_run(run_id)
    if run.data.tags.get("stage") != "train":
        raise PipelineError(f"run {run_id} is not a training run (tag stage is not 'train')")
    if run.info.status != "FINISHED":
        raise PipelineError(f"run {run_id} is {run.info.status}, not FINISHED: re-run it")
    missing = [m for m in REQUIRED_METRICS if m not in run.data.metrics]
    if missing:
        raise PipelineError(
            f"run {run_id} has no {', '.join(missing)}: evaluate it first (dvc repro)"
        )
    if "model_uri" not in run.data.tags:
        raise PipelineError(f"run {run_id} logged no model (no model_uri tag)")
    return run


def log_serving_model(run: Any) -> str:
    """Wrap the run's logged Keras model in the serving contract and log it into the run;
    return the new model's ``models:/<model_id>`` URI."""
    import mlflow
    import numpy as np
    from mlflow.models import Model

    from mnist_pipeline.serving import contract, images

    keras_model = tracking.load_logged_model(run.data.tags["model_uri"])
    requirements = [
        f"{p}=={package_version(p)}" for p in ("mlflow", "tensorflow", "keras", "numpy", "pandas")
    ]
    with (
        tempfile.TemporaryDirectory() as tmp,
        no_pip_version_warning(),
        mlflow_compat.in_experiment_of(run),
    ):
        keras_file = Path(tmp) / artifacts.MODEL_FILE
        keras_model.save(keras_file)
        info = Model.log(
            artifact_path=None,
            name=SERVING_MODEL,
            flavor=mlflow.pyfunc,
            run_id=run.info.run_id,
            python_model=contract.__file__,
            artifacts={contract.KERAS_ARTIFACT: str(keras_file)},
            signature=contract.SIGNATURE,
            input_example=example_input(images, np),
            pip_requirements=requirements,
        )
    return info.model_uri


def example_input(images: Any, np: Any) -> Any:
    """A '1' drawn as a stroke, through the same MNIST formatting `predict` uses: an input
    example that looks like what the model expects (MLflow shows it and tests it on log)."""
    stroke = np.zeros((40, 40), dtype=np.float32)
    stroke[5:35, 18:22] = 1.0
    return images.to_mnist(stroke).reshape(1, -1)


def find_version(name: str, run_id: str) -> Any | None:
    """The version already registered from ``run_id``, if any (registering is idempotent)."""
    client = tracking.client()
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except tracking.configured_mlflow().exceptions.MlflowException:
        return None
    return max(found, key=lambda v: int(v.version), default=None)


def register(cfg: PipelineConfig, run_id: str) -> Any:
    """Register ``run_id``'s model (once) and point the `candidate` alias at it."""
    run = check_run(run_id)
    name = cfg.registry.model_name
    client = tracking.client()
    version = find_version(name, run_id)
    if version is None:
        mlflow = tracking.configured_mlflow()
        try:
            client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(
                name,
                description="MNIST digit classifier. In: float32 (n, 784) in [0, 1]; out: "
                "digit, probability, probabilities (see docs/serving.md).",
            )
        model_uri = log_serving_model(run)
        metrics = run.data.metrics
        tags = {
            "source_run_id": run_id,
            "source_run_name": run.info.run_name,
            "experiment_id": run.info.experiment_id,
            **{k: f"{metrics[k]:.6f}" for k in REQUIRED_METRICS},
            **{new: run.data.tags[k] for k, new in VERSION_TAGS.items() if k in run.data.tags},
        }
        # The client, not mlflow.register_model, which prints "Registered model ... already
        # exists" and "Created version ..." around the line this command prints.
        model_id = model_uri.removeprefix("models:/")
        version = client.create_model_version(name, model_uri, tags=tags, model_id=model_id)
        client.update_model_version(
            name,
            version.version,
            description=(
                f"Run {run_id} ({run.info.run_name}): test accuracy "
                f"{metrics['test_accuracy']:.4f}, train-test gap {metrics['accuracy_gap']:.4f}; "
                f"data {tags.get('data_sha256', 'unknown')[:12]}, commit "
                f"{tags.get('git_commit', 'unknown')[:12]}."
            ),
        )
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return client.get_model_version(name, version.version)


def load_version(name: str, alias: str | None = None, number: str | None = None) -> Version | None:
    """A version by alias or number, with its metrics; None if the alias is not set."""
    client = tracking.client()
    mlflow = tracking.configured_mlflow()
    try:
        if number is not None:
            mv = client.get_model_version(name, number)
        else:
            mv = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        if number is not None:
            raise PipelineError(f"registered model {name!r} has no version {number}") from None
        return None
    try:
        return Version(
            str(mv.version),
            mv.run_id,
            float(mv.tags["test_accuracy"]),
            float(mv.tags["accuracy_gap"]),
        )
    except (KeyError, ValueError):
        raise PipelineError(
            f"{name} version {mv.version} has no test_accuracy/accuracy_gap tags: it was not "
            "registered by this command; register its run again"
        ) from None


def decide(candidate: Version, champion: Version | None, cfg: PipelineConfig) -> list[str]:
    """The rule's objections to promoting ``candidate`` (none: promote)."""
    rule = cfg.registry
    objections = []
    if candidate.accuracy_gap > rule.max_gap:
        objections.append(
            f"its gap {candidate.accuracy_gap:.4f} exceeds registry.max_gap={rule.max_gap:g}"
        )
    if champion is not None and not (
        candidate.test_accuracy > champion.test_accuracy + rule.min_improvement
    ):
        needed = f" + registry.min_improvement={rule.min_improvement:g}"
        objections.append(
            f"its test_accuracy {candidate.test_accuracy:.4f} does not beat the champion's "
            f"{champion.test_accuracy:.4f}{needed if rule.min_improvement else ''}"
        )
    return objections


def promote(cfg: PipelineConfig, version: str | None = None, force: bool = False) -> bool:
    """Move `champion` to the candidate (or ``version``) if the rule allows or ``force``.
    Prints the comparison and the decision; returns whether champion now points at it.

    One promotion at a time (a lock beside the store): the champion is read, judged and
    replaced as one step, so two at once end as if run one after the other, the second
    judged against the first's champion, never the last writer winning against the rule."""
    tracking.require_existing_store()  # the lock goes beside it: nothing is created
    with locks.exclusive(tracking.store_lock("promote"), "another register --promote"):
        return _promote(cfg, version, force)


def _promote(cfg: PipelineConfig, version: str | None, force: bool) -> bool:
    name = cfg.registry.model_name
    candidate = load_version(name, CANDIDATE, version)
    if candidate is None:
        raise PipelineError(
            f"registered model {name!r} has no {CANDIDATE!r} version: run "
            "`python -m mnist_pipeline.register` first"
        )
    champion = load_version(name, CHAMPION)
    print(f"{'candidate' if version is None else 'chosen':9}: {name} {candidate.describe()}")
    print(f"champion : {name} {champion.describe() if champion else 'none yet'}")
    if champion is not None and champion.number == candidate.number:
        print(f"unchanged: version {candidate.number} is already the champion")
        return True
    objections = decide(candidate, champion, cfg)
    client = tracking.client()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if objections and not force:
        # The history says what each promotion did, a refused one too.
        against = f"champion {champion.number}" if champion else "no champion"
        refused = f"{stamp} against {against}: {'; '.join(objections)}"
        client.set_model_version_tag(name, candidate.number, "refused", refused)
        print(
            f"refused: version {candidate.number} stays candidate: {'; '.join(objections)} "
            "(--force promotes it anyway)"
        )
        return False
    client.set_registered_model_alias(name, CHAMPION, candidate.number)
    how = "forced over: " + "; ".join(objections) if objections else "by the rule"
    client.set_model_version_tag(name, candidate.number, "promoted", f"{stamp} {how}")
    if champion is not None:
        client.set_model_version_tag(name, candidate.number, "replaced_version", champion.number)
    if objections:
        print(
            f"promoted (forced): version {candidate.number} is champion despite: "
            f"{'; '.join(objections)}"
        )
    else:
        reasons = [f"gap {candidate.accuracy_gap:.4f} <= {cfg.registry.max_gap:g}"]
        if champion is not None:
            reasons.insert(
                0,
                f"test_accuracy {candidate.test_accuracy:.4f} > {champion.test_accuracy:.4f}",
            )
        else:
            reasons.insert(0, "no champion yet")
        print(f"promoted: version {candidate.number} is champion: {', '.join(reasons)}")
    print(f"serve it: make serve  (MODEL={name}@{CHAMPION}, on http://127.0.0.1:5001)")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_pipeline.register",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run-id", help="register this training run (default: models/run.json)")
    source.add_argument(
        "--best-of-sweep", action="store_true", help="the best job of the latest sweep"
    )
    source.add_argument("--sweep-id", help="the best job of this sweep")
    source.add_argument("--promote", action="store_true", help="candidate -> champion")
    parser.add_argument("--version", help="with --promote: this version instead of the candidate")
    parser.add_argument("--force", action="store_true", help="with --promote: ignore the rule")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. registry.max_gap=0.05")
    args = parser.parse_args(argv)
    if (args.force or args.version) and not args.promote:
        parser.error("--force and --version go with --promote")
    log_filter.quiet_command(level=logging.WARNING)
    with exit_on_error(store=tracking.store_label):
        from mnist_pipeline.core.params import pipeline_config  # Hydra: only when needed

        cfg = pipeline_config(args.overrides)
        if args.promote:
            return 0 if promote(cfg, args.version, args.force) else 1
        if args.best_of_sweep or args.sweep_id:
            run_id = best_sweep_run(args.sweep_id)
        else:
            run_id = args.run_id or current_run_id(cfg)
        mv = register(cfg, run_id)
    tags = mv.tags
    print(
        f"registered: run {run_id} is {cfg.registry.model_name} version {mv.version} "
        f"(alias {CANDIDATE})"
    )
    print(
        f"  test_accuracy {float(tags['test_accuracy']):.4f}, gap "
        f"{float(tags['accuracy_gap']):.4f}, data {tags.get('data_sha256', 'unknown')[:12]}, "
        f"commit {tags.get('git_commit', 'unknown')[:12]}"
    )
    print(
        f"  next: python -m mnist_pipeline.register --promote  (or predict --model "
        f"models:/{cfg.registry.model_name}@{CANDIDATE})"
    )
    return 0
