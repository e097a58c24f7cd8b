"""Compose ``conf/`` into ``params.yaml``, exactly as ``dvc exp run`` does.

``dvc repro`` never composes ``conf/``: it reads ``params.yaml`` as it stands. Run this
(``make params``) after editing ``conf/`` so both entry points see the same config; a test
fails when the two drift apart.

    python -m mnist_pipeline.params [override ...]   # e.g. train.epochs=10
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from mnist_pipeline import files
from mnist_pipeline.config import CONF_DIR, PROJECT_ROOT, load_config
from mnist_pipeline.errors import PipelineError


def compose_params(overrides: list[str] | None = None, config_dir: str = CONF_DIR) -> str:
    """The YAML text DVC would write: conf/ composed, interpolations resolved."""
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides or [])
    OmegaConf.resolve(cfg)
    load_config(cfg)  # refuse to write a params.yaml that the stages would reject
    return OmegaConf.to_yaml(cfg)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(PROJECT_ROOT) / "params.yaml"
    try:
        text = compose_params(args)
    except (PipelineError, HydraException) as exc:
        print(f"error: params.yaml not written: {exc}", file=sys.stderr)
        return 1
    files.write_bytes(target, text.encode())
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
