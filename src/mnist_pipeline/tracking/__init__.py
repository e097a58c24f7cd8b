"""MLflow for the stages: where the store is (``store``), how runs are opened and closed
(``runs``), and what goes into them (``logged``); every workaround of an MLflow bug is in
``mlflow_compat``.

Stages call these helpers and never the MLflow API directly, so the store location, the tags
that make a run reproducible and the model format are decided here once. MLflow is imported
when first needed (the import costs a second). ``provenance`` says what produced a run;
``experiments.sweep_tracking`` keeps a sweep's parent and child runs.
"""

from __future__ import annotations

from mnist_pipeline.tracking.logged import (
    load_logged_model,
    load_run_dict,
    log_artifact,
    log_dataset,
    log_dict,
    log_keras_model,
    log_metrics,
    log_run_spec,
    set_tags,
)
from mnist_pipeline.tracking.runs import (
    JobContext,
    adopt_data_runs,
    close_dead_runs,
    dead_run_reason,
    delete_run,
    error_text,
    fail_run,
    get_run,
    log_metric_to,
    reopen_run,
    require_train_run,
    set_run_tags,
    start_run,
)
from mnist_pipeline.tracking.store import (
    EXPERIMENT_TAGS,
    artifact_folder,
    check_sqlite_store,
    check_store,
    client,
    configured_mlflow,
    default_tracking_uri,
    ensure_experiment,
    require_existing_store,
    store_label,
    store_lock,
    tracking_uri,
)

__all__ = [
    "EXPERIMENT_TAGS",
    "JobContext",
    "adopt_data_runs",
    "artifact_folder",
    "check_sqlite_store",
    "check_store",
    "client",
    "close_dead_runs",
    "configured_mlflow",
    "dead_run_reason",
    "default_tracking_uri",
    "delete_run",
    "ensure_experiment",
    "error_text",
    "fail_run",
    "get_run",
    "load_logged_model",
    "load_run_dict",
    "log_artifact",
    "log_dataset",
    "log_dict",
    "log_keras_model",
    "log_metric_to",
    "log_metrics",
    "log_run_spec",
    "reopen_run",
    "require_existing_store",
    "require_train_run",
    "set_run_tags",
    "set_tags",
    "start_run",
    "store_label",
    "store_lock",
    "tracking_uri",
]
