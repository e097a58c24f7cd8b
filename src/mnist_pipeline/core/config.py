"""The configuration schema: one dataclass per config group, validated in one place.

Hydra composes ``conf/`` (or loads ``params.yaml``, the same tree already composed by DVC);
``load_config`` merges the result onto these dataclasses, so a misspelled key, a wrong type
or an out-of-range value fails before any work starts, with a message that names the key.

The same checks run when ``conf/`` is composed, in any process (DVC's own included, through
``src/hydra_plugins/mnist_schema.py``): ``conf/config.yaml`` lists the schema registered here
first in its defaults (types, unknown keys), and its ``schema`` key resolves through
``check_resolver`` (ranges, cross-field rules). So ``dvc exp run -S model.units=0`` stops
before DVC writes ``params.yaml`` or removes an output.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, NamedTuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from mnist_pipeline.core.errors import ConfigError


class Optimizer(NamedTuple):
    """An ``optimizer.name``: the Keras class it builds and the settings it takes."""

    keras_class: str
    #: ``OptimizerConfig`` fields besides ``learning_rate`` that this optimizer uses.
    settings: tuple[str, ...] = ()


#: The one registry of optimizers: the schema checks names and settings against it and
#: ``model.build_optimizer`` builds from it.
OPTIMIZERS = {
    "rmsprop": Optimizer("RMSprop"),
    "adam": Optimizer("Adam"),
    "sgd": Optimizer("SGD", ("momentum",)),
}
ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "elu")
#: ``train.strategy``: one process as always; every local device (MirroredStrategy); several
#: processes or machines described by TF_CONFIG (MultiWorkerMirroredStrategy). Each has its
#: set-up in ``stages.distribute.SETUPS``.
STRATEGIES = ("single", "mirrored", "multi_worker")
#: Bumped when the config's shape changes; params.yaml records the version it was made for.
SCHEMA_VERSION = 1
#: The OmegaConf resolver behind ``schema: ${mnist_schema:N}`` in conf/config.yaml.
RESOLVER = "mnist_schema"


def _check(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}, got {value!r}")


def _check_name(value: str, names: Collection[str], key: str) -> None:
    """A name must be one of a registry's keys (the registry is the one list of them)."""
    _check(value in names, key, f"must be one of {', '.join(names)}", value)


@dataclass
class Sha256Config:
    """SHA-256 of each file's *decompressed* content: honest mirrors may re-compress."""

    train_images: str = MISSING
    train_labels: str = MISSING
    test_images: str = MISSING
    test_labels: str = MISSING

    def check(self) -> None:
        for key, value in vars(self).items():
            ok = len(value) == 64 and all(c in "0123456789abcdef" for c in value)
            _check(ok, f"data.sha256.{key}", "must be 64 lowercase hex digits", value)


@dataclass
class DataConfig:
    sha256: Sha256Config = field(default_factory=Sha256Config)
    #: Fraction of the training set held out for validation (0 = none, as in the book).
    val_split: float = MISSING

    def check(self) -> None:
        _check(0.0 <= self.val_split < 1.0, "data.val_split", "must be in [0, 1)", self.val_split)


@dataclass
class ModelConfig:
    #: Number of hidden Dense layers and the width of each.
    layers: int = MISSING
    units: int = MISSING
    activation: str = MISSING
    dropout: float = MISSING
    l2: float = MISSING

    def check(self) -> None:
        _check(self.layers >= 1, "model.layers", "must be >= 1", self.layers)
        _check(self.units >= 1, "model.units", "must be >= 1", self.units)
        _check_name(self.activation, ACTIVATIONS, "model.activation")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)", self.dropout)
        _check(self.l2 >= 0.0, "model.l2", "must be >= 0", self.l2)


@dataclass
class OptimizerConfig:
    name: str = MISSING
    learning_rate: float = MISSING
    #: Only for optimizers that take it (sgd); absent from the others' config files.
    momentum: float | None = None

    def check(self) -> None:
        _check_name(self.name, OPTIMIZERS, "optimizer.name")
        _check(self.learning_rate > 0, "optimizer.learning_rate", "must be > 0", self.learning_rate)
        if self.momentum is not None:
            takers = [n for n, o in OPTIMIZERS.items() if "momentum" in o.settings]
            _check(
                self.name in takers,
                "optimizer.momentum",
                f"applies only to {', '.join(takers)}, not {self.name}",
                self.momentum,
            )
            _check(
                0.0 <= self.momentum < 1.0, "optimizer.momentum", "must be in [0, 1)", self.momentum
            )


