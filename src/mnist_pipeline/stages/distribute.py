"""``train.strategy``: training on every local device, or on several processes or machines.

``single`` keeps the plain Keras path untouched (bit-identical results). ``mirrored`` and
``multi_worker`` build the model under a ``tf.distribute`` strategy and feed it global batches
of ``train.batch_size`` that the strategy splits across replicas. Every worker trains; only the
chief writes outputs and logs to MLflow. After ``fit`` the chief copies the weights into a
plain, undistributed model: evaluating, saving and logging that copy involve no other worker
(on the distributed model, evaluate and predict are collective ops every worker must join),
so the other workers can simply exit, leaving no files behind.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from unittest import mock

from mnist_pipeline.core.errors import ConfigError, PipelineError

#: How long each collective op (a step's sum of gradients, the first copy of the weights) waits
#: for the other workers before the training fails, in seconds: TensorFlow's own default is
#: to wait for ever, so a worker whose host went silent (a cut link, a frozen machine) would
#: hang the others for good. A worker whose process died is noticed sooner (its host refuses
#: the connection). Long enough for the slowest worker's step and the workers' starts being
#: some seconds apart; ``MNIST_COLLECTIVE_TIMEOUT_S`` sets another (docs/operations.md).
COLLECTIVE_TIMEOUT_S = 60.0
COLLECTIVE_TIMEOUT_ENV = "MNIST_COLLECTIVE_TIMEOUT_S"

if TYPE_CHECKING:
    import keras
    import tensorflow as tf


@dataclass(frozen=True)
class Distribution:
    name: str
    #: None for ``single``: no strategy at all, not even the default one.
    strategy: tf.distribute.Strategy | None
    #: Whether this process writes outputs and logs to MLflow.
    chief: bool
    workers: int
    replicas: int

    def scope(self) -> AbstractContextManager:
        return nullcontext() if self.strategy is None else self.strategy.scope()

    def steps_per_execution(self, configured: int) -> int:
        """``train.steps_per_execution``, except 1 for multi_worker: Keras 3 runs several
        steps in one ``tf.while_loop`` whose collective ops TensorFlow 2.21 then fails to run
        ("You must feed a value for placeholder tensor ..."). Speed only, as always."""
        return 1 if self.name == "multi_worker" else configured


@dataclass(frozen=True)
class ClusterTask:
    """This process's place in a multi-worker cluster, as TF_CONFIG describes it."""

    task_type: str
    task_index: int
    #: Training processes in the cluster (the chief, if named, and the workers).
    workers: int
    #: The one process that writes outputs and logs to MLflow: the ``chief`` task if the
    #: cluster names one, else worker 0 (TensorFlow's own rule).
    is_chief: bool


