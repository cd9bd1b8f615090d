"""Small real training runs shared by several test files, and what a finished run folder holds.

Only plain functions and constants live here: the session fixtures in conftest.py (`trained_runs`,
`cnn_run`, `animals_run`) call the functions, and pytest keeps each result for the whole session, so
every run is trained once however many test files ask for it. Test modules import from here, never
from one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conftest import ANIMALS, make_image_folders, synthetic_photo
from PIL import Image

from image_classifier.config import Workspace
from image_classifier.training.config import TrainConfig
from image_classifier.training.loop import train

RUN_FILES = {
    "model.keras",
    "labels.json",
    "config.json",
    "history.pickle",
    "history.json",
    "metrics.json",
    "confusion_matrix.png",
    "training_log.csv",
    "test_predictions.csv",
    "openset.npz",
    "reliability.png",
    "logs",
}
"""Everything a finished run folder holds (backup/ is gone once the run is complete)."""

CATEGORIES = ("red", "blue", "green")
PLANTED = ("test/red/looks_blue_0.jpg", "test/red/looks_blue_1.jpg")
"""Blue-looking photos filed under test/red: every run has misclassified test images to show."""


def quiet(*_args) -> None:
    pass


@dataclass(frozen=True)
class TrainedRuns:
    """Three runs in one workspace, for the reports, notebook and TensorBoard tests."""

    base: Path
    workspace: Workspace
    images: Path
    cnn: Path
    cnn_faster: Path
    transfer: Path

    @property
    def all(self) -> list[Path]:
        return [self.cnn, self.cnn_faster, self.transfer]


@dataclass(frozen=True)
class TrainedRun:
    """One run in its own workspace, for the prediction and export tests."""

    workspace: Workspace
    images: Path
    run: Path


def image_splits(root: Path) -> Path:
    """train/, validation/ and test/ folders (splits as given), three categories."""
    make_image_folders(root / "train", dict.fromkeys(CATEGORIES, 10))
    make_image_folders(root / "validation", dict.fromkeys(CATEGORIES, 3), first_index=100)
    make_image_folders(root / "test", dict.fromkeys(CATEGORIES, 3), first_index=200)
    for number, relative in enumerate(PLANTED):
        Image.fromarray(synthetic_photo(CATEGORIES.index("blue"), 300 + number)).save(root / relative)
    return root


def train_three_runs(base: Path) -> TrainedRuns:
    """Two cnn runs differing only in learning rate, then a mobilenet_v2 run with fine-tuning (the latest).

    The workspace is <base>/workspace, so a notebook run from <base>/notebook finds it as ../workspace.
    """
    workspace = Workspace(base / "workspace")
    images = image_splits(base / "images")
    common = {"categories": CATEGORIES, "images_dir": images, "workers": 1, "early_stopping": 0}
    cnn = train(TrainConfig(model="cnn", image_size=32, epochs=3, **common), workspace, print_fn=quiet)
    cnn_faster = train(
        TrainConfig(model="cnn", image_size=32, epochs=3, learning_rate=0.003, **common),
        workspace,
        print_fn=quiet,
    )
    transfer = train(
        TrainConfig(
            model="mobilenet_v2",
            image_size=96,
            epochs=2,
            fine_tune_epochs=1,
            fine_tune_layers=10,
            **common,
        ),
        workspace,
        print_fn=quiet,
    )
    return TrainedRuns(base, workspace, images, cnn, cnn_faster, transfer)


def train_cnn_run(base: Path) -> TrainedRun:
    """A tiny cnn at 32 px on three generated categories; its test split has two images per class."""
    images = make_image_folders(base / "images", {"red": 16, "blue": 16, "green": 16})
    workspace = Workspace(base / "workspace")
    config = TrainConfig(
        categories=("red", "blue", "green"),
        images_dir=images,
        model="cnn",
        image_size=32,
        epochs=2,
        workers=1,
    )
    return TrainedRun(workspace, images, train(config, workspace, print_fn=quiet))


def train_animals_run(base: Path) -> TrainedRun:
    """MobileNetV2 (the shared ImageNet weights) at 96 px on real photos of cats, dogs and horses."""
    workspace = Workspace(base / "workspace")
    config = TrainConfig(
        categories=("cat", "dog", "horse"),
        images_dir=ANIMALS,
        model="mobilenet_v2",
        image_size=96,
        epochs=5,
        workers=1,
    )
    return TrainedRun(workspace, ANIMALS, train(config, workspace, print_fn=quiet))
