"""Which depths of the frozen backbone to pool, and whether flipped views help: measured with a logistic regression.

    python bench/feature_layers.py [--images-dir ../shared/datasets/trashnet] [--image-size 224]

Prepares the photos as training does (squash, 8:1:1 split seeded 0, or the given splits), computes MobileNetV2's
pooled features at every candidate depth in one pass on the fast engine (plus a horizontally flipped view of
each photo), then fits a standardized logistic regression, its C chosen on the validation split, for each
combination, and prints test accuracy as a markdown table. This is how the per-backbone default of
--feature-layers was chosen; run it on several datasets, never tune on one.
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
from cats_dogs import ROOT, seeded_keras_home  # noqa: E402

CANDIDATES = ("block_6_expand_relu", "block_13_expand_relu", "block_16_expand_relu", "out_relu")
"""MobileNetV2 at four depths: 28x28 (192 channels), 14x14 (576), 7x7 (960) and the final 7x7 (1280)."""


def pooled_model(keras, image_size: int, layers: tuple[str, ...]):
    from image_classifier.layers import InputPreprocessing

    backbone = keras.applications.MobileNetV2(
        include_top=False, weights="imagenet", input_shape=(image_size,) * 2 + (3,)
    )
    inner = keras.Model(backbone.input, [backbone.get_layer(name).output for name in layers])
    inputs = keras.Input((image_size, image_size, 3))
    outputs = inner(InputPreprocessing("tf")(inputs))
    pooled = [keras.layers.GlobalAveragePooling2D()(output) for output in outputs]
    return keras.Model(inputs, keras.layers.Concatenate()(pooled)), [int(o.shape[-1]) for o in outputs]


def fit_and_score(train, y_train, validation, y_validation, test, y_test) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    best = (-1.0, None)
    for c in (0.03, 0.1, 0.3):
        model = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(train), y_train)
        score = model.score(scaler.transform(validation), y_validation)
        if score > best[0]:
            best = (score, model)
    return best[0], best[1].score(scaler.transform(test), y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-dir", type=Path, default=ROOT.parent / "shared" / "datasets" / "trashnet")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="feature-layers-") as scratch:
        os.environ.setdefault("KERAS_HOME", str(seeded_keras_home(Path(scratch) / "keras")))
        measure(args.images_dir, args.image_size, Path(scratch))


def measure(images_dir: Path, image_size: int, scratch: Path) -> None:
    from image_classifier.config import Workspace
    from image_classifier.engines import FeatureEngine
    from image_classifier.preprocess import PreprocessOptions, prepare_dataset
    from image_classifier.tf_env import import_keras

    categories = tuple(
        sorted(
            p.name
            for p in images_dir.iterdir()
            if p.is_dir() and p.name not in ("train", "validation", "test")
        )
    )
    if (images_dir / "train").is_dir():
        categories = tuple(sorted(p.name for p in (images_dir / "train").iterdir() if p.is_dir()))
    workspace = Workspace(scratch / "ws")
    options = PreprocessOptions(categories=categories, images_dir=images_dir, image_size=image_size)
    dataset = prepare_dataset(options, workspace, print_fn=lambda *_: None)
    keras = import_keras()
    model, widths = pooled_model(keras, image_size, CANDIDATES)
    engine = FeatureEngine(model, workspace.engines, f"probe-{image_size}", image_size=image_size)
    started = time.monotonic()
    data = {}
    for split in ("train", "validation", "test"):
        x, y = dataset.arrays(split)
        data[split] = (engine.run(x), engine.run(np.ascontiguousarray(x[:, :, ::-1])), np.asarray(y))
    seconds = time.monotonic() - started
    edges = np.cumsum([0, *widths])
    print(f"{images_dir.name}: {len(categories)} classes, {sum(len(v[2]) for v in data.values())} photos, "
          f"features on {engine.name} in {seconds:.0f}s\n")  # fmt: skip
    print("| layers | flips | validation | test |\n| --- | --- | --- | --- |")
    final, b6, b13, b16 = CANDIDATES[3], CANDIDATES[0], CANDIDATES[1], CANDIDATES[2]
    subsets = [(final,), (b13, final), (b16, final), (b13, b16, final), (b6, b13, b16, final)]
    for subset in subsets:
        index = np.concatenate(
            [np.arange(edges[CANDIDATES.index(n)], edges[CANDIDATES.index(n) + 1]) for n in subset]
        )
        for flips in (False, True):
            (train, train_flip, y_train), (val, val_flip, y_val), (test, test_flip, y_test) = (
                data[s] for s in ("train", "validation", "test")
            )
            x_train, labels = train[:, index], y_train
            if flips:
                x_train, labels = (
                    np.concatenate([x_train, train_flip[:, index]]),
                    np.concatenate([y_train, y_train]),
                )
            scores = fit_and_score(x_train, labels, val[:, index], y_val, test[:, index], y_test)
            names = "+".join(n.replace("_expand_relu", "").replace("block_", "b") for n in subset)
            print(f"| {names} | {'train' if flips else 'no'} | {scores[0]:.1%} | {scores[1]:.1%} |")


if __name__ == "__main__":
    main()
