"""Issue 14, class 5: two commands in one workspace never record a result under params it was
not made with. Through real DVC: a second ``dvc exp run -S`` rewriting params.yaml while the
first trains, an editor saving params.yaml during ``dvc repro``, and params.yaml edited
between train and evaluate: each fails loudly, and nothing records the wrong pairing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml

from mnist_pipeline.tracking.address import sqlite_path
from tests.helpers.config import edit_yaml
from tests.helpers.store import seed
from tests.helpers.workspace import tiny_dvc_project
from tools.workspace import git_commit

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

#: Long enough that a train run seen open is still training (about 2 s on tiny data; the run
#: is polled every 0.1 s): the training is paused there, so nothing depends on how fast the
#: machine is.
EPOCHS = 50


@pytest.fixture
def repo(tmp_path, tiny_mirror, store_template):
    repo, env = tiny_dvc_project(tmp_path, *tiny_mirror)
    seed(store_template, sqlite_path(env["MLFLOW_TRACKING_URI"]))
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    yield repo, env
    mlflow.set_tracking_uri(None)


def start(cmd: list[str], repo: Path, env: dict) -> subprocess.Popen:
    """``cmd`` in a process group of its own (DVC and the stage it runs), to pause together."""
    return subprocess.Popen(
        cmd,
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@contextlib.contextmanager
def paused_in_training(proc: subprocess.Popen) -> Iterator[None]:
    """Once a train run is open (the stage is past reading its params), stop ``proc`` and
    its stage (SIGSTOP) for the block, then let them go on: what the block does happens
    "during training" however fast the machine trains, with a short training."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if mlflow.search_runs(
            search_all_experiments=True,
            output_format="list",
            filter_string="tags.stage = 'train' and attributes.status = 'RUNNING'",
        ):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(proc.communicate()[0][-3000:])
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


def lock_stages(repo: Path) -> dict:
    lock = repo / "dvc.lock"
    return yaml.safe_load(lock.read_text())["stages"] if lock.exists() else {}


def test_a_second_exp_run_cannot_pair_its_params_with_the_firsts_result(repo):
    repo, env = repo
    first = start(["dvc", "exp", "run", "-S", f"train.epochs={EPOCHS}"], repo, env)
    with paused_in_training(first):
        second = subprocess.run(
            ["dvc", "exp", "run", "-S", "model.units=16"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    output = first.communicate(timeout=900)[0]
    # DVC's behaviour (3.x): the second applies -S to params.yaml, then fails on the lock.
    assert second.returncode != 0
    assert yaml.safe_load((repo / "params.yaml").read_text())["model"]["units"] == 16
    assert first.returncode != 0, output[-3000:]
    # (DVC composed the second's params from conf/: train.epochs is back to 1 there too)
    assert "params.yaml changed since this stage started (model.units: 32 -> 16" in output, output[
        -3000:
    ]
    assert "dvc exp run --queue" in output and "Traceback" not in output
    assert "train" not in lock_stages(repo)  # DVC recorded no result for these params
    assert not (repo / "models" / "model.keras").exists()
    shown = subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True
    ).stdout
    assert '"test_accuracy"' not in shown
    failed = mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string="tags.stage = 'train'"
    )
    assert [r.info.status for r in failed] == ["FAILED"]
    assert "params.yaml changed" in failed[0].data.tags["error"]


def test_params_edited_during_repro_or_before_evaluate_fail_loudly(repo):
    repo, env = repo
    # An editor saves params.yaml while `dvc repro` trains.
    params = repo / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("epochs: 1\n", f"epochs: {EPOCHS}\n"))
    git_commit(repo, env, "longer training")
    proc = start(["dvc", "repro"], repo, env)
    with paused_in_training(proc):
        edit_yaml(params, **{"optimizer.learning_rate": 0.5})
    output = proc.communicate(timeout=900)[0]
    assert proc.returncode != 0, output[-3000:]
    assert "params.yaml changed since this stage started (optimizer.learning_rate" in output, (
        output[-3000:]
    )
    assert "train" not in lock_stages(repo)

    # Train with what params.yaml says now, then change it before evaluate runs by hand.
    params.write_text(original)
    subprocess.run(["dvc", "repro", "train"], cwd=repo, env=env, check=True, capture_output=True)
    edit_yaml(params, **{"model.units": 64})
    evaluate = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnist_pipeline.evaluate",
            "--config-dir",
            ".",
            "--config-name",
            "params",
        ],
        cwd=repo,
        env={**env, "PYTHONPATH": str(repo / "src")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluate.returncode == 1
    last = evaluate.stderr.strip().splitlines()[-1]
    assert last.startswith("error: params.yaml changed since the model was trained")
    assert "model.units: 32 -> 64" in last
    assert not (repo / "reports" / "metrics.json").exists()
