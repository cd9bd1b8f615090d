"""Small Keras callbacks, one cross-cutting concern each."""

from __future__ import annotations

import math
import time

from .runs import save_model_atomic
from .tf_env import import_keras

keras = import_keras()


class BestModelCheckpoint(keras.callbacks.Callback):
    """Save the full model whenever the monitored value improves, across both training phases.

    The first phase may train only the head on cached features; the full model shares the head's
    layers, so saving it there still captures the network as it would predict.
    """

    def __init__(self, full_model, path, monitor: str = "val_loss", mode: str = "min"):
        super().__init__()
        self.full_model = full_model
        self.path = path
        self.monitor = monitor
        self.sign = 1.0 if mode == "min" else -1.0
        self.best = math.inf
        self.best_epoch: int | None = None
        self.best_logs: dict = {}
        self._best_weights = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(value) or self.sign * value >= self.best:
            return
        self.best = self.sign * value
        self.best_epoch = epoch
        self.best_logs = {key: float(val) for key, val in (logs or {}).items()}
        self._best_weights = self.full_model.get_weights()
        save_model_atomic(self.full_model, self.path)

    def restore_best(self) -> None:
        if self._best_weights is not None:
            self.full_model.set_weights(self._best_weights)


class EpochTimer(keras.callbacks.Callback):
    """Adds the seconds each epoch took to the logs (and so to the history and TensorBoard)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["seconds"] = time.monotonic() - self._started  # TensorBoard shows it as epoch_seconds
