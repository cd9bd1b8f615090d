"""What computing backbone features once buys: the default command on Keras, on the fast engine, and again.

    python bench/feature_reuse.py [--images-dir ../shared/datasets/cats_and_dogs_small]

Three runs of scripts/machine_learning.py on cats_and_dogs_small (the default command, MobileNetV2 at 224 px):

1. `--engine keras` in a fresh workspace: the frozen backbone in TensorFlow, as before features.py;
2. the default engine in another fresh workspace: conversion (once per machine) and features on LiteRT;
3. the same workspace as 2 with `--dropout 0.3`: a second run with other head options.

It prints each run's wall time, backbone seconds (metrics.json's features.seconds, the time spent running
the backbone) and what was computed or reused, then the targets of issue 16: run 3 spends under 10% of
run 2's backbone time on the backbone. Timings vary 2x between runs on this machine; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cats_dogs import DEFAULT_IMAGES, ROOT, seeded_keras_home


def run(images: Path, workspace: Path, env: dict, *options: str) -> dict:
    command = [sys.executable, "scripts/machine_learning.py", "--images-dir", str(images), "--categories",
               "cats,dogs", "--workspace", str(workspace), *options]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    metrics = json.loads((workspace / "runs" / "latest" / "metrics.json").read_text())
    return {"wall": seconds, "accuracy": metrics["test_accuracy"], **metrics["features"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-dir", type=Path, default=DEFAULT_IMAGES)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="feature-reuse-") as scratch:
        scratch = Path(scratch)
        env = dict(os.environ, KERAS_HOME=str(seeded_keras_home(scratch / "keras")), TF_CPP_MIN_LOG_LEVEL="2")
        rows = [
            (
                "1. `--engine keras`, fresh workspace",
                run(args.images_dir, scratch / "a", env, "--engine", "keras"),
            ),
            ("2. default engine, fresh workspace", run(args.images_dir, scratch / "b", env)),
            (
                "3. as 2, again with `--dropout 0.3`",
                run(args.images_dir, scratch / "b", env, "--dropout", "0.3"),
            ),
        ]
    print("| run | engine | wall time | backbone time | photos computed / reused | test accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in rows:
        print(
            f"| {name} | {row['engine']} | {row['wall']:.0f} s | {row['seconds']:.1f} s | "
            f"{row['computed']} / {row['reused']} | {row['accuracy']:.1%} |"
        )
    first, second = rows[1][1], rows[2][1]
    share = second["seconds"] / first["seconds"] if first["seconds"] else 0.0
    print(
        f"\n- Backbone time of run 3 against run 2: {share:.1%} (target: under 10%, {'met' if share < 0.1 else 'NOT met'})."
    )
    keras, fast = rows[0][1], rows[1][1]
    print(
        f"- Backbone time on {fast['engine']} against keras: {keras['seconds'] / fast['seconds']:.1f}x faster."
    )


if __name__ == "__main__":
    main()
