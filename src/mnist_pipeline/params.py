"""Compose ``conf/`` into ``params.yaml``, exactly as ``dvc exp run`` does.

``dvc repro`` never composes ``conf/``: it reads ``params.yaml`` as it stands. Run this
(``make params``) after editing ``conf/`` so both entry points see the same config; a test
fails when the two drift apart.

    python -m mnist_pipeline.params [override ...]   # e.g. train.epochs=10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from mnist_pipeline import files
from mnist_pipeline.config import load_config
from mnist_pipeline.errors import ConfigError, exit_on_error
from mnist_pipeline.project import CONF_DIR, PROJECT_ROOT


def compose_config(overrides: list[str] | None = None, config_dir: str = CONF_DIR) -> DictConfig:
    """conf/ composed with Hydra overrides, as a stage's ``@hydra.main`` would see it (for
    commands that are not Hydra apps: this one, ``register``)."""
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name="config", overrides=overrides or [])
    except HydraException as exc:  # an unknown group or key in the overrides
        # Hydra's message spans lines (the fix on the second): keep the error to one line.
        raise ConfigError(" ".join(str(exc).split())) from None


def compose_params(overrides: list[str] | None = None, config_dir: str = CONF_DIR) -> str:
    """The YAML text DVC would write: conf/ composed, interpolations resolved."""
    cfg = compose_config(overrides, config_dir)
    OmegaConf.resolve(cfg)
    load_config(cfg)  # refuse to write a params.yaml that the stages would reject
    return OmegaConf.to_yaml(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_pipeline.params",
        description="Compose conf/ into params.yaml, exactly as `dvc exp run` does.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.epochs=10")
    args = parser.parse_args(argv).overrides
    target = Path(PROJECT_ROOT) / "params.yaml"
    with exit_on_error(prefix="params.yaml not written: "):
        text = compose_params(args)
    files.write_bytes(target, text.encode())
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
