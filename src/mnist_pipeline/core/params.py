"""Compose ``conf/`` into ``params.yaml``, exactly as ``dvc exp run`` does; or check it.

``dvc repro`` never composes ``conf/``: it reads ``params.yaml`` as it stands. Run this
(``make params``) after editing ``conf/`` so both entry points see the same config.

    python -m mnist_pipeline.params [override ...]   # write params.yaml, e.g. train.epochs=10
    python -m mnist_pipeline.check                   # the `check` stage of dvc.yaml (check())

Writing reads conf/ and writes params.yaml atomically; nothing is written when the composed
config fails the schema (types, ranges, cross-field rules). ``check`` is the config half of
DVC's first stage (``stages/check.py``): it validates params.yaml (hand-edited, or composed by
`dvc exp run`) and conf/ before any other stage runs, so DVC never removes an output for a
config the stages would refuse.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mnist_pipeline.core import atomic
from mnist_pipeline.core.config import PipelineConfig, describe, flatten, load_config
from mnist_pipeline.core.errors import ConfigError, exit_on_error
from mnist_pipeline.core.project import CONF_DIR, PROJECT_ROOT

#: The check stage's output: constant content, so a passing check never re-runs anything.
CHECK_STAMP = "data/params.ok"


def compose_config(overrides: list[str] | None = None, config_dir: str = CONF_DIR) -> DictConfig:
    """conf/ composed with Hydra overrides, as a stage's ``@hydra.main`` would see it (for
    commands that are not Hydra apps: this one, ``register``)."""
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            return compose(config_name="config", overrides=overrides or [])
    except HydraException as exc:  # an unknown group or key, or a value the schema refuses
        raise ConfigError(describe(exc)) from None


def pipeline_config(overrides: list[str] | None = None) -> PipelineConfig:
    """conf/ composed with Hydra overrides and validated: the config a stage would run with,
    for code that is not a Hydra app (``register``, the tests)."""
    return load_config(compose_config(overrides))


def compose_params(overrides: list[str] | None = None, config_dir: str = CONF_DIR) -> str:
    """The YAML text DVC would write: conf/ composed, interpolations resolved."""
    cfg = compose_config(overrides, config_dir)
    load_config(cfg)  # refuse to write a params.yaml that the stages would reject
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def check(params: Path, conf: Path, stamp: Path) -> None:
    """Refuse an invalid params.yaml or conf/; on success write the (constant) stamp."""
    try:
        load_config(OmegaConf.load(params))
    except (OSError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{params}: {describe(exc)}") from None
    except ConfigError as exc:
        raise ConfigError(
            f"{params}: {exc} (fix it, or restore the committed one: git checkout {params})"
        ) from None
    try:
        composed = compose_params(config_dir=str(conf))
    except ConfigError as exc:
        raise ConfigError(f"{conf}/ does not compose: {exc}") from None
    if not os.environ.get("DVC_EXP_NAME") and OmegaConf.create(composed) != OmegaConf.load(params):
        print(
            f"note: {params} differs from {conf}/ composed; `dvc repro` uses {params}. "
            f"Run `make params` to use {conf}/ instead.",
            file=sys.stderr,
        )
    atomic.write_bytes(stamp, b"params.yaml and conf/ passed the schema checks\n")


#: The safe way to run experiments side by side, named in the guard's error.
SAFE_PATH = (
    "run experiments side by side with `dvc exp run --queue ...` then `dvc queue start`, "
    "or `dvc exp run --temp`: each gets its own copy of the workspace"
)


def params_file_in_use() -> Path | None:
    """``params.yaml`` when this process is a DVC stage reading it (``--config-name params``
    in the working folder), else None (an in-process run, a sweep job, a stage on conf/)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    path = Path(hydra_cfg.runtime.cwd) / "params.yaml"
    return path if hydra_cfg.job.config_name == "params" and path.is_file() else None


def read_sections(path: Path, sections: tuple[str, ...]) -> dict:
    data = OmegaConf.to_container(OmegaConf.load(path)) or {}
    return {key: data.get(key) for key in sections}


def _differences(then: dict, now: dict) -> str:
    a, b = flatten(then), flatten(now)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:5])


class ParamsGuard:
    """Two commands in one workspace (two ``dvc exp run -S``, an editor saving params.yaml)
    can rewrite params.yaml while a stage runs; DVC then records the result under params it
    was not made with. A stage takes a guard at its start and calls ``check`` before it puts
    its outputs in place: a change fails the stage, loudly, with nothing saved.

    ``sections``: the params the result depends on (the train stage's, from dvc.yaml)."""

    def __init__(self, sections: tuple[str, ...]) -> None:
        self.path = params_file_in_use()
        self.sections = sections
        self.values = None if self.path is None else read_sections(self.path, sections)

    def check(self, expected: dict | None = None, what: str = "this stage started") -> None:
        """Refuse if params.yaml no longer says what it said when ``what`` (``expected``:
        what it said then, when another stage recorded it)."""
        then = self.values if expected is None else expected
        if self.path is None or then is None:
            return
        now = read_sections(self.path, self.sections)
        if now != then:
            raise ConfigError(
                f"params.yaml changed since {what} ({_differences(then, now)}): another "
                "command in this workspace rewrote it, and DVC would record this result "
                f"under params it was not made with, so nothing was saved. To {SAFE_PATH}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_pipeline.params",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.epochs=10")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    target = Path(PROJECT_ROOT) / "params.yaml"
    with exit_on_error(prefix="params.yaml not written: "):
        text = compose_params(args.overrides)
    atomic.write_bytes(target, text.encode())
    print(f"wrote {target}")
    return 0
