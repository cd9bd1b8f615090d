"""Run folders: the one owner of a run's files. Everything that reads or writes a run goes through RunFolder.

runs/<YYYYmmdd-HHMMSS>-<model>/
    model.keras  labels.json  config.json  metrics.json  confusion_matrix.png
    history.pickle  history.json  training_log.csv  test_predictions.csv  logs/ (TensorBoard)
    openset.npz (the "none of these" check)  reliability.png (calibration, before and after)
    backup/ (only while training: what --resume continues from, see training/backup.py)
runs/latest -> the newest finished run

A run is *finished* when metrics.json (written last) exists and no backup is left; it is *resumable* when
it has a config.json and is not finished. `latest` means runs/latest, else the newest finished run.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import save_model_atomic, write_atomic, write_json, write_pickle
from .config import Workspace
from .errors import UserError

LATEST = "latest"
BACKUP = "backup"
BACKUP_STATE = "state.json"


class RunFolder:
    """One training run's folder: its files by name, what state it is in, and its contents read once."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunFolder) and self.path.resolve() == other.path.resolve()

    def __hash__(self) -> int:
        return hash(self.path.resolve())

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.path.parent.parent)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def model_path(self) -> Path:
        return self.path / "model.keras"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def backup_dir(self) -> Path:
        return self.path / BACKUP

    # What state it is in.

    @property
    def is_finished(self) -> bool:
        return (self.path / "metrics.json").is_file() and not (self.backup_dir / BACKUP_STATE).is_file()

    @property
    def is_resumable(self) -> bool:
        return (self.path / "config.json").is_file() and not self.is_finished

    # Finding runs.

    @classmethod
    def create(cls, workspace: Workspace, model_name: str) -> RunFolder:
        """A new, empty run folder; never reuses an existing one."""
        workspace.runs.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{model_name}"
        for attempt in range(1, 1000):
            path = workspace.runs / (stem if attempt == 1 else f"{stem}-{attempt}")
            try:
                path.mkdir()
                return cls(path)
            except FileExistsError:
                continue
        raise UserError(f"could not create a new run folder in {workspace.runs}")

    @staticmethod
    def all(workspace: Workspace) -> list[RunFolder]:
        """Every run folder, oldest first (the names start with their timestamp)."""
        if not workspace.runs.is_dir():
            return []
        return [
            RunFolder(path)
            for path in sorted(workspace.runs.iterdir(), key=lambda path: path.name)
            if path.is_dir() and not path.is_symlink() and (path / "config.json").is_file()
        ]

    @staticmethod
    def finished(workspace: Workspace) -> list[RunFolder]:
        return [run for run in RunFolder.all(workspace) if run.is_finished]

    @classmethod
    def find(cls, workspace: Workspace, name: str | Path = LATEST) -> RunFolder:
        """`latest`, a run folder name or a path -> a finished run, checked to be usable; else a clear error."""
        if str(name) == LATEST:
            link = workspace.latest_run
            finished = cls.finished(workspace)
            if link.is_dir() and cls(link).is_finished:
                return cls(link.resolve()).checked()
            if not finished:
                raise UserError(
                    f"no training run in {workspace.runs} yet; train one with scripts/machine_learning.py"
                )
            return finished[-1].checked()
        run = cls._named(workspace, name)
        if run is None:
            raise UserError(
                f"no run folder {name} (looked for config.json in {name} and in {workspace.runs / str(name)})"
            )
        if not run.is_finished:
            raise UserError(
                f"run {run.name} has not finished training; continue it with "
                f"python scripts/machine_learning.py --resume {run.name}, or use another run"
            )
        return run.checked()

    @classmethod
    def find_resumable(cls, workspace: Workspace, name: str | Path = LATEST) -> RunFolder:
        """`latest` (the newest unfinished run), a run folder name or a path -> the run to continue."""
        if str(name) == LATEST:
            unfinished = [run for run in cls.all(workspace) if run.is_resumable]
            if not unfinished:
                raise UserError(
                    f"no unfinished run in {workspace.runs} to resume; start one without --resume"
                )
            return cls(unfinished[-1].path.resolve())
        run = cls._named(workspace, name)
        if run is None:
            raise UserError(
                f"no run folder {name} to resume (looked in {workspace.runs}); use --resume latest or a folder name"
            )
        if run.is_finished:
            raise UserError(f"run {run.path} finished already; there is nothing to resume")
        return run

    @classmethod
    def _named(cls, workspace: Workspace, name: str | Path) -> RunFolder | None:
        for candidate in (Path(name), workspace.runs / str(name)):
            if (candidate / "config.json").is_file():
                return cls(candidate.resolve())
        return None

    def mark_latest(self) -> None:
        """Point runs/latest at this run (a relative symlink, replaced atomically)."""
        link = self.workspace.latest_run
        temporary = link.with_name(f".latest-{os.getpid()}")
        if temporary.is_symlink() or temporary.exists():
            temporary.unlink()
        temporary.symlink_to(self.name)
        os.replace(temporary, link)

    # Reading: each file once, on first use.

    def checked(self) -> RunFolder:
        """This run, after checking that what using it needs can be read (so bad input fails fast)."""
        try:
            _ = self.labels, self.image_size, self.resize
            if not self.model_path.is_file():
                raise FileNotFoundError(f"no {self.model_path.name}")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(
                f"run folder {self.path} is incomplete ({type(error).__name__}: {error}); train again with "
                "scripts/machine_learning.py"
            ) from None
        return self

    def read_json(self, name: str, missing: Any = None) -> Any:
        path = self.path / name
        if missing is not None and not path.is_file():
            return missing
        return json.loads(path.read_text(encoding="utf-8"))

    @cached_property
    def config(self) -> dict:
        return self.read_json("config.json", missing={})

    @cached_property
    def metrics(self) -> dict:
        return self.read_json("metrics.json", missing={})

    @cached_property
    def labels(self) -> list[str]:
        return list(self.read_json("labels.json"))

    @property
    def options(self) -> dict:
        return self.config.get("options", {})

    @property
    def image_size(self) -> int:
        return int(self.config["options"]["image_size"])

    @property
    def resize(self) -> str:
        from .preprocess import DEFAULT_RESIZE

        return str(self.options.get("resize", DEFAULT_RESIZE))

    @cached_property
    def history(self) -> dict[str, list[float]]:
        if (self.path / "history.pickle").is_file():
            with open(self.path / "history.pickle", "rb") as handle:
                history = pickle.load(handle)
        elif (self.path / "history.json").is_file():
            history = self.read_json("history.json")
        else:
            raise UserError(f"{self.path} has no history.pickle: the run did not finish training")
        return {key: [float(value) for value in values] for key, values in history.items()}

    @property
    def epochs(self) -> int:
        return len(self.history.get("loss", []))

    @property
    def best_epoch(self) -> int | None:
        """0-based epoch whose weights were kept; from metrics.json, else the lowest validation loss."""
        training = self.metrics.get("training") or {}
        if training.get("best_epoch") is not None:
            return int(training["best_epoch"])
        values = [value for value in self.history.get("val_loss", []) if math.isfinite(value)]
        return self.history["val_loss"].index(min(values)) if values else None

    @property
    def fine_tune_start(self) -> int | None:
        """0-based index of the first fine-tuning epoch, None when the run had one phase."""
        start = (self.metrics.get("training") or {}).get("fine_tune_start_epoch")
        return None if start is None else int(start)

    @property
    def title(self) -> str:
        model = (self.config.get("model") or {}).get("name") or self.options.get("model", "")
        text = f"{self.name} ({model})" if model and model not in self.name else self.name
        if "test_accuracy" in self.metrics:
            text += f": test accuracy {self.metrics['test_accuracy']:.1%}"
        return text

    def dataset(self, unchanged: bool = True):
        """The prepared arrays this run trained on, if they are still there (and `unchanged`); else a UserError.

        Pictures of the run need the very arrays it saw; a check that the export agrees with the model only
        needs photos prepared the same way, so it may pass unchanged=False.
        """
        from .dataset import load_dataset

        data = self.config.get("data") or {}
        if not data.get("dataset"):
            raise UserError(f"{self.path}/config.json names no prepared dataset")
        stored = Path(data["dataset"])
        # The stored path may be relative to another working folder or a container's /workspace.
        candidates = [stored, self.workspace.datasets / stored.name]
        for candidate in candidates:
            if (candidate / "dataset.json").is_file():
                dataset = load_dataset(candidate)
                if not unchanged or dataset.fingerprint == data.get("fingerprint"):
                    return dataset
                raise UserError(
                    f"the prepared dataset {candidate} changed since run {self.name} trained on it"
                )
        raise UserError(
            f"the run's prepared dataset is gone (looked in {' and '.join(map(str, candidates))})"
        )

    # Writing.

    def write_json(self, name: str, value: Any) -> Path:
        write_json(self.path / name, value)
        self.__dict__.pop(Path(name).stem, None)  # a cached read of it is stale now
        return self.path / name

    def write_bytes(self, name: str, data: bytes) -> Path:
        write_atomic(self.path / name, data)
        return self.path / name

    def write_arrays(self, name: str, **arrays) -> Path:
        """Named numpy arrays in one .npz file (openset.npz: the "none of these" check), written whole."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return self.write_bytes(name, buffer.getvalue())

    def read_arrays(self, name: str) -> dict | None:
        """The arrays of a .npz file of the run, or None when the run has none (made before it existed)."""
        path = self.path / name
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {key: stored[key] for key in stored.files}
        except (OSError, ValueError) as error:
            raise UserError(f"{path} cannot be read ({error}); train the run again") from None

    def write_history(self, history: dict[str, list[float]]) -> None:
        write_pickle(self.path / "history.pickle", history)
        self.write_json("history.json", history)

    def save_model(self, model) -> None:
        save_model_atomic(model, self.model_path)
