"""The thin layer between a Hydra ``main`` and a stage function: validation and exit codes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from mnist_pipeline.config import PipelineConfig, load_config
from mnist_pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def run_stage(stage: Callable[[PipelineConfig], Any], cfg: DictConfig) -> Any:
    """Validate ``cfg`` and run ``stage`` on it.

    Expected failures (PipelineError) print one line to stderr and exit with status 1;
    anything else is a bug and keeps its traceback.
    """
    try:
        return stage(load_config(cfg))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
