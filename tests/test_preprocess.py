"""The preprocessing stage on generated folders: splits, dedupe, caching, bad input, untouched sources."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folders, run_script, synthetic_photo, tree_digest
from PIL import Image

from image_classifier.config import Workspace
from image_classifier.errors import UserError
from image_classifier.preprocess import PreprocessOptions, find_near_duplicates, prepare_dataset
from image_classifier.splits import SPLITS, SplitItem, assign_splits, parse_fractions


def options(images: Path, **overrides) -> PreprocessOptions:
    values = {"categories": ("red", "blue", "green"), "images_dir": images, "image_size": 32, "workers": 1}
    return PreprocessOptions(**{**values, **overrides})


def manifest(dataset_path: Path) -> list[dict]:
    with open(dataset_path / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_arrays_labels_and_stratified_split(images, tmp_path):
    dataset = prepare_dataset(options(images), Workspace(tmp_path / "ws"), print_fn=lambda *_: None)
    assert dataset.labels == ["red", "blue", "green"]
    total = 0
    for split in SPLITS:
        x, y = dataset.arrays(split)
        assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3) and len(x) == len(y)
        assert isinstance(x, np.memmap)
        assert sorted(set(y.tolist())) == [0, 1, 2], f"every class in {split}"
        total += len(y)
    assert total == 36
    assert dataset.info["counts"]["train"] == {"total": 30, "red": 10, "blue": 10, "green": 10}
    x, y = dataset.arrays("train")
    red = x[y == 0].reshape(-1, 3).mean(axis=0)
    assert red[0] > red[2] + 40, "red photos stay red: channels are RGB"


def with_comment(jpeg: bytes, text: bytes) -> bytes:
    """The same JPEG with a comment segment after its start marker, as a photo app's metadata edit leaves
    it: other bytes (another content hash), the very same pixels."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def plant_copies(images: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The same pictures again under other names: byte-for-byte copies filed under a later category, and
    copies with edited metadata in the same category. Returns (original, copy) pairs of each kind."""
    exact = []
    for index, (source, target) in enumerate((("red", "blue"), ("red", "green"), ("blue", "green")) * 2):
        original = f"{source}/img_{index:03d}.jpg"
        copy = f"{target}/from_{source}_{index:03d}.jpg"
        shutil.copy(images / original, images / copy)
        exact.append((original, copy))
    edited = []
    for category in ("red", "blue", "green"):
        for index in range(6, 12):
            original = f"{category}/img_{index:03d}.jpg"
            copy = f"{category}/img_{index:03d} (edited).jpg"
            (images / copy).write_bytes(with_comment((images / original).read_bytes(), b"edited"))
            edited.append((original, copy))
    return exact, edited


def test_no_image_is_in_two_splits_and_the_split_is_seeded(images, tmp_path):
    exact, edited = plant_copies(images)
    first = prepare_dataset(options(images), Workspace(tmp_path / "a"), print_fn=lambda *_: None)
    again = prepare_dataset(options(images), Workspace(tmp_path / "b"), print_fn=lambda *_: None)
    other = prepare_dataset(options(images, seed=7), Workspace(tmp_path / "c"), print_fn=lambda *_: None)
    rows = manifest(first.path)
    by_path = {row["path"]: row for row in rows}
    kept = [row for row in rows if row["status"] == "ok"]

    # a file copied into another category is dropped before splitting: its content is in the arrays once
    for original, copy in exact:
        assert by_path[original]["status"] == "ok"
        assert (
            by_path[copy]["status"] == "duplicate" and f"same file as {original}" in by_path[copy]["reason"]
        )
    assert len({row["sha256"] for row in kept}) == len(kept) == 36 + len(edited)
    # a copy with other metadata is a near-duplicate: found, and kept in its original's split
    with open(first.path / "near_duplicates.csv", newline="", encoding="utf-8") as handle:
        pairs = {frozenset((row["path"], row["looks_like"])) for row in csv.DictReader(handle)}
    for original, copy in edited:
        assert frozenset((original, copy)) in pairs
        assert by_path[copy]["split"] == by_path[original]["split"], (
            f"{copy} leaked out of {original}'s split"
        )
    assert {row["split"] for row in kept} == set(SPLITS)

    assert [r["split"] for r in rows] == [r["split"] for r in manifest(again.path)]
    assert [r["split"] for r in rows] != [r["split"] for r in manifest(other.path)]


def test_messy_files_are_skipped_with_reasons_and_sources_untouched(images, tmp_path):
    red = images / "red"
    (red / "page.jpg").write_text("<!DOCTYPE html><html>blocked</html>")
    (red / "empty.jpg").write_bytes(b"")
    (red / ".DS_Store").write_bytes(b"\0\0junk")
    (red / "Thumbs.db").write_bytes(b"junk")
    good = (red / "img_000.jpg").read_bytes()
    (red / "cut.jpg").write_bytes(good[: len(good) // 3])
    (red / "こんにちは 写真.png").write_bytes(b"")
    Image.fromarray(synthetic_photo(0, 99)).save(red / "こんにちは 写真.png")
    shutil.copy(images / "blue" / "img_000.jpg", red / "copied_from_blue.jpg")
    shutil.copy(red / "img_001.jpg", red / "img_001 copy.jpg")
    before = tree_digest(images)

    dataset = prepare_dataset(options(images), Workspace(tmp_path / "ws"), print_fn=lambda *_: None)

    assert tree_digest(images) == before
    rows = {row["path"]: row for row in manifest(dataset.path)}
    assert "red/.DS_Store" not in rows and "red/Thumbs.db" not in rows
    assert rows["red/page.jpg"]["status"] == "skipped" and "HTML" in rows["red/page.jpg"]["reason"]
    assert "empty" in rows["red/empty.jpg"]["reason"]
    assert "truncated" in rows["red/cut.jpg"]["reason"]
    assert rows["red/こんにちは 写真.png"]["status"] == "ok"
    assert {rows["red/img_001 copy.jpg"]["status"], rows["red/img_001.jpg"]["status"]} == {"ok", "duplicate"}
    assert rows["red/copied_from_blue.jpg"]["status"] == "ok", "kept in the first category listed"
    assert rows["blue/img_000.jpg"]["status"] == "duplicate"
    assert "category 'red'" in rows["blue/img_000.jpg"]["reason"]
    with open(dataset.path / "skipped.csv", newline="", encoding="utf-8") as handle:
        skipped = {row["path"] for row in csv.DictReader(handle)}
    assert {"red/page.jpg", "red/empty.jpg", "red/cut.jpg", "blue/img_000.jpg"} <= skipped
    assert (
        dataset.info["counts"]["train"]["red"]
        + dataset.info["counts"]["test"]["red"]
        + dataset.info["counts"]["validation"]["red"]
        == 14
    )


def test_unchanged_folder_reuses_arrays_and_changed_files_are_the_only_ones_decoded(images, tmp_path):
    workspace = Workspace(tmp_path / "ws")
    first = prepare_dataset(options(images), workspace, print_fn=lambda *_: None)
    messages = []
    again = prepare_dataset(options(images), workspace, print_fn=messages.append)
    assert again.path == first.path and "reusing" in messages[0]

    Image.fromarray(synthetic_photo(1, 50)).save(images / "blue" / "new.jpg")
    (images / "green" / "img_000.jpg").unlink()
    updated = prepare_dataset(options(images), workspace, print_fn=lambda *_: None)
    assert updated.info["files"]["decoded"] == 1
    assert updated.info["files"]["reused"] == 35
    fresh = prepare_dataset(options(images), Workspace(tmp_path / "fresh"), print_fn=lambda *_: None)
    for split in SPLITS:
        assert np.array_equal(updated.arrays(split)[0], fresh.arrays(split)[0]), split
        assert np.array_equal(updated.arrays(split)[1], fresh.arrays(split)[1]), split


def test_parallel_workers_give_the_same_arrays(tmp_path):
    folders = make_image_folders(tmp_path / "images", {"red": 40, "blue": 40})
    opts = {"categories": ("red", "blue"), "images_dir": folders, "image_size": 24}
    serial = prepare_dataset(
        PreprocessOptions(**opts, workers=1), Workspace(tmp_path / "a"), print_fn=lambda *_: None
    )
    parallel = prepare_dataset(
        PreprocessOptions(**opts, workers=2), Workspace(tmp_path / "b"), print_fn=lambda *_: None
    )
    for split in SPLITS:
        assert np.array_equal(serial.arrays(split)[0], parallel.arrays(split)[0])


def test_given_splits_are_used_as_they_are(tmp_path):
    root = tmp_path / "images"
    for split, count, first in (("train", 8, 0), ("validation", 3, 100), ("test", 3, 200)):
        make_image_folders(root / split, {"cats": count, "dogs": count}, first_index=first)
    # the same photo in train and test is kept in test only
    shutil.copy(root / "test" / "cats" / "img_200.jpg", root / "train" / "cats" / "leak.jpg")
    dataset = prepare_dataset(
        PreprocessOptions(categories=("cats", "dogs"), images_dir=root, image_size=16, workers=1),
        Workspace(tmp_path / "ws"),
        print_fn=lambda *_: None,
    )
    assert dataset.info["splits_given"]
    counts = dataset.info["counts"]
    assert (counts["train"]["total"], counts["validation"]["total"], counts["test"]["total"]) == (16, 6, 6)
    rows = {row["path"]: row for row in manifest(dataset.path)}
    assert rows["train/cats/leak.jpg"]["status"] == "duplicate"


def test_near_duplicates_are_reported_and_removed_on_request(images, tmp_path):
    photo = Image.open(images / "red" / "img_002.jpg")
    photo.resize((photo.width // 2, photo.height // 2)).save(images / "red" / "smaller.jpg", quality=70)
    reported = prepare_dataset(options(images), Workspace(tmp_path / "a"), print_fn=lambda *_: None)
    with open(reported.path / "near_duplicates.csv", newline="") as handle:
        pairs = {frozenset((row["path"], row["looks_like"])) for row in csv.DictReader(handle)}
    assert frozenset(("red/img_002.jpg", "red/smaller.jpg")) in pairs
    rows = {row["path"]: row for row in manifest(reported.path)}
    assert rows["red/smaller.jpg"]["split"] == rows["red/img_002.jpg"]["split"], "look-alikes share a split"
    removed = prepare_dataset(
        options(images, dedupe="near"), Workspace(tmp_path / "b"), print_fn=lambda *_: None
    )
    rows = {row["path"]: row for row in manifest(removed.path)}
    assert {rows["red/smaller.jpg"]["status"], rows["red/img_002.jpg"]["status"]} == {"ok", "near-duplicate"}


def test_find_near_duplicates_counts_bits():
    pairs = find_near_duplicates(["ffffffffffffffff", "fffffffffffffff0", "0000000000000000"], max_bits=4)
    assert pairs == [(0, 1, 4)]


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda root: shutil.rmtree(root / "green"), "no folder for category 'green'"),
        (lambda root: [p.unlink() for p in (root / "green").iterdir()], "is empty"),
        (lambda root: [p.unlink() for p in sorted((root / "green").iterdir())[3:]], "only 3 usable images"),
    ],
)
def test_bad_folders_stop_with_a_clear_message(images, tmp_path, setup, expected):
    setup(images)
    with pytest.raises(UserError, match=expected):
        prepare_dataset(options(images), Workspace(tmp_path / "ws"), print_fn=lambda *_: None)


def test_missing_images_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare_dataset(options(tmp_path / "nowhere"), Workspace(tmp_path / "ws"), print_fn=lambda *_: None)


def test_split_assignment_is_stable_when_files_are_added():
    items = [SplitItem(label=i % 2, key=f"k{i}", group=i) for i in range(200)]
    before = assign_splits(items, (0.8, 0.1, 0.1), seed=0)
    after = assign_splits([*items, SplitItem(label=0, key="new", group=999)], (0.8, 0.1, 0.1), seed=0)
    moved = sum(a != b for a, b in zip(before, after, strict=False))
    assert moved <= 4
    assert before.count("test") == 20 and before.count("validation") == 20


def test_groups_stay_together():
    items = [SplitItem(label=0, key=f"k{i}", group=i // 4) for i in range(40)]
    result = assign_splits(items, (0.8, 0.1, 0.1), seed=3)
    for group in range(10):
        assert len({result[i] for i in range(40) if items[i].group == group}) == 1


def test_parse_fractions():
    assert parse_fractions("80,10,10") == pytest.approx((0.8, 0.1, 0.1))
    for bad in ("0.8,0.2", "a,b,c", "1,0,0", "-1,1,1"):
        with pytest.raises(ValueError):
            parse_fractions(bad)


def test_preprocess_script_prints_counts_and_reuses(images, tmp_path):
    result = run_script(
        "preprocess.py",
        "--categories",
        "red,blue,green",
        "--images-dir",
        str(images),
        "--image-size",
        "32",
        "--workspace",
        str(tmp_path / "ws"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "red" in result.stdout and "total" in result.stdout and "36" in result.stdout
    dataset_dirs = list((tmp_path / "ws" / "datasets").iterdir())
    assert len(dataset_dirs) == 1
    info = json.loads((dataset_dirs[0] / "dataset.json").read_text())
    assert info["options"]["image_size"] == 32
    os.utime(images / "red" / "img_000.jpg")
    again = run_script(
        "preprocess.py", "--categories", "red,blue,green", "--images-dir", str(images), "--image-size", "32",
        "--workspace", str(tmp_path / "ws"), cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0 and "1 decoded, 35 reused" in again.stdout
