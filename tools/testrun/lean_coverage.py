"""Coverage of ``src/`` in every process of ``make test`` (``patch = ["subprocess"]``), at
less cost. Coverage's trace function (Python 3.11: a C function called on every Python
call) sees the libraries' calls too, though it records only ``src/``'s lines: under it a
stage that imports TensorFlow and MLflow took 40 % more CPU (train: 7.3 s instead of 5.2),
and most of the suite's CPU is such processes. What is measured stays the same:

- A process that runs a project copy's code (a DVC stage in a copy ``tools.workspace``
  made, whose ``PYTHONPATH=src`` is the copy's) runs no file of the measured ``src/``:
  coverage records nothing there, so it is stopped at once.
- Elsewhere, the first import of a package that is not ours runs untraced: its files are
  outside ``src/``, and a library's import-time code never calls ours. An import of ours
  inside it (a plugin) is traced again.

Uses coverage's ``Collector.pause``/``resume`` (coverage 7.x, pinned in uv.lock): the same
calls coverage makes around its own work."""

from __future__ import annotations

import builtins
import importlib.util
import sys
import threading
from pathlib import Path

#: The top-level packages whose lines are measured (``[tool.coverage.run] source``) or whose
#: code may call them (the tests and tools).
OURS = frozenset({"mnist_pipeline", "hydra_plugins", "tests", "tools"})


def _runs_measured_code(cov: object) -> bool:
    """Whether this process's ``mnist_pipeline`` is the one under the measured ``source``."""
    spec = importlib.util.find_spec("mnist_pipeline")
    if spec is None or not spec.origin:
        return True  # not ours to judge: measure as configured
    origin = Path(spec.origin).resolve()
    return any(origin.is_relative_to(Path(s).resolve()) for s in cov.config.source or [])


def install() -> None:
    """Stop or lighten the coverage this process started with (if any)."""
    coverage = sys.modules.get("coverage")  # imported at start-up by coverage's .pth if on
    if coverage is None:
        return
    cov = coverage.Coverage.current()
    if cov is None or cov._collector is None:
        return
    if not _runs_measured_code(cov):
        cov.stop()
        return
    collector = cov._collector
    importing = builtins.__import__
    paused = False

    def lean_import(name, globals=None, locals=None, fromlist=(), level=0):
        nonlocal paused
        # A relative import belongs to the package that makes it (a library's own, often).
        package = (globals or {}).get("__package__") or "" if level else name
        top = package.partition(".")[0]
        ours = top in OURS
        if paused == ours and (ours or top not in sys.modules) and _one_thread(collector):
            # Not paused and a library's first import: pause. Paused and ours: trace it.
            (collector.resume if paused else collector.pause)()
            paused = not paused
            try:
                return importing(name, globals, locals, fromlist, level)
            finally:
                paused = not paused
                (collector.pause if paused else collector.resume)()
        return importing(name, globals, locals, fromlist, level)

    builtins.__import__ = lean_import


def _one_thread(collector) -> bool:
    """Pause and resume act on the calling thread's tracer: only while it is the only one,
    and only while this collector is the one tracing (pytest-cov starts another in pytest's
    own processes, which pauses this one)."""
    return (
        threading.current_thread() is threading.main_thread()
        and len(collector.tracers) == 1
        and type(collector)._collectors[-1:] == [collector]
    )
