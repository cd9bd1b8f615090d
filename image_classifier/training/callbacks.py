"""Small Keras callbacks, one cross-cutting concern each."""

from __future__ import annotations

import math
import time

from ..atomic import save_model_atomic
from ..tf_env import import_keras

keras = import_keras()


class BestModelCheckpoint(keras.callbacks.Callback):
    """Save the full model whenever the monitored value improves, across both training phases.

    The first phase may train only the head on cached features; the full model shares the head's
    layers, so saving it there still captures the network as it would predict.
    """

    def __init__(self, full_model, path, monitor: str = "val_loss", mode: str = "min", writes: bool = True):
        super().__init__()
        self.full_model = full_model
        self.path = path
        self.writes = writes
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
        if self.writes:
            save_model_atomic(self.full_model, self.path)

    def restore_best(self) -> None:
        if self._best_weights is not None:
            self.full_model.set_weights(self._best_weights)

    @property
    def best_weights(self):
        return self._best_weights

    def state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_logs": self.best_logs}

    def load_state(self, state: dict, best_weights) -> None:
        """Continue a resumed run: the best so far, and its weights, as saved in the backup."""
        if state:
            self.best = state["best"]
            self.best_epoch = state["best_epoch"]
            self.best_logs = state["best_logs"]
            self._best_weights = best_weights


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose counters survive a resume (the best weights are BestModelCheckpoint's job)."""

    def __init__(self, patience: int, saved: dict | None = None):
        super().__init__(monitor="val_loss", patience=patience, restore_best_weights=False)
        self.saved = saved or {}

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.saved:
            self.wait = self.saved["wait"]
            self.best = self.saved["best"]
            self.best_epoch = self.saved["best_epoch"]

    def state(self) -> dict:
        return {
            "wait": self.wait,
            "best": None if self.best is None else float(self.best),
            "best_epoch": self.best_epoch,
            "stopped": bool(self.model.stop_training),
        }


class EpochBackup(keras.callbacks.Callback):
    """Records the epoch in the run's history and commits the backup; runs after every other callback.

    It is also where a requested stop (the first Ctrl-C) takes effect: right after the epoch is saved.
    """

    def __init__(self, backup, checkpoint, early_stopping=None, stop=None):
        super().__init__()
        self.backup = backup
        self.checkpoint = checkpoint
        self.early_stopping = early_stopping
        self.stop = stop

    def on_epoch_end(self, epoch, logs=None):
        self.backup.state.record(epoch, dict(logs or {}))
        self.backup.save(self.checkpoint, self.model.optimizer, self.early_stopping)
        if self.stop is not None and self.stop.requested:
            self.model.stop_training = True


class EpochTimer(keras.callbacks.Callback):
    """Adds the seconds each epoch took to the logs (and so to the history and TensorBoard)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["seconds"] = time.monotonic() - self._started  # TensorBoard shows it as epoch_seconds


class TimeLeft(keras.callbacks.Callback):
    """Says how long a slow phase will take: an estimate from its first batches, then the time left after
    each epoch. Quiet for phases under a minute (the head on cached features)."""

    WARM_UP_BATCHES = 3

    def __init__(
        self, print_fn, steps_per_epoch: int, first_epoch: int, last_epoch: int, min_seconds: float = 60
    ):
        super().__init__()
        self.print_fn, self.steps, self.min_seconds = print_fn, steps_per_epoch, min_seconds
        self.first_epoch, self.last_epoch = first_epoch, last_epoch
        self._batch_started: float | None = None
        self._phase_started = time.monotonic()
        self._estimated = False

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.WARM_UP_BATCHES:
            self._batch_started = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        if self._estimated or self._batch_started is None or batch < 2 * self.WARM_UP_BATCHES:
            return
        self._estimated = True
        per_batch = (time.monotonic() - self._batch_started) / (batch + 1 - self.WARM_UP_BATCHES)
        total = per_batch * self.steps * (self.last_epoch - self.first_epoch)
        if total >= self.min_seconds:
            self.print_fn(
                f"This phase will take about {_duration(total)} ({self.last_epoch - self.first_epoch} epochs of "
                f"{self.steps} steps at {per_batch:.2f} s a step; early stopping may end it sooner)"
            )

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1 - self.first_epoch
        elapsed = time.monotonic() - self._phase_started
        left = elapsed / max(done, 1) * (self.last_epoch - epoch - 1)
        if elapsed + left >= self.min_seconds and epoch + 1 < self.last_epoch:
            self.print_fn(f"Epoch {epoch + 1} of {self.last_epoch} done: about {_duration(left)} left")


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
