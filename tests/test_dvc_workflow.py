"""The everyday DVC workflow through the real `dvc` command, in a temporary git repository
holding the project with its outputs committed (as in a fresh clone after `make repro`):
bad config values break nothing, tables are readable, plots draw offline, provenance holds."""

import csv
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import mlflow
import pytest

from mnist_pipeline.core.project import PROJECT_ROOT
from mnist_pipeline.stages.artifacts import HEADLINE_METRICS
from tests.helpers.browser import draw
from tests.helpers.config import edit_yaml
from tests.helpers.processes import run_stage
from tests.helpers.workspace import copy_reproduced
from tools.workspace import git_commit

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

HEADLINE = set(HEADLINE_METRICS)


def make_variable(name: str) -> str:
    for line in (PROJECT_ROOT / "Makefile").read_text().splitlines():
        if line.startswith(f"{name} :="):
            return line.split(":=", 1)[1].strip()
    raise AssertionError(f"no {name} in the Makefile")


#: docs/failures.md's repair of a damaged file in DVC's cache: DVC re-hashes cache files that
#: are not read-only, drops a damaged one, and `dvc repro` re-runs the stages that need it.
REPAIR_CACHE = "chmod -R u+w .dvc/cache && dvc repro"
#: `make exps`: experiment, params that differ, headline metrics (all six in --csv/--json).
EXP_SHOW = ["dvc", "exp", "show", "--only-changed", "--drop", make_variable("EXP_SHOW_DROP")]


def dvc(args: list[str], repo: Path, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_mirror, reproduced_template):
    """A copy of the session's reproduced project (reports/ committed, as in the real
    repository), and what its first `dvc repro` printed."""
    folder = tmp_path_factory.mktemp("dvc workflow")  # a space
    repo, env = copy_reproduced(reproduced_template.folder, folder / "repo", tiny_mirror[0])
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the stages' own log settings, as a user gets them
    return repo, env, reproduced_template.output


def workspace_state(repo: Path, env: dict) -> tuple[str, str]:
    status = dvc(["git", "status", "--porcelain"], repo, env).stdout
    return status, dvc(["dvc", "status"], repo, env).stdout


