"""Keras callbacks of the train stage (this module imports Keras: import it lazily)."""

from __future__ import annotations

import logging

import keras

from mnist_pipeline import tracking

log = logging.getLogger("mnist_pipeline.stages.train")  # the stage's own log lines


class EpochLogger(keras.callbacks.Callback):
    """Sends each epoch's loss and accuracy to MLflow as it ends (step = epoch, from 1), and
    with ``echo`` (no progress bar: a log file) logs them as one line per epoch."""

    def __init__(self, epochs: int = 0, echo: bool = False) -> None:
        super().__init__()
        self.epochs, self.echo = epochs, echo

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        tracking.log_metrics(logs, step=epoch + 1)
        if self.echo:
            values = ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(logs.items()))
            log.info("epoch %d/%d: %s", epoch + 1, self.epochs, values)
