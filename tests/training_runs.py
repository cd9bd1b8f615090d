"""Small real training runs shared by the report, notebook and TensorBoard tests, trained once per session.

Each test file asks for them through its own session fixture calling `trained_runs`; the module-level
cache makes the three runs (about 30 s on two cores) happen once however many files use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conftest import make_image_folders, synthetic_photo
from PIL import Image

from image_classifier.config import Workspace
from image_classifier.train import TrainConfig, train

CATEGORIES = ("red", "blue", "green")
PLANTED = ("test/red/looks_blue_0.jpg", "test/red/looks_blue_1.jpg")
"""Blue-looking photos filed under test/red: every run has misclassified test images to show."""


@dataclass(frozen=True)
class TrainedRuns:
    base: Path
    workspace: Workspace
    images: Path
    cnn: Path
    cnn_faster: Path
    transfer: Path

    @property
    def all(self) -> list[Path]:
        return [self.cnn, self.cnn_faster, self.transfer]


_cache: dict[str, TrainedRuns] = {}


def image_splits(root: Path) -> Path:
    """train/, validation/ and test/ folders (splits as given), three categories."""
    make_image_folders(root / "train", dict.fromkeys(CATEGORIES, 10))
    make_image_folders(root / "validation", dict.fromkeys(CATEGORIES, 3), first_index=100)
    make_image_folders(root / "test", dict.fromkeys(CATEGORIES, 3), first_index=200)
    for number, relative in enumerate(PLANTED):
        Image.fromarray(synthetic_photo(CATEGORIES.index("blue"), 300 + number)).save(root / relative)
    return root


def trained_runs(tmp_path_factory) -> TrainedRuns:
    """Two cnn runs differing only in learning rate, then a mobilenet_v2 run with fine-tuning (the latest).

    The workspace is <base>/workspace, so a notebook run from <base>/notebook finds it as ../workspace.
    """
    if "runs" not in _cache:
        base = tmp_path_factory.mktemp("trained")
        workspace = Workspace(base / "workspace")
        images = image_splits(base / "images")
        common = {"categories": CATEGORIES, "images_dir": images, "workers": 1, "early_stopping": 0}
        quiet = {"print_fn": lambda *_: None}
        cnn = train(TrainConfig(model="cnn", image_size=32, epochs=3, **common), workspace, **quiet)
        cnn_faster = train(
            TrainConfig(model="cnn", image_size=32, epochs=3, learning_rate=0.003, **common),
            workspace,
            **quiet,
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
            **quiet,
        )
        _cache["runs"] = TrainedRuns(base, workspace, images, cnn, cnn_faster, transfer)
    return _cache["runs"]
