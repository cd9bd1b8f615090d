"""Frozen-backbone feature throughput per engine, side by side in one invocation (timings vary 2x between runs;
ratios within one run do not).

    python bench/feature_engines.py [--photos 256] [--sizes 160 224] [--batch-size 32]
        [--images-dir ../shared/datasets/cats_and_dogs_small]

MobileNetV2 (ImageNet weights) pooled features of real photos, squash-resized like preprocessing does, by:
- Keras `model.predict` (what training used before image_classifier/engines.py);
- a tf.function of the same model (engines.py's keras engine, used on a GPU and as the fallback);
- LiteRT with XNNPACK (ai-edge-litert) and ONNX Runtime, through engines.FeatureEngine.
Each row gives photos/s after one warm-up batch (best of --repeats passes taken in turn), the speed-up over predict, the largest |feature difference| from
predict on the same photos, and for the converted engines the one-time conversion (cached in a temporary folder
here, so every invocation converts) and the file size. Target: the chosen engine at least 3x predict at 224.

The weights come from $KERAS_HOME/models when it has them, else from a temporary KERAS_HOME seeded with
../shared/weights/keras/models (as tests/conftest.py does): this machine cannot download them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS_NAME = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5"


def seed_keras_home(sizes) -> Path | None:
    """A temporary KERAS_HOME with the shared weights, unless $KERAS_HOME already has every file needed."""
    home = os.environ.get("KERAS_HOME")
    if home and all((Path(home) / "models" / WEIGHTS_NAME.format(size=s)).is_file() for s in sizes):
        return None
    temporary = Path(tempfile.mkdtemp(prefix="keras-home-"))
    (temporary / "models").mkdir()
    for weights_file in (SHARED / "weights" / "keras" / "models").glob("*.h5"):
        shutil.copy(weights_file, temporary / "models" / weights_file.name)
    os.environ["KERAS_HOME"] = str(temporary)
    return temporary


def photo_files(images_dir: Path, count: int) -> list[Path]:
    """The first `count` photos, taking the categories in turn (cats, dogs, cats, ...) from train/ then the rest."""
    roots = [images_dir / s for s in ("train", "validation", "test") if (images_dir / s).is_dir()] or [
        images_dir
    ]
    per_category: dict[str, list[Path]] = {}
    for root in roots:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            per_category.setdefault(folder.name, []).extend(
                sorted(p for p in folder.iterdir() if p.is_file())
            )
    lists = list(per_category.values())
    files = [group[i] for i in range(max(map(len, lists), default=0)) for group in lists if i < len(group)]
    return files[:count]


def timed(step, images: np.ndarray, batch_size: int) -> tuple[float, np.ndarray]:
    """photos/s of step(batch) over all images; and the outputs."""
    started = time.perf_counter()
    outputs = [np.asarray(step(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return len(images) / (time.perf_counter() - started), np.concatenate(outputs)


def bench_size(size: int, files: list[Path], batch_size: int, cache: Path, repeats: int) -> list[dict]:
    from image_classifier import engines
    from image_classifier.images import load_array
    from image_classifier.models import build_model, get_spec

    images = np.stack([load_array(path, size, "squash") for path in files])
    built = build_model(get_spec("mobilenet_v2"), 2, size, weights="imagenet")
    model = built.features
    rows = [{"engine": "Keras predict", "step": lambda b: model.predict(b, batch_size=batch_size, verbose=0)}]

    key = engines.cache_key("mobilenet_v2", size, engines.model_digest(model))
    for engine, title in (
        ("keras", "tf.function (keras engine)"),
        ("litert", "LiteRT + XNNPACK"),
        ("onnx", "ONNX Runtime"),
    ):
        started = time.perf_counter()
        runner = engines.FeatureEngine(
            model, cache, key, engine, print_fn=lambda line: print(line, file=sys.stderr)
        )
        conversion = time.perf_counter() - started
        if runner.name != engine:
            rows.append({"engine": title, "speed": None, "note": runner.fallback_reason})
            continue
        row = {"engine": title, "step": lambda b, runner=runner: runner.run(b, batch_size)}
        if runner.path is not None:
            row["conversion"] = conversion
            row["bytes"] = runner.path.stat().st_size
        rows.append(row)
    # Round-robin, best of `repeats`: other processes on a shared machine then slow every engine alike.
    for row in rows:
        if "step" in row:
            row["step"](images[:batch_size])  # warm-up: tracing, memory planning
    for _ in range(repeats):
        for row in rows:
            if "step" in row:
                speed, row["features"] = timed(row["step"], images, batch_size)
                row["speed"] = max(speed, row.get("speed") or 0.0)
    reference = rows[0]["features"]
    for row in rows:
        if "features" in row:
            row["difference"] = float(np.abs(row.pop("features") - reference).max())
        row.pop("step", None)
        row["size"], row["scale"] = size, float(np.abs(reference).max())
    return rows


def table(rows: list[dict], photos: int, batch_size: int, repeats: int) -> str:
    baseline = {row["size"]: row["speed"] for row in rows if row["engine"] == "Keras predict"}
    lines = [
        f"MobileNetV2 pooled features, {photos} photos, batch {batch_size}, {engines_threads()} threads, "
        f"best of {repeats} round-robin passes",
        "",
        "| size | engine | photos/s | vs predict | max abs diff vs predict | conversion (once) | file |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["speed"] is None:
            lines.append(f"| {row['size']} | {row['engine']} | - | - | - | {row['note']} | |")
            continue
        conversion = f"{row['conversion']:.0f} s" if "conversion" in row else ""
        size = f"{row['bytes'] / 1e6:.1f} MB" if "bytes" in row else ""
        lines.append(
            f"| {row['size']} | {row['engine']} | {row['speed']:.1f} | {row['speed'] / baseline[row['size']]:.1f}x "
            f"| {row['difference']:.1e} (features up to {row['scale']:.1f}) | {conversion} | {size} |"
        )
    return "\n".join(lines)


def engines_threads() -> int:
    from image_classifier.engines import cpu_threads

    return cpu_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 224])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed passes per engine, best kept (default 2)"
    )
    parser.add_argument("--images-dir", type=Path, default=SHARED / "datasets" / "cats_and_dogs_small")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    seeded = seed_keras_home(args.sizes)
    cache = Path(tempfile.mkdtemp(prefix="engines-"))
    try:
        files = photo_files(args.images_dir, args.photos)
        if not files:
            raise SystemExit(f"no photos in {args.images_dir}")
        rows = [
            row
            for size in args.sizes
            for row in bench_size(size, files, args.batch_size, cache, args.repeats)
        ]
        print(table(rows, len(files), args.batch_size, args.repeats))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if seeded is not None:
            shutil.rmtree(seeded, ignore_errors=True)


if __name__ == "__main__":
    main()
