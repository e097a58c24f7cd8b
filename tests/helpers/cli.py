"""The project's commands run in this process, as ``python -m`` would run them.

A subprocess pays ``import tensorflow`` and MLflow (4-8 s on 2 cores) before the first line of
the command; in-process the imports are paid once per test session. The tests that check a
command's wiring (its exit status as the shell sees it, the filtered stderr) keep one real
subprocess each; everything else goes through here."""

from __future__ import annotations

import runpy
import sys
import warnings
from collections.abc import Callable


def exit_code(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """A CLI's exit status as the shell sees it: ``main``'s return value, or the status of
    the ``SystemExit`` that the shared error helper (or argparse) raises."""
    try:
        return main(argv) or 0
    except SystemExit as exc:
        return _status(exc)


def run_module(module: str, *args: str) -> int:
    """``python -m mnist_pipeline.<module> args...`` in this process (Hydra stages too: they
    read ``sys.argv``); its exit status. Output goes to pytest's ``capsys``."""
    saved = sys.argv
    sys.argv = [module, *args]
    try:
        with warnings.catch_warnings():
            # runpy: the module is already imported as mnist_pipeline.<module>; running it
            # again as __main__ is what `python -m` does, and what is wanted here.
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(f"mnist_pipeline.{module}", run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exc:
        return _status(exc)
    finally:
        sys.argv = saved


def _status(exc: SystemExit) -> int:
    """The shell's status for ``sys.exit(code)``: None is 0, a message is 1."""
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
