"""Preprocessing throughput, side by side in one invocation (timings vary 2x between runs; ratios do not).

    python bench/preprocess_throughput.py [--images-dir ../shared/datasets/cats_and_dogs_small] [--image-size 160]

Compares, on the same files with a warm page cache:
- the project's preprocessing (all cores, hashing, dedupe and manifest included, no cache reuse);
- keras.utils.image_dataset_from_directory, iterating every batch;
- a plain single-process Pillow loop (open, RGB, resize);
- reading the project's arrays back through its tf.data pipeline, which is what each epoch after the
  first costs (image_dataset_from_directory decodes every photo again every epoch).
Target: the project's at least 2x image_dataset_from_directory on 2 cores. A second table adds up the data
time of whole trainings of 1 to 30 epochs for both ways, from the measured times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def class_folders(images_dir: Path) -> list[Path]:
    """Folders that hold one category's files (inside train/validation/test when those exist)."""
    roots = (
        [images_dir / s for s in ("train", "validation", "test")]
        if (images_dir / "train").is_dir()
        else [images_dir]
    )
    return [folder for root in roots for folder in sorted(root.iterdir()) if folder.is_dir()]


def files_of(images_dir: Path) -> list[Path]:
    return [
        path for folder in class_folders(images_dir) for path in sorted(folder.iterdir()) if path.is_file()
    ]


def warm_cache(files: list[Path]) -> None:
    for path in files:
        path.read_bytes()


def project(images_dir: Path, categories: tuple[str, ...], size: int, workspace: Path):
    from image_classifier.config import Workspace
    from image_classifier.preprocess import PreprocessOptions, prepare_dataset

    options = PreprocessOptions(
        categories=categories, images_dir=images_dir, image_size=size, resize="squash"
    )
    return prepare_dataset(options, Workspace(workspace), print_fn=lambda *_: None)


def read_arrays(dataset, batch_size: int = 32) -> int:
    """What every later epoch costs: batches from the memory-mapped arrays through the tf.data pipeline."""
    from image_classifier.pipeline import image_batches

    count = 0
    for split in ("train", "validation", "test"):
        x, y = dataset.arrays(split)
        for images, _ in image_batches(x, y, batch_size, shuffle=True):
            count += int(images.shape[0])
    return count


def keras_directory(images_dir: Path, size: int) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    roots = (
        [images_dir / s for s in ("train", "validation", "test")]
        if (images_dir / "train").is_dir()
        else [images_dir]
    )
    count = 0
    for root in roots:
        dataset = keras.utils.image_dataset_from_directory(
            root, image_size=(size, size), batch_size=32, shuffle=False, verbose=False
        )
        for images, _ in dataset:
            count += int(images.shape[0])
    return count


def pillow_loop(files: list[Path], size: int) -> int:
    for path in files:
        with Image.open(path) as image:
            np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images-dir", type=Path, default=ROOT.parent / "shared" / "datasets" / "cats_and_dogs_small"
    )
    parser.add_argument("--image-size", type=int, default=160)
    args = parser.parse_args()
    files = files_of(args.images_dir)
    categories = tuple(sorted({folder.name for folder in class_folders(args.images_dir)}))
    warm_cache(files)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras  # noqa: F401  (imported before any timing: a one-off start-up cost, not throughput)
    import tensorflow as tf

    tf.io.decode_jpeg(tf.io.read_file(str(files[0])))
    print(
        f"{len(files)} files in {args.images_dir}, to {args.image_size}x{args.image_size}, {os.cpu_count()} CPUs\n"
    )
    workspace = Path(tempfile.mkdtemp(prefix="bench-ws-"))
    made = []
    results = []

    def preprocess() -> int:
        made.append(project(args.images_dir, categories, args.image_size, workspace))
        return sum(made[0].count(split) for split in ("train", "validation", "test"))

    try:
        for name, run in (
            ("image_dataset_from_directory", lambda: keras_directory(args.images_dir, args.image_size)),
            ("Pillow loop, 1 process", lambda: pillow_loop(files, args.image_size)),
            ("this project: preprocessing (all cores)", preprocess),
            ("this project: reading its arrays (each later epoch)", lambda: read_arrays(made[0])),
        ):
            started = time.perf_counter()
            count = run()
            results.append((name, count, time.perf_counter() - started))
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    baseline = results[0][1] / results[0][2]
    print("| method | images | seconds | images/s | vs image_dataset_from_directory |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, count, seconds in results:
        rate = count / seconds
        print(f"| {name} | {count} | {seconds:.1f} | {rate:.0f} | {rate / baseline:.2f}x |")
    print_epochs(results)


def print_epochs(results: list[tuple[str, int, float]]) -> None:
    """The data cost of whole trainings: preprocessing once plus one read of the arrays per epoch, against
    image_dataset_from_directory decoding every photo every epoch (the augmentation-free case)."""
    (_, _, directory), _, (_, _, preprocessing), (_, _, reading) = results
    print("\n| epochs | image_dataset_from_directory (s) | this project: once + reads (s) | speed-up |")
    print("| ---: | ---: | ---: | ---: |")
    for epochs in (1, 2, 5, 10, 30):
        theirs, ours = epochs * directory, preprocessing + epochs * reading
        print(f"| {epochs} | {theirs:.1f} | {ours:.1f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
