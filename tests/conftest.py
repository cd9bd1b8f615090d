"""Shared test set-up: a private KERAS_HOME seeded with the shared MobileNetV2 weights, generated photos,
the trained runs several test files share (session fixtures), and the two ways tests use a script.

KERAS_HOME must be set before Keras is first imported, so it is set here at import time.

Scripts: `run_script` (or `script_command` for a process to start and watch) runs a stage in a new
Python process, the way a user does; `load_script` imports a script as a module, to call its functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

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


def script_command(script: str, *args: str, before: str = "") -> list[str]:
    """The command line that runs scripts/<script> with `args`; `before` is Python code run first in the
    same interpreter (to set up TensorFlow devices, say), then the script runs as __main__."""
    path = str(ROOT / "scripts" / script)
    if not before:
        return [sys.executable, path, *args]
    run_as_main = (
        "import runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return [sys.executable, "-c", f"{before}\n{run_as_main}\n", path, *args]


def run_script(
    script: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600, before: str = ""
) -> subprocess.CompletedProcess:
    """Run a stage script the way a user does; returns the CompletedProcess (text output)."""
    return subprocess.run(
        script_command(script, *args, before=before),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_script(script: str) -> ModuleType:
    """scripts/<script> imported as a fresh module (its `if __name__ == "__main__"` part does not run),
    to call its functions directly: `load_script("plot_history.py").main([...])`."""
    path = ROOT / "scripts" / (script if script.endswith(".py") else f"{script}.py")
    spec = importlib.util.spec_from_file_location(f"scripts_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Trained runs, each made once per session (pytest keeps a session fixture's value); the training code is
# in training_runs.py, imported only when a test asks, so tests that train nothing do not load TensorFlow.


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, keras_home):
    """Two cnn runs and a fine-tuned mobilenet_v2 run in one workspace (training_runs.TrainedRuns)."""
    from training_runs import train_three_runs

    return train_three_runs(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory):
    """A tiny cnn run on generated photos in its own workspace (training_runs.TrainedRun)."""
    from training_runs import train_cnn_run

    return train_cnn_run(tmp_path_factory.mktemp("cnn-run"))


@pytest.fixture(scope="session")
def animals_run(tmp_path_factory, keras_home):
    """A mobilenet_v2 run on the shared real photos of cats, dogs and horses (training_runs.TrainedRun)."""
    from training_runs import train_animals_run

    return train_animals_run(tmp_path_factory.mktemp("animals-run"))


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
