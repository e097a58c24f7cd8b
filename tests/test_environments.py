"""One environment (docs/performance.md, "One environment"): .venv holds the full `mlflow`
(`mlflow ui`, `mlflow server`, `mlflow models serve`) and leaves out the four packages that
[tool.uv] override-dependencies drops, which Keras would import on every `import tensorflow`."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from mnist_pipeline.core.project import PROJECT_ROOT

#: What the full `mlflow` requires and Keras imports when it finds it installed.
LEFT_OUT = ("sklearn", "scipy", "matplotlib", "pyarrow")


def test_the_packages_left_out_are_not_installed_and_tensorflow_loads_none():
    assert [m for m in LEFT_OUT if importlib.util.find_spec(m) is not None] == []
    script = (
        "import json, sys, tensorflow, keras, mlflow, mlflow.keras\n"
        f"print(json.dumps([m for m in {LEFT_OUT!r} if m in sys.modules]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []


@pytest.mark.slow
def test_a_new_lock_syncs_the_environment_exactly_and_repairs_mlflow_s_files(tmp_path):
    """An exact sync removes what the lock no longer lists; mlflow and mlflow-skinny install
    the same files, so removing one would delete the other's (seen: `import mlflow` failed
    after an upgrade) unless the same sync reinstalls mlflow-skinny."""
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
