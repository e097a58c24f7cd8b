"""Expected failures: these print one clear message and exit non-zero, never a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mnist_pipeline.core import diagnosis

#: Set to 1 to see the traceback of an expected failure (for reporting a bug).
DEBUG_ENV = "MNIST_PIPELINE_DEBUG"


class PipelineError(Exception):
    """A failure the user can act on (bad input, bad config, missing upstream output)."""


class ConfigError(PipelineError):
    """The configuration is invalid; the message names the key."""


class DataError(PipelineError):
    """Input data is missing, malformed or fails verification."""


@contextmanager
def exit_on_error(
    prefix: str = "",
    expected: tuple[type[BaseException], ...] = (PipelineError,),
    store: Callable[[], str] | None = None,
) -> Iterator[None]:
    """The one translation of expected failures for every command line entry point: the
    message as ``error: <prefix><message>`` on stderr and exit status 1.

    Expected are the ``expected`` types and the faults of the environment ``faults``
    recognises anywhere in an exception's chain (a full disk, a locked or corrupt store, no
    memory); ``store`` names the MLflow store in those lines. Anything else is a bug and keeps
    its traceback; ``MNIST_PIPELINE_DEBUG=1`` shows the traceback of expected failures too."""
    try:
        yield
    except Exception as exc:
        message = _message(exc, expected, store)
        if message is None or os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {prefix}{message}", file=sys.stderr)
        raise SystemExit(1) from None


def _message(
    exc: Exception,
    expected: tuple[type[BaseException], ...],
    store: Callable[[], str] | None,
) -> str | None:
    if isinstance(exc, expected) and isinstance(exc, PipelineError):
        return str(exc)
    fault = diagnosis.describe(exc, store() if store else "the MLflow store")
    if fault is None and isinstance(exc, expected):
        return str(exc)
    return fault
