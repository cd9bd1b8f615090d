"""Where things live in the workspace, shared by every stage.

images/<category>/...          the photos (gather writes here, users may too)
datasets/<name>/               arrays made by preprocessing (one folder per data + options)
runs/<timestamp>-<model>/      one training run; runs/latest points at the newest
images/exclude.txt             photos left out by review (decisions.py); the files stay where they are
images/relabel.csv             photos used under another category (decisions.py)
images/review/                 what clean.py flagged: review.csv, review.html, decisions.csv
features/<name>/               backbone features computed from those arrays (features.py)
tuning/<timestamp>/            one hyperparameter search (tune.py): trials, best.json
engines/                       backbones converted for the fast CPU engines, once per machine (engines.py)
uploads/                       photos the server received, only with serve.py --keep-uploads
keras/                         KERAS_HOME inside the container, so downloaded weights survive
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKSPACE = "workspace"


def default_workspace() -> Path:
    """`$WORKSPACE` when set, else `./workspace`."""
    return Path(os.environ.get("WORKSPACE") or DEFAULT_WORKSPACE)


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def engines(self) -> Path:
        return self.root / "engines"

    @property
    def latest_run(self) -> Path:
        return self.runs / "latest"

    @property
    def tuning(self) -> Path:
        return self.root / "tuning"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"
