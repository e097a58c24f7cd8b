"""Configs as a stage sees them: conf/ composed with overrides and validated."""

from __future__ import annotations

from pathlib import Path

import yaml

from mnist_pipeline.core.config import PipelineConfig
from mnist_pipeline.core.params import pipeline_config


def sha_overrides(sha: dict[str, str]) -> list[str]:
    return [f"data.sha256.{key}={value}" for key, value in sha.items()]


def compose_config(overrides: list[str] | None = None) -> PipelineConfig:
    """conf/ composed with Hydra overrides and validated, as a stage would see it."""
    return pipeline_config(overrides)


def edit_yaml(path: Path, **values) -> None:
    """Set dotted keys in a YAML file, as a person editing params.yaml by hand would."""
    data = yaml.safe_load(path.read_text())
    for dotted, value in values.items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
