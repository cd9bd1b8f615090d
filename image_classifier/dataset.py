"""A prepared dataset on disk: what preprocessing writes and training reads.

datasets/<name>/
    dataset.json          options, fingerprint, counts per split and class
    labels.json           category names; the index is the class id
    manifest.csv          one row per source file: path, sha256, size, split, label, status, ...
    skipped.csv           files not used and why
    near_duplicates.csv   pairs of images that look alike (perceptual hash)
    <split>/x.npy         uint8, N x H x W x 3 (read memory-mapped, never loaded whole)
    <split>/y.npy         class ids
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .splits import SPLITS

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Dataset:
    path: Path
    labels: list[str]
    info: dict

    @property
    def image_size(self) -> int:
        return int(self.info["options"]["image_size"])

    @property
    def fingerprint(self) -> str:
        return str(self.info["fingerprint"])

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images (memory-mapped, read-only) and class ids of one split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        folder = self.path / split
        return np.load(folder / "x.npy", mmap_mode="r"), np.load(folder / "y.npy")

    def count(self, split: str) -> int:
        return int(self.info["counts"][split]["total"])

    def source_files(self, split: str) -> list[str]:
        """Source paths of a split's rows, in row order (for showing misclassified photos)."""
        import csv

        rows = []
        with open(self.path / "manifest.csv", newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row["split"] == split and row["status"] == "ok":
                    rows.append((int(row["index"]), row["path"]))
        return [path for _, path in sorted(rows)]


def load_dataset(path: Path) -> Dataset:
    try:
        info = json.loads((path / "dataset.json").read_text(encoding="utf-8"))
        labels = json.loads((path / "labels.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(
            f"{path} is not a complete prepared dataset ({error}); run scripts/preprocess.py again"
        ) from None
    return Dataset(path=path, labels=labels, info=info)
