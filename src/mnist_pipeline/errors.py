"""Expected failures: these print one clear message and exit non-zero, never a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

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
    prefix: str = "", expected: tuple[type[BaseException], ...] = (PipelineError,)
) -> Iterator[None]:
    """The one translation of expected failures for every command line entry point: the
    message as ``error: <prefix><message>`` on stderr and exit status 1.

    Anything not ``expected`` is a bug and keeps its traceback; ``MNIST_PIPELINE_DEBUG=1``
    shows the traceback of expected failures too."""
    try:
        yield
    except expected as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {prefix}{exc}", file=sys.stderr)
        raise SystemExit(1) from None
