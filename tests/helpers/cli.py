"""The project's commands run in this process, as ``python -m`` would run them.

A subprocess pays ``import tensorflow`` and MLflow (4-8 s on 2 cores) before the first line of
the command; in-process the imports are paid once per test session. The tests that check a
command's wiring (its exit status as the shell sees it, the filtered stderr) keep one real
subprocess each; everything else goes through here."""

from __future__ import annotations

import contextlib
import logging
import runpy
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator


def exit_code(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """A CLI's exit status as the shell sees it: ``main``'s return value, or the status of
    the ``SystemExit`` that the shared error helper (or argparse) raises."""
    try:
        return main(argv) or 0
    except SystemExit as exc:
        return _status(exc)


def run_module(module: str, *args: str) -> int:
    """``python -m mnist_pipeline.<module> args...`` in this process (Hydra stages too: they
    read ``sys.argv``); its exit status. Output goes to pytest's ``capsys``. Only for a call
    that ends in ``SystemExit`` (``--help``, a refusal): a command that succeeds ends its
    ``__main__`` block with ``exit_fast``, which would end pytest too; use ``run_app``."""
    try:
        with _argv(module, *args), warnings.catch_warnings():
            # runpy: the module is already imported as mnist_pipeline.<module>; running it
            # again as __main__ is what `python -m` does, and what is wanted here.
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(f"mnist_pipeline.{module}", run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exc:
        return _status(exc)


def run_app(main: Callable[[], object], *args: str) -> int:
    """A Hydra app (a ``@hydra.main`` function such as ``mnist_pipeline.pipeline.main``, a
    sweep with ``-m``) with ``args`` as its command line, in this process; its exit status.
    Succeeding or not: the command module's ``__main__`` block (Ctrl-C handlers, the fast
    exit) is not run, the one real subprocess per command checks that wiring."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # A stage's run_stage makes Ctrl-C and SIGTERM end its process at once: not pytest's.
    signals = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _argv("app", *args):
            main()
        return 0
    except SystemExit as exc:
        return _status(exc)
    finally:
        # Hydra's job logging (a console handler on pytest's capture, a file in the job's
        # folder) is the command's: later tests log as before.
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        for signum, handler in signals.items():
            signal.signal(signum, handler)


def app_result(capfd, main: Callable[[], object], *args: str) -> subprocess.CompletedProcess:
    """``run_app``'s status and output (pytest's ``capfd``: Python's streams and the file
    descriptors) as ``subprocess.run`` would give a real command's, so that one test reads
    either the same way."""
    capfd.readouterr()
    code = run_app(main, *args)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["app", *args], code, out, err)


@contextlib.contextmanager
def _argv(*argv: str) -> Iterator[None]:
    """``sys.argv`` as a command line would set it, restored afterwards."""
    saved = sys.argv
    sys.argv = list(argv)
    try:
        yield
    finally:
        sys.argv = saved


def _status(exc: SystemExit) -> int:
    """The shell's status for ``sys.exit(code)``: None is 0, a message is 1."""
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