def test_logs_are_quiet(project):
    """One line per epoch, no CUDA/NodeDef noise, no progress bar, no pip warning."""
    _, _, out = project
    assert "epoch 1/1: accuracy" in out
    noise_lines = ("cuInit", "NodeDef mentions", "Failed to resolve installed pip", "━")
    for noise in (*noise_lines, "Creating initial MLflow database tables"):
        assert noise not in out
    assert max(len(line) for line in out.splitlines()) < 300


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # a range, a rule across keys, a key that does not exist: types and the other ranges
        # are refused by the same composition (test_workflow_fast, in process)
        ("model.units=0", "model.units must be >= 1"),
        ("train.early_stopping_patience=3", "needs a validation set"),
        ("+train.epochz=3", "epochz"),
    ],
)
def test_bad_value_changes_nothing(project, override, message):
    repo, env, _ = project
    model = (repo / "models/model.keras").read_bytes()
    result = dvc(["dvc", "exp", "run", "-S", override], repo, env, ok=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Running stage" not in result.stdout
    status, dvc_status = workspace_state(repo, env)
    assert status == "", status
    assert "Data and pipelines are up to date" in dvc_status
    assert (repo / "models/model.keras").read_bytes() == model


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("sqlite://", "is an in-memory SQLite store"),
        ("http://127.0.0.1:{port}", "is not reachable"),
        ("databricks", "is a Databricks workspace"),
        ("mirror:/no/such/mnist", "MNIST_MIRROR='/no/such/mnist': no such folder"),
        ("mirror:ftp://127.0.0.1/mnist", "only https:// URLs, file:// URLs and local folders"),
    ],
)
def test_an_unusable_store_stops_dvc_before_any_output_goes(project, store, message):
    """`dvc repro -f` removes each stage's outputs before it runs the stage: the check stage,
    first, refuses a store the stages could not log to, or a mirror setting download could
    not use, so not one output is removed."""
    from mnist_pipeline.core.supervised import free_port

    repo, env, _ = project
    outputs = ("data/raw", "data/processed", "models", "reports")
    before = {p: sorted(f.name for f in (repo / p).iterdir()) for p in outputs}
    model = (repo / "models/model.keras").read_bytes()
    if store.startswith("mirror:"):
        bad = {**env, "MNIST_MIRROR": store.removeprefix("mirror:")}
    else:
        bad = {**env, "MLFLOW_TRACKING_URI": store.format(port=free_port())}
    result = dvc(["dvc", "repro", "-f"], repo, bad, ok=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Running stage 'download'" not in result.stdout
    assert {p: sorted(f.name for f in (repo / p).iterdir()) for p in outputs} == before
    assert (repo / "models/model.keras").read_bytes() == model
    dvc(["git", "checkout", "dvc.lock"], repo, env)  # what a failed check may have rewritten
    assert "Data and pipelines are up to date" in dvc(["dvc", "status"], repo, env).stdout


def test_a_queued_sweep_stops_at_its_bad_value(project):
    """`dvc exp run --queue -S model.units=16,0`: DVC composes one combination at a time;
    the bad one is refused, nothing runs, the workspace is as it was, and `dvc queue remove
    --all` drops what was queued (docs/dvc.md)."""
    repo, env, _ = project
    result = dvc(["dvc", "exp", "run", "--queue", "-S", "model.units=16,0"], repo, env, ok=False)
    assert result.returncode != 0
    assert "model.units must be >= 1, got 0" in result.stdout + result.stderr
    # The good combination before it was queued, and nothing ran.
    queued = dvc(["dvc", "queue", "status"], repo, env).stdout
    assert queued.count("Queued") == 1, queued
    dvc(["dvc", "queue", "remove", "--all"], repo, env)
    assert "Queued" not in dvc(["dvc", "queue", "status"], repo, env).stdout
    status, dvc_status = workspace_state(repo, env)
    assert status == "", status
    assert "Data and pipelines are up to date" in dvc_status


def test_a_bad_edit_of_conf_is_refused_by_make_params(project):
    """After editing conf/ by hand, `make params` (python -m mnist_pipeline.params) composes
    and checks it: a bad value is one line and params.yaml is left as it was."""
    repo, env, _ = project
    before = (repo / "params.yaml").read_bytes()
    edit_yaml(repo / "conf/model/mlp.yaml", units=0)
    try:
        # This project's code, as its dvc.yaml runs it.
        result = run_stage("params", repo, {**env, "PYTHONPATH": "src"})
    finally:
        subprocess.run(["git", "checkout", "conf/model/mlp.yaml"], cwd=repo, check=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "model.units must be >= 1, got 0" in result.stderr
    assert (repo / "params.yaml").read_bytes() == before


def test_hand_edited_params_stop_before_any_output_is_removed(project):
    repo, env, _ = project
    edit_yaml(repo / "params.yaml", **{"model.units": 0})
    result = dvc(["dvc", "repro"], repo, env, ok=False)
    assert result.returncode != 0
    assert "error: params.yaml: model.units must be >= 1, got 0" in result.stderr
    assert "Running stage 'train'" not in result.stdout
    assert (repo / "models/model.keras").exists() and (repo / "reports/metrics.json").exists()
    # The one documented command restores everything.
    dvc(["git", "checkout", "--", "params.yaml"], repo, env)
    status, dvc_status = workspace_state(repo, env)
    assert status == "" and "Data and pipelines are up to date" in dvc_status


def test_experiment_table_and_provenance(project):
    repo, env, _ = project
    ran = dvc(["dvc", "exp", "run", "-n", "two-epochs", "-S", "train.epochs=2"], repo, env).stdout
    # A param reruns only the stages that depend on it.
    assert "Running stage 'train'" in ran and "Running stage 'evaluate'" in ran
    assert "Running stage 'download'" not in ran and "Running stage 'preprocess'" not in ran
    shown = json.loads(dvc(["dvc", "exp", "show", "--json"], repo, env).stdout)
    (data,) = [
        e["revs"][0]["data"]
        for commit in shown
        for e in commit.get("experiments") or []
        if e["revs"][0]["name"] == "two-epochs"
    ]
    assert data["params"]["params.yaml"]["data"]["train"]["epochs"] == 2
    assert "test_accuracy" in data["metrics"]["reports/metrics.json"]["data"]

    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert set(metrics) == HEADLINE

    # All headline metrics, and nothing else, are DVC metrics.
    every = dvc(["dvc", "exp", "show", "--csv"], repo, env).stdout
    header = next(csv.reader(io.StringIO(every)))
    assert set(header) >= HEADLINE
    assert not [c for c in header if "class" in c or "count" in c or "pixel" in c]
    # `make exps`: the name, the param that differs, the headline numbers.
    table = dvc([*EXP_SHOW, "--csv"], repo, env).stdout
    header = next(csv.reader(io.StringIO(table)))
    assert header[:3] == ["Experiment", "rev", "typ"]
    expected = {"train_accuracy", "test_accuracy", "test_loss", "accuracy_gap", "train.epochs"}
    assert set(header[3:]) == expected, header
    wide = dvc([*EXP_SHOW, "--no-pager"], repo, {**env, "COLUMNS": "120"}).stdout
    for column in ("two-epochs", *sorted(expected)):
        assert column in wide, wide
    assert max(len(line) for line in wide.splitlines()) <= 120, wide

    # Runs that DVC made (it removed and rewrote committed outputs) are not "dirty", and
    # `reproduce` runs at once, with no stash.
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [client.get_experiment_by_name("mnist").experiment_id],
        filter_string="params.`train.epochs` = '2' and tags.stage = 'train'",
    )
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert tags["git.dirty"] == "false"
    reproduced = dvc(
        [sys.executable, "-m", "mnist_pipeline.reproduce", runs[0].info.run_id], repo, env, ok=False
    )
    assert "uncommitted changes" not in reproduced.stderr
    assert reproduced.returncode == 0, reproduced.stdout + reproduced.stderr
    assert "identical" in reproduced.stdout


def test_plots_diff_overlays_the_experiments_curves(project):
    """`dvc plots diff HEAD <exp>`: both revisions' points in one training-curve plot (the
    linear template over train_history.csv), and both confusion matrices."""
    repo, env, _ = project
    shown = json.loads(
        dvc(["dvc", "plots", "diff", "HEAD", "two-epochs", "--json"], repo, env).stdout
    )
    assert not shown.get("errors"), shown["errors"]
    (accuracy,) = shown["data"]["Accuracy per epoch"]
    assert sorted(accuracy["revisions"]) == ["HEAD", "two-epochs"]
    points = accuracy["content"]["data"]["values"]
    epochs = {
        rev: sorted(int(p["epoch"]) for p in points if p["rev"] == rev and p["field"] == "accuracy")
        for rev in ("HEAD", "two-epochs")
    }
    assert epochs == {"HEAD": [1], "two-epochs": [1, 2]}
    assert {p["val_accuracy"] for p in points} == {"NaN"}  # no validation split: no line
    history = (repo / "reports/train_history.csv").read_text().splitlines()
    assert history[0] == "epoch,accuracy,loss,val_accuracy,val_loss"
    (confusion,) = shown["data"]["Test confusion matrix"]
    cells = confusion["content"]["data"]["values"]
    assert {c["rev"] for c in cells} == {"HEAD", "two-epochs"}
    test_size = len((repo / "reports/test_predictions.csv").read_text().splitlines()) - 1
    assert [sum(c["rev"] == rev for c in cells) for rev in ("HEAD", "two-epochs")] == [
        test_size
    ] * 2


def test_plots_page_opens_offline(project, tmp_path):
    """After `make setup`'s tools/plots_page.py, `dvc plots diff` writes a page that draws
    every chart with the network refused (DVC's own page loads Vega from a CDN)."""
    repo, env, _ = project
    dvc([sys.executable, str(PROJECT_ROOT / "tools/plots_page.py"), str(repo)], repo, env)
    out = tmp_path / "plots"
    dvc(["dvc", "plots", "diff", "HEAD", "two-epochs", "-o", str(out)], repo, env)
    page = (out / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and not re.search(r"<script[^>]+src=", page)
    charts, errors = draw(out / "index.html")
    assert errors == []
    assert charts == 3  # accuracy, loss, the confusion matrices


def test_a_killed_queue_worker_is_recovered_by_queue_kill(project):
    """`dvc queue start`'s worker killed (SIGKILL to its process group: the OOM killer, a
    closed session) while a queued experiment trains: `dvc queue status` still says Running
    (DVC 3.67 does not look at the process); `dvc queue kill <name>`, the documented
    recovery, makes it Failed, frees the queue, and leaves the workspace as it was."""
    repo, env, _ = project
    before = workspace_state(repo, env)  # the experiment test before applied its run here
    dvc(["dvc", "exp", "run", "--queue", "-n", "doomed", "-S", "train.epochs=100000"], repo, env)
    # The worker daemonizes and keeps whatever output it was given: none, or a pipe never ends.
    subprocess.run(
        ["dvc", "queue", "start"],
        cwd=repo,
        env=env,
        check=True,
        timeout=120,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("mnist").experiment_id
    training = "params.`train.epochs` = '100000' and attributes.status = 'RUNNING'"
    deadline = time.monotonic() + 180
    while not client.search_runs([experiment], filter_string=training):  # the kill point
        assert time.monotonic() < deadline, dvc(["dvc", "queue", "logs", "doomed"], repo, env)
        time.sleep(0.2)
    (info,) = (repo / ".dvc/tmp/exps/run").glob("*/*.json")  # DVC's record of the executor
    os.killpg(os.getpgid(json.loads(info.read_text())["pid"]), signal.SIGKILL)

    assert "Running" in dvc(["dvc", "queue", "status"], repo, env).stdout  # not truthful
    dvc(["dvc", "queue", "kill", "doomed"], repo, env)
    status = dvc(["dvc", "queue", "status"], repo, env).stdout
    assert re.search(r"doomed\s+.*Failed", status) and "Running" not in status, status
    dvc(["dvc", "queue", "remove", "--all"], repo, env)
    assert workspace_state(repo, env) == before


# --- outputs changed behind DVC's back (issue 25, class 5); these run last: the damaged
# cache is repaired by re-running train, which leaves a new model (committed)

EVALUATE = [sys.executable, "-m", "mnist_pipeline.evaluate", "--config-dir", ".", "--config-name"]


def evaluate_by_hand(repo: Path, env: dict) -> str:
    """The evaluate stage as dvc.yaml runs it: it must refuse in one line and write nothing."""
    metrics = (repo / "reports/metrics.json").read_bytes()
    result = dvc([*EVALUATE, "params"], repo, {**env, "PYTHONPATH": "src"}, ok=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert (repo / "reports/metrics.json").read_bytes() == metrics  # no metric from it
    return errors[0]


def edit_model_config(path: Path) -> None:
    """A hand edit that still loads: the output layer's softmax made linear."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["config.json"] = members["config.json"].replace(b'"softmax"', b'"linear"')
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.mark.parametrize(
    ("path", "change", "message"),
    [
        ("models/model.keras", "edit", "is not the model the train stage saved"),
        ("data/processed/y_test.npy", "replace", "is not what the preprocess stage wrote"),
        ("data/processed/x_test.npy", "truncate", "corrupt array file"),
    ],
)
def test_an_output_changed_behind_dvcs_back_is_refused(project, path, change, message):
    """evaluate run by hand refuses a model or an array changed after its stage wrote it
    (one line, no metric); DVC's own check sees it too; `dvc checkout --force` restores it."""
    import numpy as np

    repo, env, _ = project
    target = repo / path
    original = target.read_bytes()
    if change == "edit":
        edit_model_config(target)
    elif change == "replace":  # a valid array, other labels
        np.save(target, (np.load(target) + 1) % 10)
    else:
        target.write_bytes(original[: len(original) // 2])
    error = evaluate_by_hand(repo, env)
    folder = str(Path(path).parent)
    assert message in error and f"dvc checkout --force {folder}" in error, error
    assert "modified" in dvc(["dvc", "status"], repo, env).stdout
    dvc(["dvc", "checkout", "--force", folder], repo, env)
    assert target.read_bytes() == original
    assert "Data and pipelines are up to date" in dvc(["dvc", "status"], repo, env).stdout


def test_a_damaged_cache_copy_is_refused_and_repaired(project):
    """A file in .dvc/cache damaged in place (bit rot: DVC keeps its cache files read-only
    and trusts them without re-hashing) comes back with `dvc checkout` and `dvc status` sees
    nothing; evaluate refuses it; the documented repair makes DVC re-check its cache, drop
    the damaged file and re-run what needs it."""
    repo, env, _ = project
    model = repo / "models/model.keras"
    digest = hashlib.md5(model.read_bytes()).hexdigest()
    cached = repo / ".dvc/cache/files/md5" / digest[:2] / digest[2:]
    mode = cached.stat().st_mode
    cached.chmod(0o644)
    damaged = bytearray(cached.read_bytes())
    damaged[-64:] = bytes(64)  # same size, zeros at the end of the weights
    cached.write_bytes(bytes(damaged))
    cached.chmod(mode)
    model.unlink()
    dvc(["dvc", "checkout", "models"], repo, env)
    assert model.read_bytes() == damaged
    assert "Data and pipelines are up to date" in dvc(["dvc", "status"], repo, env).stdout
    error = evaluate_by_hand(repo, env)
    assert "is not the model the train stage saved" in error, error

    repair = dvc(["sh", "-c", REPAIR_CACHE], repo, env)
    assert "Running stage 'train'" in repair.stdout and "Running stage 'evaluate'" in repair.stdout
    assert not cached.exists() or hashlib.md5(cached.read_bytes()).hexdigest() == digest
    assert "Data and pipelines are up to date" in dvc(["dvc", "status"], repo, env).stdout
    run = json.loads((repo / "models/run.json").read_text())
    assert hashlib.sha256(model.read_bytes()).hexdigest() == run["model_sha256"]
    git_commit(repo, env, message="the model retrained after the repair")
