"""A handful of photos per category: the default command against a logistic regression on the same features.

    python bench/few_shot.py [--sizes 5,10,20,50] [--draws 5] [--images-dir ../shared/datasets/cats_and_dogs_small]

For each size k and each seeded draw, a temporary folder of symbolic links holds k training and k validation
photos per category, drawn from the dataset's own train and validation folders, and its whole test folder.
The default training command (`train`, the code behind scripts/machine_learning.py, all defaults) trains on
it twice in one workspace: once as it is, and once with the minimum of optimizer steps turned off
(`phases.MIN_HEAD_STEPS = 1`, one pass per epoch: the behaviour before issue 23), the baseline in the same
run. Beside them, a standardized logistic regression (scikit-learn, C=1) is fitted on the very features the
run cached (read back through features.py) and scored on the same test photos. Prints mean (and spread) test
accuracy per size as a markdown table. Target: the default within 1 point of the logistic regression at
every size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cats_dogs import DEFAULT_IMAGES, seeded_keras_home  # noqa: E402


def draw_folder(source: Path, target: Path, size: int, seed: int) -> list[str]:
    """train/ and validation/ with `size` links per category drawn from the source's own; test/ whole."""
    rng = np.random.default_rng(seed)
    categories = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    for split in ("train", "validation", "test"):
        for category in categories:
            files = sorted((source / split / category).iterdir())
            if split != "test":
                files = [files[i] for i in rng.choice(len(files), size, replace=False)]
            folder = target / split / category
            folder.mkdir(parents=True)
            for file in files:
                (folder / file.name).symlink_to(file.resolve())
    return categories


def cached_features(run_path: Path, dataset) -> dict[str, np.ndarray]:
    """The features the run trained on, from the workspace's cache (features.py; nothing is recomputed)."""
    from image_classifier.features import BackboneFeatures, split_model
    from image_classifier.models import load_model
    from image_classifier.runs import RunFolder

    run = RunFolder(run_path)
    features_model, _ = split_model(load_model(run.model_path))
    features = BackboneFeatures(
        features_model, run.options["model"], run.image_size, run.workspace, run.options.get("engine"),
        print_fn=lambda *_: None, writes=False, layers=tuple(run.options.get("feature_layers") or ("final",)),
    )  # fmt: skip
    return {split: features.of_split(dataset, split, 64) for split in ("train", "test")}


def logistic_regression(features: dict[str, np.ndarray], dataset) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    y_train, y_test = (np.asarray(dataset.arrays(split)[1]) for split in ("train", "test"))
    scaler = StandardScaler().fit(features["train"])
    model = LogisticRegression(max_iter=5000).fit(scaler.transform(features["train"]), y_train)
    return float(model.score(scaler.transform(features["test"]), y_test))


def one_draw(source: Path, size: int, seed: int, workspace) -> dict[str, float]:
    import json

    from image_classifier.preprocess import prepare_dataset
    from image_classifier.training import phases
    from image_classifier.training.config import TrainConfig
    from image_classifier.training.loop import train

    quiet = lambda *_: None  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="few-shot-") as folder:
        categories = draw_folder(source, Path(folder), size, seed)
        config = TrainConfig(categories=tuple(categories), images_dir=Path(folder), seed=seed)
        scores = {}
        for name, steps in (("one pass per epoch", 1), ("default", phases.MIN_HEAD_STEPS)):
            saved, phases.MIN_HEAD_STEPS = phases.MIN_HEAD_STEPS, steps
            try:
                run = train(config, workspace, print_fn=quiet)
            finally:
                phases.MIN_HEAD_STEPS = saved
            scores[name] = json.loads((run / "metrics.json").read_text())["test_accuracy"]
        dataset = prepare_dataset(config.resolve().preprocess_options(), workspace, print_fn=quiet)
        scores["logistic regression"] = logistic_regression(cached_features(run, dataset), dataset)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-dir", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--sizes", default="5,10,20,50")
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-few-shot-"))
    os.environ["KERAS_HOME"] = str(seeded_keras_home(scratch / "keras"))
    from image_classifier.config import Workspace

    workspace = Workspace(scratch / "workspace")
    rows = []
    started = time.monotonic()
    for size in (int(s) for s in args.sizes.split(",")):
        results = [one_draw(args.images_dir, size, seed, workspace) for seed in range(args.draws)]
        row = {name: [r[name] for r in results] for name in results[0]}
        rows.append((size, row))
        print(f"{size} per category done after {time.monotonic() - started:.0f} s: "
              + ", ".join(f"{n} {100 * np.mean(v):.1f}%" for n, v in row.items()), flush=True)  # fmt: skip
    print(f"\n{args.images_dir.name}, {args.draws} seeded draws per size, full test split\n")
    print(
        "| photos per category | default | one pass per epoch (before) | logistic regression | default - LR |"
    )
    print("|---|---|---|---|---|")
    for size, row in rows:
        mean = {name: 100 * float(np.mean(values)) for name, values in row.items()}
        spread = {name: 100 * float(np.std(values)) for name, values in row.items()}
        cells = [
            f"{mean[n]:.1f}% ± {spread[n]:.1f}"
            for n in ("default", "one pass per epoch", "logistic regression")
        ]
        gap = mean["default"] - mean["logistic regression"]
        print(f"| {size} | {' | '.join(cells)} | {gap:+.1f}{'' if gap >= -1 else ' (target missed)'} |")


if __name__ == "__main__":
    main()
