"""The measurements of docs/accuracy-guide.md: the default command, then the same with one change per row.

    python bench/accuracy_guide.py [--images-dir ../shared/datasets/cats_and_dogs_small] [--rows 1,3]
    python bench/accuracy_guide.py --images-dir ../shared/datasets/trashnet     # the hard benchmark, 8:1:1

Each row runs `scripts/machine_learning.py` on the folder (cats_and_dogs_small: its train/validation/test
folders as given; a folder of category subfolders is split 8:1:1, seeded); the categories are its subfolders. Rows of one image size share a workspace, so only the first of each size prepares the arrays, as
a user changing one option at a time would see it. Prints a markdown table (test accuracy, best val_loss,
best epoch / epochs run, wall time) to paste into the guide's section 3; about 20 minutes on 2 cores.
Pretrained rows load ../shared/weights through a temporary KERAS_HOME, as bench/cats_dogs.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cats_dogs import DEFAULT_IMAGES, ROOT, machine, percent, seeded_keras_home, versions
from trashnet import categories_of

CHANGES: list[tuple[str, ...]] = [
    (),
    ("--dropout", "0"),
    ("--dropout", "0.5"),
    ("--learning-rate", "0.01"),
    ("--learning-rate", "0.0001"),
    ("--lr-schedule", "cosine"),
    ("--optimizer", "sgd"),
    ("--optimizer", "rmsprop"),
    ("--dense-units", "256"),
    ("--dense-units", "1024,512"),
    ("--l2", "0.001"),
    ("--early-stopping", "0", "--epochs", "40"),
    ("--image-size", "160"),
    ("--image-size", "160", "--augment", "--epochs", "3"),
    ("--image-size", "160", "--augment", "--epochs", "10"),
    ("--feature-layers", "final", "--dropout", "0.2", "--l2", "0"),
    ("--feature-views", "2"),
    ("--class-weight", "auto"),
    ("--quality", "fast"),
]


def run_row(change: tuple[str, ...], images_dir: Path, scratch: Path, env: dict) -> dict:
    size = change[change.index("--image-size") + 1] if "--image-size" in change else "224"
    command = [
        sys.executable, "scripts/machine_learning.py", "--images-dir", str(images_dir),
        "--categories", categories_of(images_dir), "--workspace", str(scratch / f"ws{size}"), *change,
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr).strip().splitlines()[-1][:200], "seconds": seconds}
    run = Path(re.search(r"^Run saved to: (.+)$", done.stdout, re.MULTILINE).group(1).strip())
    metrics = json.loads((run / "metrics.json").read_text())
    training = metrics["training"]
    return {
        "accuracy": metrics["test_accuracy"],
        "val_loss": training["best_validation"]["val_loss"],
        "best_epoch": training["best_epoch"] + 1,
        "epochs": training["epochs_run"],
        "seconds": seconds,
    }


def row(change: tuple[str, ...], result: dict) -> str:
    name = f"`{' '.join(change)}`" if change else "(none: the default command)"
    if "error" in result:
        return f"| {name} | failed: {result['error']} | - | - | {result['seconds']:.0f} s |"
    return (
        f"| {name} | {percent(result['accuracy'])} | {result['val_loss']:.4f} | "
        f"{result['best_epoch']} / {result['epochs']} | {result['seconds']:.0f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-dir", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--rows", help="comma-separated row numbers (1 = the default command); default: all")
    args = parser.parse_args()
    numbers = [int(n) for n in args.rows.split(",")] if args.rows else list(range(1, len(CHANGES) + 1))
    print(f"{machine()}\n{versions()}\n")
    print("| change | test accuracy | best val_loss | best epoch / epochs run | wall time |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="accuracy-guide-") as scratch:
        home = seeded_keras_home(Path(scratch) / "keras")
        env = {**os.environ, "KERAS_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
        env.pop("WORKSPACE", None)
        for number in numbers:
            change = CHANGES[number - 1]
            print(row(change, run_row(change, args.images_dir.resolve(), Path(scratch), env)), flush=True)


if __name__ == "__main__":
    main()
