"""Issue 14, class 9: no silent downgrade, no side effects from commands that fail or only
read: an https mirror redirecting to plain http is refused, read-only commands against a
missing store create nothing, and a failed ``reproduce`` leaves no temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mnist_pipeline.core.errors import DataError
from mnist_pipeline.stages.download import download
from tests.helpers.processes import run_stage


@pytest.mark.parametrize(
    ("status", "target"),
    [
        (301, "http://127.0.0.1:{port}/good/"),
        (302, "HTTP://127.0.0.1:{port}/good/"),
        (307, "http://127.0.0.1:{port}/good/"),
        (308, "ftp://127.0.0.1:{port}/good/"),
    ],
)
def test_a_redirect_away_from_https_is_refused(tiny_cfg, https_mirror, monkeypatch, status, target):
    https_mirror.redirect_to = target.format(port=https_mirror.port)
    monkeypatch.setenv("MNIST_MIRROR", https_mirror.url(f"redirect{status}"))
    with pytest.raises(DataError) as info:
        download(tiny_cfg)
    assert f"redirected ({status}) to" in str(info.value)
    assert "refused, only https:// is followed" in str(info.value)
    assert not any(Path(tiny_cfg.paths.raw).iterdir())
    assert https_mirror.requests["good"] == 0  # the plain-http target was never asked


def test_a_redirect_to_another_https_url_is_followed(tiny_cfg, https_mirror, monkeypatch):
    https_mirror.redirect_to = https_mirror.url("good")
    monkeypatch.setenv("MNIST_MIRROR", https_mirror.url("redirect302"))
    download(tiny_cfg)
    assert https_mirror.requests["good"] == 4
    assert len(list(Path(tiny_cfg.paths.raw).iterdir())) == 4


def command(module: str, *args: str, cwd: Path, uri: str, tmp: Path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TMPDIR": str(tmp)}
    return run_stage(module, cwd, env, *args, timeout=300)


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize(
    ("module", "args", "store"),
    [
        ("compare", (), "missing/folder/mlflow.db"),  # the folder does not exist
        ("compare", ("--experiment", "mnist"), "mlflow.db"),  # the folder exists, the file not
        ("reproduce", ("0123456789abcdef",), "missing/mlflow.db"),
    ],
)
def test_read_only_commands_create_no_store(tmp_path, module, args, store):
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    result = command(module, *args, cwd=work, uri=f"sqlite:///{work / store}", tmp=tmp)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no MLflow store at" in last, result.stderr
    assert "Traceback" not in result.stderr
    assert tree(work) == [] and tree(tmp) == []


@pytest.mark.slow
def test_failed_reproductions_leave_no_temporary_folder(tmp_path, tracking_store):
    """Three ways to fail after the store is found: an unknown run, a run of another stage,
    a run that recorded no commit. None may leave a ``reproduce-*`` folder behind."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.create_experiment("mnist")
    download_run = client.create_run(experiment, tags={"stage": "download"}).info.run_id
    train_run = client.create_run(
        experiment,
        tags={"stage": "train", "model_uri": "m", "uv.lock.sha256": "x", "git.commit": "unknown"},
    ).info.run_id
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    reasons = {
        "0123456789abcdef": "no run '0123456789abcdef'",
        download_run: "is a download run",
        train_run: "recorded no git commit",
    }
    for run_id, reason in reasons.items():
        result = command("reproduce", run_id, cwd=tmp_path, uri=tracking_store, tmp=tmp)
        assert result.returncode == 1
        assert reason in result.stderr.strip().splitlines()[-1], result.stderr
        assert "Traceback" not in result.stderr
        assert tree(tmp) == [], run_id
