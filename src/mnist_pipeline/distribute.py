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

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mnist_pipeline.config import cluster_task
from mnist_pipeline.errors import ConfigError

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
        """``train.steps_per_execution``, except 1 for multi_worker: Keras 3.15 runs several
        steps in one ``tf.while_loop`` whose collective ops TensorFlow 2.21 then fails to run
        ("You must feed a value for placeholder tensor ..."). Speed only, as always."""
        return 1 if self.name == "multi_worker" else configured


def setup(name: str) -> Distribution:
    """Create the strategy ``train.strategy`` names.

    Call it before any other TensorFlow op: MultiWorkerMirroredStrategy configures collective
    ops, which TensorFlow refuses once its runtime has started.
    """
    if name == "single":
        return Distribution(name, None, chief=True, workers=1, replicas=1)
    import tensorflow as tf

    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
        return Distribution(name, strategy, True, 1, strategy.num_replicas_in_sync)
    task = cluster_task(os.environ.get("TF_CONFIG"))
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as exc:  # "Collective ops must be configured at program startup"
        raise ConfigError(
            f"train.strategy=multi_worker needs a fresh process ({exc}): run the train stage "
            "on its own (python -m mnist_pipeline.train), not after other training in a process"
        ) from None
    replicas = strategy.num_replicas_in_sync
    return Distribution(name, strategy, task.is_chief, task.workers, replicas)


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
    """Work around two Keras 3 bugs (3.15 still has them) that stop ``fit`` under
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
    from unittest import mock

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
