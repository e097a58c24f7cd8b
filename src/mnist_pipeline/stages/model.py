"""The network, built from config; the defaults are the book's Dense(512, relu) -> Dense(10)."""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

from mnist_pipeline.core.config import OPTIMIZERS, ModelConfig, OptimizerConfig
from mnist_pipeline.stages.artifacts import INPUT_DIM, NUM_CLASSES


def build_model(
    model_cfg: ModelConfig, optimizer_cfg: OptimizerConfig, steps_per_execution: int = 1
) -> keras.Model:
    """A compiled multilayer perceptron over flattened 28x28 images.

    ``steps_per_execution`` runs that many batches per call into TensorFlow's graph: fewer
    Python round trips, the same arithmetic in the same order, so the same weights."""
    regularizer = keras.regularizers.L2(model_cfg.l2) if model_cfg.l2 > 0 else None
    layers: list[keras.layers.Layer] = [keras.Input(shape=(INPUT_DIM,), name="pixels")]
    for _ in range(model_cfg.layers):
        layers.append(
            keras.layers.Dense(
                model_cfg.units, activation=model_cfg.activation, kernel_regularizer=regularizer
            )
        )
        if model_cfg.dropout > 0:
            layers.append(keras.layers.Dropout(model_cfg.dropout))
    layers.append(keras.layers.Dense(NUM_CLASSES, activation="softmax"))
    model = keras.Sequential(layers, name="mnist_mlp")
    model.compile(
        optimizer=build_optimizer(optimizer_cfg),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


def build_optimizer(cfg: OptimizerConfig) -> keras.optimizers.Optimizer:
    """The optimizer ``config.OPTIMIZERS`` registers under ``cfg.name``, with the settings it
    takes (unset ones keep Keras's defaults)."""
    spec = OPTIMIZERS[cfg.name]
    settings = {s: getattr(cfg, s) for s in spec.settings if getattr(cfg, s) is not None}
    return getattr(keras.optimizers, spec.keras_class)(learning_rate=cfg.learning_rate, **settings)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and the backend, and make TensorFlow ops deterministic.

    With these, the same params and data give the same weights, bit for bit, on one machine.
    """
    # Several models trained in one process (a sweep) make TensorFlow warn about
    # "retracing"; that is expected here, not a performance bug.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    keras.backend.clear_session()  # a fresh graph/name scope for each training in a process
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
