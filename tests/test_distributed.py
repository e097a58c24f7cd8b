"""train.strategy: ``mirrored`` in process, ``multi_worker`` as two processes on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from mnist_pipeline.core.errors import ConfigError
from mnist_pipeline.core.supervised import free_port
from mnist_pipeline.stages import evaluate, train
from mnist_pipeline.stages.artifacts import load_model
from mnist_pipeline.stages.distribute import cluster_task
from tests.helpers.config import compose_config, sha_overrides
from tests.helpers.processes import start_stage

#: Against ``single`` (plain Keras) the distributed paths shuffle with their own tf.data
#: pipeline, so each epoch sees other batches. On this data, 3 epochs, seeds 42 and 1-4 gave
#: train accuracies from 0.9625 to 1.0 under both ``single`` and ``mirrored``: 0.05 is that
#: spread plus a margin. A model that did not learn (about 0.1) is far outside it.
VS_SINGLE = 0.05
#: Against ``mirrored`` with one replica, two workers see the same global batches in the same
#: order from the same initial weights; only the order of float additions in the gradient
#: mean differs (two half-batch means all-reduced vs one mean). Overlapping or missing
#: shards, or a wrong loss scale, change the gradients themselves and the weights by far
#: more. So: at most one example (1/240) of accuracy, and weights equal to float32 noise.
VS_MIRRORED = 1 / 240 + 1e-6
WEIGHTS_ATOL = 1e-4
#: Two TensorFlow processes starting together on 2 cores take about 20 s before training;
#: a hang (a worker waiting for a peer that never comes) fails after this instead.
TIMEOUT_S = 300

EPOCHS = 3


def overrides(sha: dict[str, str], strategy: str) -> list[str]:
    return [
        *sha_overrides(sha),
        "model.units=32",
        f"train.epochs={EPOCHS}",
        f"train.strategy={strategy}",
    ]


def train_in_process(sha: dict[str, str], strategy: str) -> tuple[dict, list[np.ndarray]]:
    metrics = train.train(compose_config(overrides(sha, strategy)))
    return metrics, load_model("models").get_weights()


def test_mirrored_trains_like_single(prepared, tiny_mirror):
    single, _ = train_in_process(tiny_mirror[1], "single")
    mirrored, _ = train_in_process(tiny_mirror[1], "mirrored")
    assert abs(mirrored["train_accuracy"] - single["train_accuracy"]) <= VS_SINGLE
    run_ref = json.loads(Path("models/run.json").read_text())
    run = mlflow.get_run(run_ref["run_id"])
    assert run.data.params["train.strategy"] == "mirrored"
    assert run.data.tags["distribute.workers"] == "1"
    assert run.data.tags["distribute.replicas"] == "1"  # one CPU device
    assert run.data.metrics["train_accuracy"] == pytest.approx(mirrored["train_accuracy"])
    logged = mlflow.keras.load_model(run_ref["model_uri"])  # a plain, loadable model
    assert len(logged.get_weights()) == 4


def test_a_lost_worker_is_named_from_tensorflows_error(monkeypatch):
    """By the address a call could not reach, or by the task the coordination service found
    unhealthy, its address from TF_CONFIG (TensorFlow 2.21's words, as seen on the namespace
    cluster)."""
    from mnist_pipeline.stages.distribute import lost_peer

    spec = {"cluster": {"worker": ["h0:1", "h1:2"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(spec))
    refused = "last error: UNKNOWN: ipv4:198.18.0.32:12345: Failed to connect to remote host"
    assert lost_peer(refused) == "worker 198.18.0.32:12345"
    silent = "The following tasks are unhealthy (stopped sending heartbeats):\n"
    silent += "/job:worker/replica:0/task:1"
    assert lost_peer(silent) == "worker 1 h1:2"
    assert lost_peer("Deadline Exceeded") == "another worker (or the link to it)"


def test_unknown_strategy_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"train\.strategy must be one of single, mirrored, multi_worker, got .horovod.",
    ):
        compose_config(["train.strategy=horovod"])


@pytest.mark.parametrize(
    ("tf_config", "message"),
    [
        (None, "needs TF_CONFIG .* which is not set"),
        ("{cluster", "needs TF_CONFIG to be JSON"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "to have a 'cluster' and a 'task'"),
        ('{"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": 0}}', "only 'chief'"),
        ('{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 1}}', "not in"),
    ],
)
def test_multi_worker_without_valid_tf_config_fails_before_any_output(
    prepared, tiny_mirror, monkeypatch, tf_config, message
):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ConfigError, match=message):
        train.train(compose_config(overrides(tiny_mirror[1], "multi_worker")))
    assert not Path("models").exists() and not Path("reports/train_history.csv").exists()
    assert mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.stage = 'train'"
    ).empty


def test_chief_is_the_chief_task_or_else_worker_0():
    workers = {"worker": ["h:1", "h:2"]}
    as_worker = [
        cluster_task(json.dumps({"cluster": workers, "task": {"type": "worker", "index": i}}))
        for i in (0, 1)
    ]
    assert [t.is_chief for t in as_worker] == [True, False] and as_worker[0].workers == 2
    with_chief = {"chief": ["h:0"], **workers}
    chief = cluster_task(json.dumps({"cluster": with_chief, "task": {"type": "chief", "index": 0}}))
    worker0 = cluster_task(
        json.dumps({"cluster": with_chief, "task": {"type": "worker", "index": 0}})
    )
    assert chief.is_chief and not worker0.is_chief and chief.workers == 3


def wait_for_workers(procs: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    """Wait for all workers; return their stderr (written to ``logs``). A worker that fails
    leaves its peers waiting for it forever, so the first failure (or the time limit) stops
    them all, and the test reports what every worker said."""
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.returncode not in (None, 0) for p in procs):
            break
        time.sleep(0.5)
    stopped = [p for p in procs if p.poll() is None]
    for proc in stopped:
        proc.kill()
    for proc in procs:
        proc.wait()
    errors = [log.read_text() for log in logs]
    if stopped:
        said = "\n".join(f"worker {i}: {err[-2000:]}" for i, err in enumerate(errors))
        pytest.fail(f"{len(stopped)} worker(s) stopped (failure or {TIMEOUT_S} s):\n{said}")
    return errors


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.slow
def test_two_workers_on_loopback(prepared, tiny_mirror, workdir, tmp_path):
    """Two processes, one chief: one run, one model, nothing from the other worker."""
    sha = tiny_mirror[1]
    other = tmp_path / "worker1"  # the second machine: its own copy of the processed data
    shutil.copytree(workdir / "data/processed", other / "data/processed")
    other_tmp = tmp_path / "worker1-tmp"
    other_tmp.mkdir()
    before = files_under(other)
    ports: list[int] = []
    while len(ports) < 2:  # two distinct ports, even if the OS hands one out twice
        if (port := free_port()) not in ports:
            ports.append(port)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    # The non-chief keeps Hydra's log and config copy off its disk (see the README).
    quiet = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    procs = []
    for index, (cwd, extra) in enumerate([(workdir, []), (other, quiet)]):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        }
        if index:
            env["TMPDIR"] = str(other_tmp)
        # stderr to a file: a pipe nobody reads while waiting could fill and block a worker.
        with (tmp_path / f"worker{index}.err").open("w") as err:
            procs.append(
                start_stage("train", cwd, env, *overrides(sha, "multi_worker"), *extra, stderr=err)
            )
    errors = wait_for_workers(procs, [tmp_path / f"worker{i}.err" for i in range(2)])
    for proc, err in zip(procs, errors, strict=True):
        assert proc.returncode == 0, err

    # Exactly one MLflow run, by the chief, and one model result.
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.stage = 'train'", output_format="list"
    )
    assert len(runs) == 1
    run = runs[0]
    run_ref = json.loads((workdir / "models/run.json").read_text())
    assert run.info.run_id == run_ref["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["train.strategy"] == "multi_worker"
    assert run.data.tags["distribute.workers"] == "2"
    assert run.data.tags["distribute.replicas"] == "2"
    assert run.data.metrics["epochs_run"] == EPOCHS
    assert (workdir / "reports/train_history.csv").exists()
    # The other worker left nothing behind: not a file in its folder or its temp folder.
    assert files_under(other) == before
    assert not any(other_tmp.iterdir())

    # The evaluate stage adds its metrics to the chief's run, as after any training.
    evaluate.evaluate(compose_config(overrides(sha, "multi_worker")))
    assert "test_accuracy" in mlflow.get_run(run.info.run_id).data.metrics

    two_workers = run_ref["train_metrics"]
    two_worker_weights = load_model(workdir / "models").get_weights()
    mirrored, mirrored_weights = train_in_process(sha, "mirrored")
    single, _ = train_in_process(sha, "single")
    print(
        f"train_accuracy: 2 workers {two_workers['train_accuracy']:.4f}, "
        f"mirrored {mirrored['train_accuracy']:.4f}, single {single['train_accuracy']:.4f}"
    )
    for key in ("train_accuracy", "fit_accuracy"):
        assert abs(two_workers[key] - mirrored[key]) <= VS_MIRRORED, key
    for a, b in zip(two_worker_weights, mirrored_weights, strict=True):
        np.testing.assert_allclose(a, b, atol=WEIGHTS_ATOL)
    assert abs(two_workers["train_accuracy"] - single["train_accuracy"]) <= VS_SINGLE
