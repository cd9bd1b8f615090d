"""Backbone features: the one place the frozen backbone runs over photos, and where its output is cached.

features/<dataset>/<key>/<split>.npy    one row of pooled features per photo of the split (memory-mapped)
features/<dataset>/<key>/<split>.json   a hash of each photo's pixels, the engine, the .npy's sha256
engines/<key>.tflite|.onnx              the backbone converted for the fast engine (engines.py), once

<dataset> is the name of the arrays' folder under datasets/; the features live beside it, not in it, because
preprocessing rebuilds that folder whole when photos change, and the unchanged photos' rows should survive.

The key names the backbone, the image size, the layers pooled and a digest of the weights, so features of
another backbone or of fine-tuned weights never mix. A second run with other head options reads the
features back at once; a changed photo recomputes only its own row; a damaged cache (its sha256 differs)
is recomputed whole. Training (phase 1 and the test evaluation) and predict.py call this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .atomic import write_atomic, write_json
from .config import Workspace

CHUNK = 256
"""Photos read from the memory-mapped arrays at a time."""


def weights_digest(model) -> str:
    """sha256 of every weight value, in order: the same backbone weights give the same digest however built."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight))
        digest.update(f"{value.dtype}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def row_hashes(images: np.ndarray) -> list[str]:
    """A short hash of each photo's pixels: which rows of a cache still hold for changed arrays."""
    hashes = []
    for start in range(0, len(images), CHUNK):
        for row in np.asarray(images[start : start + CHUNK]):
            hashes.append(hashlib.blake2b(row.tobytes(), digest_size=12).hexdigest())
    return hashes


def augmented_view(images: np.ndarray, view: int, seed: int = 0) -> np.ndarray:
    """View 0 is the photos as they are; odd views are mirrored left to right; views from 2 on also crop a
    random square of 80-100% of the side (seeded by view) and resize it back. uint8 in, uint8 out."""
    from PIL import Image

    if view == 0:
        return images
    rng = np.random.default_rng([seed, view])
    out = np.empty(images.shape, np.uint8)
    size = images.shape[1]
    for index in range(len(images)):
        image = np.asarray(images[index])
        if view >= 2:
            side = int(round(size * rng.uniform(0.8, 1.0)))
            top, left = rng.integers(0, size - side + 1, 2)
            crop = Image.fromarray(image[top : top + side, left : left + side])
            image = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))
        out[index] = image[:, ::-1] if view % 2 else image
    return out


def split_model(model):
    """A saved whole model (photo -> probabilities) of a backbone -> (photo -> pooled features, head)."""
    from .tf_env import import_keras

    keras = import_keras()
    pool = model.get_layer("pool")
    return keras.Model(model.input, pool.output, name="features"), model.get_layer("head")


