"""Keras callbacks of the train stage (this module imports Keras: import it lazily)."""

from __future__ import annotations

import keras

from mnist_pipeline import tracking


class EpochLogger(keras.callbacks.Callback):
    """Sends each epoch's loss and accuracy to MLflow as it ends (step = epoch, from 1)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        tracking.log_metrics(logs or {}, step=epoch + 1)
