"""The two environments (docs/performance.md): .venv, where the stages run, holds MLflow's
client only, so `import tensorflow` does not load what the full `mlflow` brings; the full
`mlflow` (`mlflow ui`, `mlflow server`) has its own, .venv-mlflow, at the same version."""

import json
import os
import shutil
import subprocess
import sys

import mlflow
import pytest

from mnist_pipeline.core.project import PROJECT_ROOT
from tests.helpers.services import require_full_mlflow

#: What Keras imports when it finds it installed, and the full `mlflow` installs.
HEAVY = ("sklearn", "scipy", "matplotlib", "pyarrow", "flask")


def test_import_tensorflow_in_the_stages_environment_loads_none_of_the_ui_s_packages():
    script = (
        "import json, sys, tensorflow, keras, mlflow, mlflow.keras\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_the_full_mlflow_runs_from_its_own_environment_at_the_client_s_version():
    command = require_full_mlflow()
    assert command[0] != sys.executable
    done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # One store, two clients: the UI's MLflow must read the schema the stages' MLflow writes.
    assert done.stdout.split()[-1] == mlflow.__version__
    # And the stages' environment cannot serve the UI itself.
    assert subprocess.run([sys.executable, "-c", "import flask"], capture_output=True).returncode


@pytest.mark.parametrize("module", ["ui", "tracking_server"])
def test_without_the_full_mlflow_the_ui_and_server_say_how_to_install_it(tmp_path, module):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    args = {"ui": [], "tracking_server": ["--backend-store-uri", store]}[module]
    env = {
        **os.environ,
        "MNIST_MLFLOW_PYTHON": str(tmp_path / "no-such-env/bin/python"),
        "MLFLOW_TRACKING_URI": store,
    }
    done = subprocess.run(
        [sys.executable, "-m", f"mnist_pipeline.{module}", *args, "--port", "5999"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and "make ui" in lines[0] and "not found" in lines[0]


def test_make_test_builds_the_ui_s_environment_first(tmp_path):
    """A fresh clone has no .venv-mlflow: `make test` (CI) and `make ui` must build it."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    shutil.copy(PROJECT_ROOT / "Makefile", tmp_path / "Makefile")
    for name in ("pyproject.toml", "uv.lock"):
        (tmp_path / name).write_text("")
    (tmp_path / ".venv").mkdir()
    for stamp in (".synced", ".synced-all-extras"):
        (tmp_path / ".venv" / stamp).write_text("")
    for target in ("test", "ui", "server"):
        done = subprocess.run(
            ["make", "-n", target], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert "--only-group mlflow-server" in done.stdout, (target, done.stdout, done.stderr)


def test_a_new_lock_syncs_the_stages_environment_exactly_and_repairs_mlflow_s_files(tmp_path):
    """An older .venv holds the full mlflow: the exact sync removes it, and since mlflow and
    mlflow-skinny install the same files, that would delete the client's too (seen: `import
    mlflow` failed after the upgrade) unless the same sync reinstalls mlflow-skinny."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    shutil.copy(PROJECT_ROOT / "Makefile", tmp_path / "Makefile")
    for name in ("pyproject.toml", "uv.lock"):
        (tmp_path / name).write_text("")
    done = subprocess.run(
        ["make", "-n", "setup"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    sync = [line for line in done.stdout.splitlines() if " sync " in line]
    assert len(sync) == 1, done.stdout
    assert "--inexact" not in sync[0] and "--reinstall-package mlflow-skinny" in sync[0]