def cluster_task(tf_config: str | None) -> ClusterTask:
    """Parse and check ``TF_CONFIG`` for ``train.strategy=multi_worker``.

    Checked before TensorFlow sees it: a bad TF_CONFIG otherwise fails deep inside
    the strategy, or waits for peers that will never come. It is checked by the train stage
    only, not by ``load_config``: composing params.yaml and the other stages never need it.
    """
    where = "train.strategy=multi_worker needs TF_CONFIG"
    if not tf_config:
        raise ConfigError(
            f"{where} (the cluster and this process's task), which is not set; e.g. "
            'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}\''
        )
    try:
        spec = json.loads(tf_config)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} to be JSON: {exc}") from None
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    task = spec.get("task") if isinstance(spec, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ConfigError(f"{where} to have a 'cluster' and a 'task' object, got {tf_config!r}")
    for job, addresses in cluster.items():
        if job not in ("chief", "worker"):
            raise ConfigError(f"{where}: only 'chief' and 'worker' jobs are supported, got {job!r}")
        if not (
            isinstance(addresses, list) and addresses and all(":" in str(a) for a in addresses)
        ):
            raise ConfigError(
                f"{where}: cluster.{job} must be a list of host:port, got {addresses!r}"
            )
    if not cluster or len(cluster.get("chief", [])) > 1:
        raise ConfigError(f"{where}: a cluster of workers and at most one chief, got {cluster!r}")
    task_type, index = task.get("type"), task.get("index")
    if (
        task_type not in cluster
        or not isinstance(index, int)
        or not 0 <= index < len(cluster[task_type])
    ):
        raise ConfigError(f"{where}: task {task!r} is not in the cluster ({', '.join(cluster)})")
    is_chief = task_type == "chief" or ("chief" not in cluster and index == 0)
    return ClusterTask(task_type, index, sum(len(a) for a in cluster.values()), is_chief)


def _single() -> Distribution:
    return Distribution("single", None, chief=True, workers=1, replicas=1)


def _mirrored() -> Distribution:
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy()
    return Distribution("mirrored", strategy, True, 1, strategy.num_replicas_in_sync)


def _multi_worker() -> Distribution:
    import tensorflow as tf

    task = cluster_task(os.environ.get("TF_CONFIG"))
    timeout = collective_timeout(os.environ.get(COLLECTIVE_TIMEOUT_ENV))
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except RuntimeError as exc:  # "Collective ops must be configured at program startup"
        raise ConfigError(
            f"train.strategy=multi_worker needs a fresh process ({exc}): run the train stage "
            "on its own (python -m mnist_pipeline.train), not after other training in a process"
        ) from None
    return Distribution(
        "multi_worker", strategy, task.is_chief, task.workers, strategy.num_replicas_in_sync
    )


def collective_timeout(value: str | None) -> float:
    """``MNIST_COLLECTIVE_TIMEOUT_S`` (seconds, above 0), or the default when it is unset."""
    if not value:
        return COLLECTIVE_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ConfigError(f"{COLLECTIVE_TIMEOUT_ENV} must be seconds above 0, got {value!r}")
    return seconds


@contextmanager
def lost_workers_fail(dist: Distribution) -> Iterator[None]:
    """A multi-worker training whose peer is lost ends in one line instead of TensorFlow's
    traceback; whatever the chief had staged is dropped, so no model is published.

    TensorFlow notices in seconds: a peer whose process died refuses the connection; a peer
    whose host went silent (a cut link) stops the heartbeats of TensorFlow's coordination
    service (its default: 10 s without one), which aborts every worker's collective ops; the
    collective timeout (``COLLECTIVE_TIMEOUT_S``) is the backstop for a peer that is there but
    never joins the step."""
    if dist.name != "multi_worker":
        yield
        return
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as exc:
        raise PipelineError(
            f"multi-worker training stopped: {lost_peer(str(exc.message))} stopped answering "
            f"({type(exc).__name__}); nothing was published: start every worker again with "
            "the same TF_CONFIG"
        ) from exc


def lost_peer(message: str) -> str:
    """Which worker TensorFlow's error names: the address it could not reach, or the task
    the coordination service found unhealthy (its address from TF_CONFIG)."""
    address = re.search(r"ipv4:(\d+\.\d+\.\d+\.\d+:\d+)", message)
    if address:
        return f"worker {address.group(1)}"
    task = re.search(r"unhealthy[^/]*/job:(\w+)/replica:\d+/task:(\d+)", message)
    if task:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
        job, index = task.group(1), int(task.group(2))
        addresses = cluster.get(job, [])
        where = f" {addresses[index]}" if index < len(addresses) else ""
        return f"{job} {index}{where}"
    return "another worker (or the link to it)"


#: The set-up of each strategy the schema accepts (``config.STRATEGIES``, by name).
SETUPS: dict[str, Callable[[], Distribution]] = {
    "single": _single,
    "mirrored": _mirrored,
    "multi_worker": _multi_worker,
}


def setup(name: str) -> Distribution:
    """Create the strategy ``train.strategy`` names.

    Call it before any other TensorFlow op: MultiWorkerMirroredStrategy configures collective
    ops, which TensorFlow refuses once its runtime has started.
    """
    return SETUPS[name]()


def batches(
    x: tf.Tensor, y: tf.Tensor, batch_size: int, seed: int | None = None
) -> tf.data.Dataset:
    """Global batches of ``batch_size`` examples for a strategy to split across replicas,
    reshuffled each epoch when ``seed`` is given.

    The data are tensors in memory, not files, so sharding is by DATA: every worker runs the
    same pipeline and keeps its own share of each batch. The shuffle is seeded so that all
    workers draw the same order; unseeded, their shares would overlap and miss examples.
    """
    import tensorflow as tf

    count = int(x.shape[0])
    indices = tf.data.Dataset.range(count)
    if seed is not None:
        indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    dataset = indices.batch(batch_size).map(lambda i: (tf.gather(x, i), tf.gather(y, i)))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def local_copy(model: keras.Model, build: Callable[[], keras.Model]) -> keras.Model:
    """The trained weights and optimizer state in a new model outside any strategy, for the
    chief to evaluate, save and log on its own."""
    plain = build()
    plain.set_weights(model.get_weights())
    plain.optimizer.build(plain.trainable_variables)
    state: dict[str, Any] = {}
    model.optimizer.save_own_variables(state)
    plain.optimizer.load_own_variables(state)
    return plain


@contextmanager
def keras_multi_worker_fixes(model: keras.Model, dist: Distribution) -> Iterator[None]:
    """Work around two Keras 3 bugs that stop ``fit`` under
    MultiWorkerMirroredStrategy, for the duration of one ``fit``:

    - keras-team/keras#20585 (open): before training, Keras averages the first (x, y) batch
      across workers just to learn its shapes, with a ``strategy.reduce`` that cannot take a
      tuple ("Attempt to convert a value (PerReplica...)"). The shapes of this worker's own
      batch serve as well and need no other worker.
    - tensorflow/tensorflow#72388: each step's loss and metrics are averaged across workers
      with ``axis=0``, which fails on scalars ("Invalid reduction dimension 0 for input with
      0 dimensions"). Averaged with ``axis=None`` they are what Keras means: the mean over
      replicas, the same on every worker (so TerminateOnNaN stops all of them together).
    """
    if dist.name != "multi_worker":
        yield
        return
    import keras.src.backend.tensorflow.trainer as tf_trainer
    from keras import tree

    strategy = dist.strategy
    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction in ("auto", "mean"):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    def symbolic_build(iterator: Any = None, data_batch: Any = None) -> None:
        if iterator is not None:
            for _, _, batches_ in iterator:
                data_batch = next(batches_)
                break
            data_batch = tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0], data_batch
            )
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    with (
        mock.patch.object(tf_trainer, "reduce_per_replica", reduce_per_replica),
        mock.patch.object(model, "_maybe_symbolic_build", symbolic_build),
    ):
        yield