class BackboneFeatures:
    """Pooled features of a frozen backbone, computed on the fast engine and cached per dataset split."""

    def __init__(
        self,
        feature_model,
        backbone: str,
        image_size: int,
        workspace: Workspace,
        engine: str | None = None,
        print_fn: Callable[..., object] = print,
        writes: bool = True,
        layers: tuple[str, ...] = ("final",),
    ):
        from .engines import cache_key

        self.feature_model = feature_model
        self.image_size = image_size
        self.workspace = workspace
        self.requested = engine
        self.print_fn = print_fn
        self.writes = writes
        self.key = cache_key(backbone, image_size, weights_digest(feature_model)[:16], ",".join(layers))
        self._engine = None
        self.computed = 0
        self.reused = 0
        self.seconds = 0.0

    @property
    def engine(self):
        """The FeatureEngine, started (and the backbone converted, once per machine) on first use."""
        if self._engine is None:
            from .engines import FeatureEngine

            self._engine = FeatureEngine(
                self.feature_model, self.workspace.engines, self.key, self.requested,
                image_size=self.image_size, print_fn=self.print_fn,
            )  # fmt: skip
        return self._engine

    @property
    def engine_name(self) -> str:
        return self._engine.name if self._engine is not None else "none (all cached)"

    def of_images(self, images: np.ndarray, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Features of photos already resized to image_size (uint8), computed now, not cached."""
        return self._compute(np.asarray(images), batch_size, "Features" if progress else None)

    def of_split(self, dataset, split: str, batch_size: int = 64, view: int = 0, seed: int = 0) -> np.ndarray:
        """Features of one split of prepared arrays (or an augmented view of it, see augmented_view): read
        from the cache, computing only what is missing."""
        images = augmented_view(dataset.arrays(split)[0], view, seed)
        folder = self.workspace.features / Path(dataset.path).name / self.key
        split = split if view == 0 else f"{split}.view{view}-seed{seed}"
        hashes = row_hashes(images)
        cached = self._read_cache(folder, split)
        known = dict(zip(cached[0], range(len(cached[0])), strict=True)) if cached else {}
        missing = [index for index, value in enumerate(hashes) if value not in known]
        if cached and not missing and cached[0] == hashes:
            self.reused += len(hashes)
            return cached[1]
        width = int(self.feature_model.output.shape[-1])
        features = np.zeros((len(hashes), width), np.float32)
        for index, value in enumerate(hashes):
            if value in known:
                features[index] = cached[1][known[value]]
        if missing:
            label = f"Features of {split} ({len(missing)} of {len(hashes)} photos)"
            computed = self._compute(images, batch_size, label, rows=missing)
            features[missing] = computed
        self.reused += len(hashes) - len(missing)
        if self.writes:
            self._write_cache(folder, split, hashes, features)
        return features

    def _compute(
        self, images, batch_size: int, label: str | None, rows: list[int] | None = None
    ) -> np.ndarray:
        from tqdm.auto import tqdm

        rows = list(range(len(images))) if rows is None else rows
        engine = self.engine
        started = time.monotonic()
        parts = []
        with tqdm(total=len(rows), desc=f"{label} on {engine.name}" if label else None, unit="photo",
                  disable=label is None, dynamic_ncols=True) as bar:  # fmt: skip
            for start in range(0, len(rows), CHUNK):
                chunk = np.asarray(images[rows[start : start + CHUNK]])
                parts.append(engine.run(chunk, batch_size, progress=bar.update))
        self.seconds += time.monotonic() - started
        self.computed += len(rows)
        width = int(self.feature_model.output.shape[-1])
        return np.concatenate(parts) if parts else np.zeros((0, width), np.float32)

    def _read_cache(self, folder: Path, split: str) -> tuple[list[str], np.ndarray] | None:
        """The cached rows and their photo hashes, or None when absent, for another engine, or damaged."""
        record_path, array_path = folder / f"{split}.json", folder / f"{split}.npy"
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if record.get("requested") != self._requested_name():
                return None
            if hashlib.sha256(array_path.read_bytes()).hexdigest() != record["sha256"]:
                self.print_fn(f"Features: the cache {array_path} is damaged; computing it again")
                return None
            features = np.load(array_path, mmap_mode="r")
            if len(features) != len(record["rows"]):
                return None
            return list(record["rows"]), features
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_cache(self, folder: Path, split: str, hashes: list[str], features: np.ndarray) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, features)
        data = buffer.getvalue()
        write_atomic(folder / f"{split}.npy", data)
        record = {
            "rows": hashes,
            "requested": self._requested_name(),
            "engine": self.engine_name,
            "key": self.key,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        write_json(folder / f"{split}.json", record)

    def _requested_name(self) -> str:
        if self.requested is None:
            from .engines import default_engine

            self.requested = default_engine()
        return self.requested

    def summary(self) -> str:
        rate = f" ({self.computed / self.seconds:.0f} photos/s)" if self.seconds > 0 else ""
        return (
            f"Features: {self.computed} photos computed on {self.engine_name} in {self.seconds:.1f}s{rate}, "
            f"{self.reused} read from the cache"
        )
