"""Shared test set-up: a private KERAS_HOME seeded with the shared MobileNetV2 weights, generated photos.

KERAS_HOME must be set before Keras is first imported, so it is set here at import time.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights" / "keras" / "models"
ANIMALS = SHARED / "datasets" / "animals10_sample"

_keras_home = Path(tempfile.mkdtemp(prefix="keras-home-"))
(_keras_home / "models").mkdir()
for weights_file in SHARED_WEIGHTS.glob("*.h5"):
    shutil.copy(weights_file, _keras_home / "models" / weights_file.name)
os.environ["KERAS_HOME"] = str(_keras_home)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.pop("WORKSPACE", None)
# A shell starts a background job (`cmd &`) with Ctrl-C ignored, and children inherit that through exec:
# Python then never raises KeyboardInterrupt, and the Ctrl-C tests' subprocesses would run to the end.
# A handled signal is reset to the default at exec, so catching it here gives every child a normal Ctrl-C.
signal.signal(signal.SIGINT, signal.default_int_handler)

COLOURS = [(200, 40, 40), (40, 60, 200), (40, 170, 60), (200, 180, 40)]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_keras_home, ignore_errors=True)


@pytest.fixture(scope="session")
def keras_home() -> Path:
    return _keras_home


def synthetic_photo(label: int, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """A noisy picture whose dominant colour and shape depend on the class, different every index."""
    rng = np.random.default_rng(label * 1000 + index)
    width, height = size or (int(rng.integers(60, 140)), int(rng.integers(60, 140)))
    base = np.array(COLOURS[label % len(COLOURS)], dtype=np.float64)
    image = rng.normal(0, 25, (height, width, 3)) + base
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4)
    radius = min(width, height) // 4
    if label % 2:
        mask = (np.abs(yy - cy) < radius) & (np.abs(xx - cx) < radius)
    else:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    image[mask] = 255 - base
    return np.clip(image, 0, 255).astype(np.uint8)


def make_image_folders(root: Path, counts: dict[str, int], fmt: str = "JPEG", first_index: int = 0) -> Path:
    """root/<category>/img_XX.jpg with `counts[category]` generated photos each."""
    from PIL import Image

    for label, (category, count) in enumerate(counts.items()):
        folder = root / category
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(first_index, first_index + count):
            suffix = ".jpg" if fmt == "JPEG" else f".{fmt.lower()}"
            Image.fromarray(synthetic_photo(label, index)).save(folder / f"img_{index:03d}{suffix}", fmt)
    return root


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Three small categories of 12 generated photos each."""
    return make_image_folders(tmp_path / "images", {"red": 12, "blue": 12, "green": 12})


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """Content hash and modification time of every file below root, to prove nothing was touched."""
    return {
        path.relative_to(root).as_posix(): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mtime_ns,
        )
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def run_script(script: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run a stage script the way a user does; returns the CompletedProcess (text output)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def logged_learning_rates(run: Path) -> list[float]:
    """The learning rate Keras's TensorBoard callback logged at each epoch's end, over every event file."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    rates: dict[int, float] = {}
    for path in sorted((run / "logs" / "train").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "epoch_learning_rate":
                    rates[event.step] = float(tensor_util.make_ndarray(value.tensor))
    return [rates[step] for step in sorted(rates)]


def cosine_rates(learning_rate: float, epochs: int) -> list[float]:
    """Keras's CosineDecay to 0 over `epochs` equal epochs, read at each epoch's end."""
    return [learning_rate * 0.5 * (1 + math.cos(math.pi * (epoch + 1) / epochs)) for epoch in range(epochs)]
