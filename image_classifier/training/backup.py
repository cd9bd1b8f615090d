"""Resumable runs: the training state is saved after every epoch in <run>/backup/ and read back by --resume.

Each save writes a new folder backup/epoch-NNNN/ (the model's weights, the optimizer's variables and the
best weights so far), then atomically replaces backup/state.json, which names that folder, and only then
removes older folders. A process killed at any moment therefore leaves one complete state: at most the
epoch in progress is lost. Keras's own BackupAndRestore keeps weights and the epoch number only; a run
here also needs its history across two phases, the best checkpoint and the early-stopping counters.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_json
from ..errors import UserError
from ..runs import BACKUP_STATE, RunFolder

FINISHED = "finished"
"""state.phase after the last training epoch: only the final evaluation and files are left."""
LEGACY_PHASES = {1: None, 2: "fine_tune", 3: FINISHED}
"""Backups written before phases had names numbered them."""


@dataclass
class TrainingState:
    """Everything besides weights that an interrupted run needs to continue as if never stopped."""

    phase: str | None = None
    """The phase in progress (a name from training/phases.py); None before the first one starts."""
    phase_start: int = 0
    """The epoch the phase in progress started at."""
    epochs_done: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    fine_tune_start: int | None = None
    best: dict = field(default_factory=dict)
    early_stopping: dict = field(default_factory=dict)
    has_optimizer: bool = False
    seconds: float = 0.0
    folder: str | None = None

    def record(self, epoch: int, logs: dict) -> None:
        """Append one epoch's logs; keys first seen later (or missing now) are padded with NaN."""
        count = len(next(iter(self.history.values()), []))
        for key in logs:
            self.history.setdefault(key, [math.nan] * count)
        for key, values in self.history.items():
            values.append(float(logs.get(key, math.nan)))
        self.epochs_done = epoch + 1


def load_state(run: RunFolder) -> TrainingState:
    """The last saved state of `run`, or a fresh one when it stopped before its first epoch ended."""
    path = run.backup_dir / BACKUP_STATE
    if not path.is_file():
        return TrainingState()
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(saved.get("phase"), int):
            saved["phase"] = LEGACY_PHASES[saved["phase"]]
            saved["phase_start"] = saved.get("fine_tune_start") or 0 if saved["phase"] else 0
        return TrainingState(**saved)
    except (ValueError, TypeError, KeyError) as error:
        raise UserError(
            f"the backup {path} is unreadable ({error}); start the run again without --resume"
        ) from None


def training_log_csv(history: dict[str, list[float]]) -> bytes:
    """The history as CSVLogger would write it: an epoch column, then the metrics in name order."""
    keys = sorted(history)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["epoch", *keys])
    for epoch in range(len(next(iter(history.values()), []))):
        writer.writerow([epoch, *(repr(history[key][epoch]) for key in keys)])
    return buffer.getvalue().encode("utf-8")


class RunBackup:
    """Saves and restores a run's training state; `writes` is False on the non-chief workers."""

    def __init__(self, run: RunFolder, full_model, state: TrainingState, writes: bool = True):
        self.run = run
        self.full_model = full_model
        self.state = state
        self.writes = writes
        self.directory = run.backup_dir
        self._started = time.monotonic()
        self._seconds_before = state.seconds

    def elapsed(self) -> float:
        """Seconds of training in this process and in the ones before it that the run resumed from."""
        return self._seconds_before + time.monotonic() - self._started

    def save(self, checkpoint, optimizer=None, early_stopping=None) -> None:
        """Commit the current state: weights and optimizer in a new folder, then state.json naming it."""
        state = self.state
        state.best = checkpoint.state()
        state.early_stopping = early_stopping.state() if early_stopping is not None else {}
        state.has_optimizer = optimizer is not None
        state.seconds = self.elapsed()
        if not self.writes:
            return
        name = f"epoch-{state.epochs_done:04d}-{state.phase}"
        folder = self.directory / name
        partial = self.directory / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        self.full_model.save_weights(partial / "model.weights.h5")
        if optimizer is not None:
            np.savez(partial / "optimizer.npz", *[variable.numpy() for variable in optimizer.variables])
        best = checkpoint.best_weights
        if best is not None:
            np.savez(partial / "best.npz", *best)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        state.folder = name
        write_json(self.directory / BACKUP_STATE, asdict(state))
        self.run.write_bytes("training_log.csv", training_log_csv(state.history))
        for old in self.directory.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def restore_weights(self) -> None:
        """Load the saved model weights into the full model, when there are any yet."""
        folder = self._folder()
        if folder is not None:
            self.full_model.load_weights(folder / "model.weights.h5")

    def restore_optimizer(self, model, optimizer) -> None:
        """Rebuild `optimizer` for `model` and put its saved variables (step count, moments) back."""
        folder = self._folder()
        if folder is None or not self.state.has_optimizer:
            return
        values = _arrays(folder / "optimizer.npz")
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        variables = optimizer.variables
        if len(variables) != len(values):
            raise UserError(
                f"the backup in {folder} does not match this model ({len(values)} optimizer variables saved, "
                f"{len(variables)} now); start the run again without --resume"
            )
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)

    def best_weights(self) -> list[np.ndarray] | None:
        folder = self._folder()
        if folder is None or not (folder / "best.npz").is_file():
            return None
        return _arrays(folder / "best.npz")

    def remove(self) -> None:
        """The run finished: its final files replace the backup."""
        if self.writes:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _folder(self) -> Path | None:
        if not self.state.folder:
            return None
        folder = self.directory / self.state.folder
        if not folder.is_dir():
            raise UserError(f"the backup folder {folder} is missing; start the run again without --resume")
        return folder


def _arrays(path: Path) -> list[np.ndarray]:
    """The arrays np.savez(path, *arrays) wrote, in their order."""
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


class GracefulStop:
    """The first Ctrl-C (or SIGTERM, as `docker stop` sends) asks training to stop after the epoch in progress.

    A second Ctrl-C stops at once; the last finished epoch is still in the backup either way.
    """

    def __init__(self, print_fn=print):
        self.requested = False
        self.print_fn = print_fn
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.print_fn("\nStopping after this epoch, once it is saved (Ctrl-C again to stop now)...")

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError, OSError):
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