@dataclass
class TrainConfig:
    epochs: int = MISSING
    #: The GLOBAL batch: examples per optimizer step across all replicas (each of R replicas
    #: gets batch_size / R), so results do not depend on how many devices share the work.
    batch_size: int = MISSING
    #: Stop when validation loss has not improved for this many epochs (0 = off; needs a split).
    early_stopping_patience: int = MISSING
    #: Batches per call into TensorFlow: speed only, results are identical (a test checks).
    steps_per_execution: int = MISSING
    #: A name in ``STRATEGIES``; ``single`` is the plain Keras path.
    strategy: str = MISSING

    def check(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be >= 1", self.epochs)
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        _check(
            self.early_stopping_patience >= 0,
            "train.early_stopping_patience",
            "must be >= 0",
            self.early_stopping_patience,
        )
        _check(
            self.steps_per_execution >= 1,
            "train.steps_per_execution",
            "must be >= 1",
            self.steps_per_execution,
        )
        _check_name(self.strategy, STRATEGIES, "train.strategy")


@dataclass
class TrackingConfig:
    #: MLflow experiment the runs go to. The store itself comes from MLFLOW_TRACKING_URI
    #: or the project's default; it is not a param, since it does not change results.
    experiment_name: str = MISSING


@dataclass
class RegistryConfig:
    """The model registry: the registered model and the rule that promotes a candidate to
    champion (``python -m mnist_pipeline.register --promote``). Defaults let configs composed
    before this group existed (an old params.yaml) still load."""

    model_name: str = "mnist"
    #: The candidate's test accuracy must exceed the champion's by more than this.
    min_improvement: float = 0.0
    #: ... and its train-test accuracy gap must be at most this.
    max_gap: float = 0.03

    def check(self) -> None:
        _check(bool(self.model_name.strip()), "registry.model_name", "must not be empty", "")
        _check(
            self.min_improvement >= 0,
            "registry.min_improvement",
            "must be >= 0",
            self.min_improvement,
        )
        _check(0 <= self.max_gap <= 1, "registry.max_gap", "must be in [0, 1]", self.max_gap)


@dataclass
class PathsConfig:
    """Where stages read and write, relative to the working directory (the repository root
    when DVC runs the stages; dvc.yaml interpolates these)."""

    raw: str = MISSING
    processed: str = MISSING
    models: str = MISSING
    reports: str = MISSING


@dataclass
class PipelineConfig:
    # The fields' order is params.yaml's, so `dvc exp show`'s: what people change comes right
    # after the metrics, the data's checksums and the plumbing after it.
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    #: The schema version ``params.yaml`` was composed for; in ``conf/`` it is
    #: ``${mnist_schema:N}``, which checks the whole composed config as it resolves.
    schema: int = SCHEMA_VERSION

    def check(self) -> None:
        _check(0 <= self.seed < 2**32, "seed", "must be between 0 and 2**32 - 1", self.seed)
        _check(
            self.schema == SCHEMA_VERSION,
            "schema",
            f"must be {SCHEMA_VERSION} (params.yaml is from another version: `make params`)",
            self.schema,
        )
        if self.train.early_stopping_patience > 0 and self.data.val_split == 0:
            raise ConfigError(
                "train.early_stopping_patience needs a validation set: set data.val_split > 0"
            )


def check_resolver(version: int, *, _root_: DictConfig) -> int:
    """Resolve ``${mnist_schema:N}``: check the whole config it sits in, return N.

    DVC resolves the composed config before it writes params.yaml; raising here is the one
    way to refuse a value out of range at that point (a structured config checks types only).
    """
    container = OmegaConf.to_container(_root_, resolve=False)
    container.pop("schema", None)  # resolving it again would recurse
    load_config({**container, "schema": version})
    return version


def stage_doc() -> str:
    """The running stage's module docstring, for ``--help`` (conf/hydra/help/stage.yaml):
    the module that defines ``__main__``'s ``main`` (``python -m mnist_pipeline.train`` runs
    a two-line module that calls ``mnist_pipeline.stages.train.main``)."""
    import sys

    command = sys.modules.get("__main__")
    owner = getattr(getattr(command, "main", None), "__module__", None)
    doc = (getattr(sys.modules.get(owner, command), "__doc__", None) or "").strip() + "\n"
    return doc.replace("$", "$$")  # Hydra fills the template with string.Template


ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, check_resolver)
if not OmegaConf.has_resolver("mnist_stage_doc"):
    OmegaConf.register_new_resolver("mnist_stage_doc", stage_doc)


def load_config(cfg: DictConfig | dict) -> PipelineConfig:
    """Validate a composed config against the schema and return it as dataclasses.

    Raises ConfigError naming the offending key for unknown keys, missing values, wrong types
    and values out of range.
    """
    schema = OmegaConf.structured(PipelineConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        config = OmegaConf.to_object(merged)
    except InterpolationResolutionError as exc:
        inner: BaseException | None = exc
        while inner is not None and not isinstance(inner, ConfigError):
            inner = inner.__cause__ or inner.__context__
        if inner is not None:  # from check_resolver: already clear
            raise ConfigError(str(inner)) from None
        raise ConfigError(f"invalid configuration: {str(exc).splitlines()[0]}") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc).splitlines()[0]
        where = f" (key: {key})" if key else ""
        raise ConfigError(f"invalid configuration{where}: {reason}") from None
    _check_ranges(config)
    return config


def describe(exc: BaseException) -> str:
    """One line for a failed composition: the innermost reason Hydra or OmegaConf gave
    (``Error merging override x=y`` alone does not say what is wrong with y)."""
    reasons = []
    while exc is not None:
        text = str(exc).splitlines()[0] if str(exc) else ""
        if text and text not in reasons:
            reasons.append(text)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if not reasons:
        return "invalid configuration"
    return reasons[0] if len(reasons) == 1 else f"{reasons[0]}: {reasons[-1]}"


def _check_ranges(node: Any) -> None:
    """Run every ``check`` method, innermost first (types are already right by then)."""
    if not is_dataclass(node):
        return
    for f in fields(node):
        _check_ranges(getattr(node, f.name))
    if hasattr(node, "check"):
        node.check()


def flatten(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as dotted keys (``model.units``), the form MLflow params and DVC use.
    Unset optional keys (``optimizer.momentum`` of an optimizer without one) are left out."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif node is not None:
            out[prefix[:-1]] = node

    walk(container, "")
    return out


def select(flat: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The entries of a flattened config at or under ``keys`` (as ``dvc.yaml`` lists params:
    ``seed``, ``data.val_split``, or a whole group like ``data.sha256``)."""
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in keys)}
