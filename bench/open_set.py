"""How well a run knows "none of these", and how calibrated its confidence is: the numbers behind openset.py.

    python bench/open_set.py [--image-size 224] [--workspace DIR]

Trains two real runs with the project's own training (mobilenet_v2, default options) and scores photos of
categories they never saw with each candidate method, the threshold set on the run's validation photos to
keep 95% of them (as training sets it):
- cat, dog, horse from animals10_sample; near unknowns: its other 7 animals; far unknowns: all of trashnet;
- trashnet without plastic and trash; unknowns: the held-out plastic and trash photos.
Prints, per method, the share of unknowns rejected, the share of known test photos kept, and the AUROC
(known test photos against unknowns; threshold-free), then each run's expected calibration error before and
after temperature scaling (from its metrics.json). Features are cached in the workspace, so a second
invocation with the same --workspace only trains the heads again.
Targets (issue 19): >= 70% of near and >= 95% of far unknowns rejected; ECE <= 3% on trashnet's test split.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cats_dogs import ROOT, seeded_keras_home  # noqa: E402

DATASETS = ROOT.parent / "shared" / "datasets"
ANIMALS, TRASHNET = DATASETS / "animals10_sample", DATASETS / "trashnet"
KNOWN_ANIMALS = ("cat", "dog", "horse")
HELD_OUT_TRASH = ("plastic", "trash")


def categories(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.is_dir())


def photos(folder: Path, names) -> list[Path]:
    from image_classifier.images import list_image_files

    return [path for name in names for path in list_image_files(folder / name)]


def train_run(images_dir: Path, names, image_size: int, workspace):
    from image_classifier.runs import RunFolder
    from image_classifier.training.config import TrainConfig
    from image_classifier.training.loop import train

    config = TrainConfig(
        categories=tuple(names), images_dir=images_dir, model="mobilenet_v2", image_size=image_size, workers=2
    )
    return RunFolder(train(config, workspace, print_fn=lambda *a: None))


def run_outputs(run, unknown_sets: dict[str, list[Path]]) -> dict:
    """(probabilities, embeddings, labels) of the run's splits, and of each set of unknown photos."""
    from image_classifier.features import BackboneFeatures, split_model
    from image_classifier.images import load_array
    from image_classifier.models import load_model
    from image_classifier.openset import Embedder

    model = load_model(run.model_path)
    features = BackboneFeatures(split_model(model)[0], "mobilenet_v2", run.image_size, run.workspace)
    embedder, dataset = Embedder(model, features), run.dataset()
    outputs = {}
    for split in ("train", "validation", "test"):
        outputs[split] = (*embedder.of_split(dataset, split), np.asarray(dataset.arrays(split)[1]))
    for name, files in unknown_sets.items():
        images = np.stack([load_array(path, run.image_size, run.resize) for path in files])
        outputs[name] = (*embedder.of_images(images), None)
    return outputs


def method_rows(outputs: dict, unknowns: tuple[str, ...], classes: int) -> list[list[str]]:
    from sklearn.metrics import roc_auc_score

    from image_classifier.openset import DEFAULT_KNOWN_RATE, METHODS, OpenSet

    rows = []
    for method in METHODS:
        check = OpenSet.fit(method, outputs["train"][1], outputs["train"][2], classes)
        validation = check.scores(outputs["validation"][1], outputs["validation"][0])
        check = check.with_threshold(validation, DEFAULT_KNOWN_RATE)
        known = check.scores(outputs["test"][1], outputs["test"][0])
        cells = [method, f"{check.known(known).mean():.1%}"]
        for name in unknowns:
            scores = check.scores(outputs[name][1], outputs[name][0])
            truth = np.r_[np.ones(len(known)), np.zeros(len(scores))]
            auroc = roc_auc_score(truth, np.r_[known, scores])
            cells += [f"{1 - check.known(scores).mean():.1%}", f"{auroc:.3f}"]
        rows.append(cells)
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def noise_floor(run, draws: int = 200) -> float:
    """The mean ECE a perfectly calibrated model would show on this many test photos with these
    confidences: each photo right with probability its confidence (what the ECE of a finite split can resolve)."""
    import csv

    from image_classifier.calibration import expected_calibration_error

    with open(run.file("test_predictions.csv"), newline="", encoding="utf-8") as handle:
        confidence = np.array([float(row["confidence"]) for row in csv.DictReader(handle)])
    probabilities = np.c_[confidence, 1 - confidence]
    rng = np.random.default_rng(0)
    values = [
        expected_calibration_error(probabilities, (rng.random(len(confidence)) >= confidence).astype(int))
        for _ in range(draws)
    ]
    return float(np.mean(values))


def calibration_line(run) -> str:
    found = run.metrics["calibration"]
    return (
        f"{run.name}: temperature {found['temperature']}, test ECE {found['test_ece_before']:.1%} before, "
        f"{found['test_ece_after']:.1%} after (validation {found['validation_ece_before']:.1%} -> "
        f"{found['validation_ece_after']:.1%}); test accuracy {run.metrics['test_accuracy']:.1%} on "
        f"{run.metrics.get('test_count')} photos; a perfectly calibrated model would show "
        f"{noise_floor(run):.1%} on as many"
    )


def measure(image_size: int, workspace) -> None:
    animals = train_run(ANIMALS, KNOWN_ANIMALS, image_size, workspace)
    near = [name for name in categories(ANIMALS) if name not in KNOWN_ANIMALS]
    sets = {"near": photos(ANIMALS, near), "far": photos(TRASHNET, categories(TRASHNET))}
    outputs = run_outputs(animals, sets)
    print(f"\n## cat, dog, horse ({animals.name}, {image_size} px); near: {', '.join(near)}; far: trashnet\n")
    counts = {split: len(outputs[split][2]) for split in ("train", "validation", "test")}
    print(f"photos: {counts}, near unknowns {len(sets['near'])}, far unknowns {len(sets['far'])}\n")
    header = ["method", "known test kept", "near rejected", "near AUROC", "far rejected", "far AUROC"]
    print(markdown(header, method_rows(outputs, ("near", "far"), len(KNOWN_ANIMALS))))
    known_trash = [name for name in categories(TRASHNET) if name not in HELD_OUT_TRASH]
    held_out = train_run(TRASHNET, known_trash, image_size, workspace)
    outputs = run_outputs(held_out, {"held out": photos(TRASHNET, HELD_OUT_TRASH)})
    print(f"\n## trashnet without {', '.join(HELD_OUT_TRASH)} ({held_out.name})\n")
    header = ["method", "known test kept", "held-out rejected", "held-out AUROC"]
    print(markdown(header, method_rows(outputs, ("held out",), len(known_trash))))
    full = train_run(TRASHNET, categories(TRASHNET), image_size, workspace)
    print("\n## calibration (temperature scaling on the validation split)\n")
    for run in (animals, held_out, full):
        print(f"- {calibration_line(run)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workspace", type=Path, help="kept between invocations (default: a temporary one)")
    args = parser.parse_args()
    from image_classifier.config import Workspace

    with tempfile.TemporaryDirectory(prefix="open-set-") as scratch:
        os.environ.setdefault("KERAS_HOME", str(seeded_keras_home(Path(scratch) / "keras")))
        measure(args.image_size, Workspace(args.workspace or Path(scratch) / "workspace"))


if __name__ == "__main__":
    main()
