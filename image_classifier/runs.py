"""Run folders: create them, write into them atomically, find them and read what using them needs.

runs/<YYYYmmdd-HHMMSS>-<model>/
    model.keras  labels.json  config.json  metrics.json  confusion_matrix.png
    history.pickle  history.json  training_log.csv  test_predictions.csv  logs/ (TensorBoard)
    backup/ (only while training: what --resume continues from, see resume.py)
runs/latest -> the newest finished run
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Workspace
from .errors import UserError


def create_run(workspace: Workspace, model_name: str) -> Path:
    """A new, empty run folder; never reuses an existing one."""
    workspace.runs.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{model_name}"
    for attempt in range(1, 1000):
        path = workspace.runs / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run folder in {workspace.runs}")


def mark_latest(workspace: Workspace, run: Path) -> None:
    """Point runs/latest at `run` (a relative symlink, replaced atomically)."""
    link = workspace.latest_run
    temporary = link.with_name(f".latest-{os.getpid()}")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(run.name)
    os.replace(temporary, link)


def resolve_run(workspace: Workspace, name: str | Path = "latest") -> Path:
    """`latest`, a run folder name, or a path -> the run folder; a clear error when there is none."""
    candidates = [Path(name), workspace.runs / str(name)]
    for candidate in candidates:
        if (candidate / "model.keras").is_file():
            return candidate.resolve()
    if str(name) == "latest":
        raise UserError(
            f"no training run in {workspace.runs} yet; train one with scripts/machine_learning.py"
        )
    raise UserError(f"no run folder {name} (looked for model.keras in {' and '.join(map(str, candidates))})")


@dataclass(frozen=True)
class TrainedRun:
    """What using a run needs from its folder, read without TensorFlow so bad input fails fast."""

    path: Path
    labels: list[str]
    image_size: int
    resize: str
    dataset: str | None

    @property
    def model_path(self) -> Path:
        return self.path / "model.keras"


def load_run(workspace: Workspace, name: str | Path = "latest") -> TrainedRun:
    """The run named like --run (latest, a folder name or a path), with its labels and input options."""
    path = resolve_run(workspace, name)
    try:
        labels = json.loads((path / "labels.json").read_text(encoding="utf-8"))
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        options = config["options"]
        image_size, resize = int(options["image_size"]), str(options["resize"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"run folder {path} is incomplete ({type(error).__name__}: {error}); train again with "
            "scripts/machine_learning.py"
        ) from None
    dataset = config.get("data", {}).get("dataset")
    return TrainedRun(path=path, labels=list(labels), image_size=image_size, resize=resize, dataset=dataset)
