"""Review decisions: recorded beside the photos, honoured by preprocessing, never applied to the files."""

from __future__ import annotations

import pytest
from conftest import tree_digest

from image_classifier.config import Workspace
from image_classifier.decisions import read_decisions, record_decisions
from image_classifier.errors import UserError
from image_classifier.preprocess import PreprocessOptions, prepare_dataset


def test_excluded_and_relabeled_photos_are_honoured_and_the_sources_untouched(images, tmp_path):
    record_decisions(
        images, exclude={"red/img_000.jpg", "red/img_001.jpg"}, relabel={"blue/img_000.jpg": "green"}
    )
    before = tree_digest(images)
    options = PreprocessOptions(
        categories=("red", "blue", "green"), images_dir=images, image_size=32, workers=1
    )
    dataset = prepare_dataset(options, Workspace(tmp_path / "ws"), print_fn=lambda *_: None)
    counts = {
        c: sum(dataset.info["counts"][s][c] for s in ("train", "validation", "test")) for c in dataset.labels
    }
    assert counts == {"red": 10, "blue": 11, "green": 13}
    assert dataset.info["decisions"]["excluded"] == 2 and dataset.info["decisions"]["relabeled"] == 1
    assert tree_digest(images) == before
    used = {name for split in ("train", "validation", "test") for name in dataset.source_files(split)}
    assert not any(name.endswith("red/img_000.jpg") for name in used)


def test_recording_merges_and_undoes(images):
    record_decisions(images, exclude={"red/img_000.jpg"})
    record_decisions(images, relabel={"red/img_000.jpg": "blue"})
    decisions = read_decisions(images)
    assert decisions.excluded == frozenset() and decisions.relabeled == {"red/img_000.jpg": "blue"}
    record_decisions(images, keep={"red/img_000.jpg"})
    assert read_decisions(images).is_empty()


def test_a_path_outside_the_images_folder_is_refused(images):
    (images / "exclude.txt").write_text("../elsewhere.jpg\n")
    with pytest.raises(UserError, match="line 1"):
        read_decisions(images)
