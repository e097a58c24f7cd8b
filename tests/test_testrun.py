"""The test run's start-up (``tools/testrun``): coverage traces ``src/`` and nothing it cannot
measure. Meaningful under ``make test`` only, where coverage starts in every process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.workspace import TESTRUN

PROBE = """
import sys
traced_at_start = sys.gettrace() is not None
import probe_library
print(traced_at_start, probe_library.TRACED, sys.gettrace() is not None)
"""


def traced(tmp_path: Path, *path: Path) -> list[str]:
    """Whether coverage traces: at start-up, while a library is first imported, after it."""
    library = tmp_path / "probe_library"  # a library importing its own parts relatively
    library.mkdir(exist_ok=True)
    (library / "__init__.py").write_text("from .part import TRACED\n")
    (library / "part.py").write_text("import sys\nTRACED = sys.gettrace() is not None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [TESTRUN, tmp_path, *path]))}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.split()


def test_coverage_traces_our_code_only(tmp_path):
    if not os.environ.get("COVERAGE_PROCESS_CONFIG"):
        pytest.skip("coverage is not measuring subprocesses (make test measures them)")
    # The project's own src/: traced, but not while a library is imported.
    assert traced(tmp_path) == ["True", "False", "True"]
    # A copy's src/ (a DVC stage in a project copy): nothing there is measured, no tracing.
    copy = tmp_path / "copy" / "src"
    (copy / "mnist_pipeline").mkdir(parents=True)
    (copy / "mnist_pipeline" / "__init__.py").write_text("")
    assert traced(tmp_path, copy) == ["False", "False", "False"]
