"""The "none of these" check: does a photo belong to any of the run's categories at all?

A classifier always answers with one of its categories; shown a cup, a cat/dog/horse model says "horse,
97%". This module keeps what it needs to judge, fitted on the training photos, and a threshold chosen on the
validation photos so that `--known-rate` of the known photos pass.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .runs import RunFolder

DEFAULT_KNOWN_RATE = 0.95


def known_rate_arg(text: str) -> float:
    """An argparse type: the share of known photos the check keeps, above 0 and at most 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 0 and at most 1, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number above 0 and at most 1, got {value}")
    return value


METHODS = ("knn", "prototype", "mahalanobis", "softmax")
DEFAULT_METHOD = "knn"
"""Chosen by bench/open_set.py (docs/trust.md has the numbers): the most rejected unknowns at 95% kept."""
FILE = "openset.npz"
SMALL_VALIDATION = 50
"""Below this many validation photos a 95% threshold is mostly chance (9 photos: their minimum)."""
MAX_BYTES = 4_000_000
"""The nearest-neighbour references are float16 rows, subsampled (every class alike) to stay this small."""


def normalized(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class OpenSet:
    """What one method needs to score a photo's embedding (higher: more like the training photos), and the
    threshold below which a photo is "none of these"."""

    method: str
    arrays: dict[str, np.ndarray]
    threshold: float = float("-inf")
    known_rate: float = DEFAULT_KNOWN_RATE

    @classmethod
    def fit(
        cls, method: str, embeddings: np.ndarray, labels: np.ndarray, classes: int, seed: int = 0
    ) -> OpenSet:
        """Fitted on the training photos' embeddings (the input of the head's last layer) and labels."""
        if method not in METHODS:
            raise UserError(f"unknown open-set method {method!r}; choose from {', '.join(METHODS)}")
        labels = np.asarray(labels)
        if method == "knn":
            return cls(method, {"references": _references(normalized(embeddings), labels, seed)})
        if method == "prototype":
            means = np.stack([normalized(embeddings)[labels == c].mean(axis=0) for c in range(classes)])
            return cls(method, {"prototypes": normalized(means).astype(np.float32)})
        if method == "mahalanobis":
            return cls(method, _gaussian(np.asarray(embeddings, np.float64), labels, classes))
        return cls(method, {})

    def scores(self, embeddings: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """One known score per photo: cosine similarity (knn, prototype), minus the squared Mahalanobis
        distance to the nearest class, or the top probability (softmax)."""
        if self.method == "softmax":
            return np.asarray(probabilities, np.float64).max(axis=1)
        if self.method == "mahalanobis":
            whitening = self.arrays["whitening"].astype(np.float64)
            rows = np.asarray(embeddings, np.float64) @ whitening
            means = self.arrays["means"].astype(np.float64) @ whitening
            squared = (rows**2).sum(1)[:, None] - 2 * rows @ means.T + (means**2).sum(1)[None]
            return -squared.min(axis=1)
        key = "references" if self.method == "knn" else "prototypes"
        similarity = normalized(embeddings) @ self.arrays[key].astype(np.float32).T
        return similarity.max(axis=1).astype(np.float64)

    def score_tensor(self, embeddings, probabilities):
        """scores() in TensorFlow ops, for an exported model's second output (export.py)."""
        import tensorflow as tf

        if self.method == "softmax":
            return tf.reduce_max(probabilities, axis=1)
        if self.method == "mahalanobis":
            whitening = tf.constant(self.arrays["whitening"], tf.float32)
            rows = tf.matmul(embeddings, whitening)
            means = tf.matmul(tf.constant(self.arrays["means"], tf.float32), whitening)
            squared = (
                tf.reduce_sum(rows**2, 1, keepdims=True)
                - 2 * tf.matmul(rows, means, transpose_b=True)
                + tf.reduce_sum(means**2, 1)[None]
            )
            return -tf.reduce_min(squared, axis=1)
        key = "references" if self.method == "knn" else "prototypes"
        references = tf.constant(self.arrays[key].astype(np.float32))
        unit = tf.math.l2_normalize(embeddings, axis=1, epsilon=1e-24)
        return tf.reduce_max(tf.matmul(unit, references, transpose_b=True), axis=1)

    def with_threshold(self, validation_scores: np.ndarray, known_rate: float) -> OpenSet:
        """The threshold that keeps `known_rate` of the known photos: the validation photos, and when there
        are fewer than SMALL_VALIDATION of them, also each training photo scored against the others."""
        scores = np.asarray(validation_scores, np.float64)
        if len(scores) < SMALL_VALIDATION and self.method == "knn":
            scores = np.r_[scores, self.leave_one_out()]
        threshold = float(np.quantile(scores, 1.0 - known_rate, method="lower"))
        return OpenSet(self.method, self.arrays, threshold, known_rate)

    def leave_one_out(self) -> np.ndarray:
        """knn: each reference's similarity to its nearest other reference (a new photo's score, as if it
        had been held out)."""
        references = self.arrays["references"].astype(np.float32)
        similarity = references @ references.T
        np.fill_diagonal(similarity, -np.inf)
        return similarity.max(axis=1).astype(np.float64) if len(references) > 1 else np.zeros(0)

    def known(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) >= self.threshold

    def describe(self) -> str:
        return (
            f'"none of these" check: {self.method} score, threshold {self.threshold:.4g} (keeps '
            f"{self.known_rate:.0%} of the known validation photos)"
        )

    def save(self, run: RunFolder) -> None:
        meta = {"method": self.method, "threshold": self.threshold, "known_rate": self.known_rate}
        run.write_arrays(FILE, meta=np.array(json.dumps(meta)), **self.arrays)

    @classmethod
    def load(cls, run: RunFolder) -> OpenSet | None:
        """The run's check, or None for a run trained before the check existed."""
        arrays = run.read_arrays(FILE)
        if arrays is None:
            return None
        meta = json.loads(str(arrays.pop("meta")))
        return cls(meta["method"], arrays, float(meta["threshold"]), float(meta["known_rate"]))


def _references(rows: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Every training row, or an equal share of each class's rows when all would exceed MAX_BYTES."""
    limit = max(1, MAX_BYTES // (2 * rows.shape[1]))
    if len(rows) > limit:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(rows))
        ranks = np.empty(len(rows), int)
        for value in np.unique(labels):
            members = order[labels[order] == value]
            ranks[members] = np.arange(len(members))
        rows = rows[np.sort(np.argsort(ranks, kind="stable")[:limit])]
    return rows.astype(np.float16)


def _gaussian(embeddings: np.ndarray, labels: np.ndarray, classes: int) -> dict[str, np.ndarray]:
    """Class means and a whitening matrix of the shared covariance (Ledoit-Wolf shrinkage: there are
    usually fewer photos than feature dimensions), as in Lee et al. 2018."""
    from sklearn.covariance import LedoitWolf

    means = np.stack([embeddings[labels == c].mean(axis=0) for c in range(classes)])
    centred = embeddings - means[labels]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    values, vectors = np.linalg.eigh(covariance)
    whitening = vectors / np.sqrt(np.maximum(values, 1e-12))
    return {"means": means.astype(np.float32), "whitening": whitening.astype(np.float32)}


def embedding_width(model) -> int | None:
    """A backbone's embedding is its last pooled feature map (the last of --feature-layers, by default the
    backbone's own output): the last this many columns of the pooled features. None for cnn and mlp."""
    names = [layer.name for layer in model.layers]
    if "pool" not in names:
        return None
    taps = sorted((name for name in names if name.startswith("pool_")), key=lambda name: int(name[5:]))
    return int(model.get_layer(taps[-1] if taps else "pool").output.shape[-1])


class Embedder:
    """A run's model as probabilities plus the embedding the check compares. For a backbone, its last
    pooled feature map (see embedding_width; features from features.py): what the backbone makes of the
    photo, whatever the head does with it. For cnn and mlp, the input of the head's last Dense layer."""

    def __init__(self, model, features=None) -> None:
        from .tf_env import import_keras

        keras = import_keras()
        head = model.get_layer("head")
        self.width = embedding_width(model) if features is not None else None
        self.head = (
            head
            if self.width
            else keras.Model(head.input, [head.output, head.get_layer("predictions").input])
        )
        self.front = (
            None if features is not None else keras.Model(model.input, model.get_layer("flatten").output)
        )
        self.features = features

    def of_features(self, features: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        features = np.asarray(features, np.float32)
        if self.width:
            parts = [np.asarray(self.head(features[start : start + batch_size], training=False))
                     for start in range(0, len(features), batch_size)]  # fmt: skip
            probabilities = np.concatenate(parts) if parts else np.zeros((0, self.head.output.shape[-1]))
            return probabilities, features[:, -self.width :]
        parts = [self.head(features[start : start + batch_size], training=False)
                 for start in range(0, len(features), batch_size)]  # fmt: skip
        if not parts:
            return np.zeros((0, self.head.output[0].shape[-1])), np.zeros((0, self.head.output[1].shape[-1]))
        return tuple(np.concatenate([np.asarray(part[i]) for part in parts]) for i in (0, 1))

    def of_images(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """uint8 photos as load_array makes them -> (probabilities, embeddings)."""
        if self.features is not None:
            return self.of_features(self.features.of_images(images, batch_size))
        rows = [np.asarray(self.front(np.asarray(images[start : start + batch_size], np.float32), training=False))
                for start in range(0, len(images), batch_size)]  # fmt: skip
        return self.of_features(np.concatenate(rows) if rows else np.zeros((0, self.front.output.shape[-1])))

    def of_split(self, dataset, split: str, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        if self.features is not None:
            return self.of_features(self.features.of_split(dataset, split, batch_size))
        return self.of_images(dataset.arrays(split)[0], batch_size)


def trainer_embedder(trainer, model) -> Embedder:
    """The trained model's Embedder: the cached features of the frozen backbone, or (fine-tuned) the
    backbone as it is now, run by Keras itself once over the splits (no cache: nothing reuses them)."""
    config = trainer.config
    if not config.spec.pretrained:
        return Embedder(model)
    if not config.fine_tunes:
        return Embedder(model, trainer.features)
    from .features import BackboneFeatures, split_model

    features = BackboneFeatures(
        split_model(model)[0], config.spec.name, config.image_size, trainer.workspace, "keras",
        trainer.print_fn, writes=False, layers=tuple(config.feature_layers),
    )  # fmt: skip
    return Embedder(model, features)


@dataclass(frozen=True)
class RunChecks:
    """What fit_checks found: the calibrated model and the numbers metrics.json gets."""

    model: object
    metrics: dict


def fit_checks(trainer, model) -> RunChecks:
    """After training, before the test evaluation: temperature scaling and the "none of these" check, both
    fitted on the training and validation photos, saved into the run (openset.npz, reliability.png)."""
    from . import calibration as calibrating
    from .reports import save_figure

    run, dataset, config = trainer.run, trainer.dataset, trainer.config
    embedder = trainer_embedder(trainer, model)
    outputs = {
        split: embedder.of_split(dataset, split, config.batch_size)
        for split in ("train", "validation", "test")
    }
    truth = {split: np.asarray(dataset.arrays(split)[1]) for split in outputs}
    temperature = calibrating.fit_temperature(outputs["validation"][0], truth["validation"])
    test_probabilities = calibrating.scaled(outputs["test"][0], temperature)
    metrics = {"calibration": calibrating.calibration_metrics(
        temperature, (outputs["validation"][0], truth["validation"]), (test_probabilities, truth["test"])
    )}  # fmt: skip
    before = calibrating.reliability(outputs["test"][0], truth["test"])
    figure = calibrating.reliability_figure(
        before, calibrating.reliability(test_probabilities, truth["test"]), run.title
    )
    save_figure(figure, run.file("reliability.png"))
    check = _fit_check(config, outputs, truth, temperature, len(dataset.labels))
    if check is not None:
        check.save(run)
        test_scores = check.scores(outputs["test"][1], test_probabilities)
        metrics["open_set"] = {
            "method": check.method, "threshold": round(check.threshold, 6), "known_rate": check.known_rate,
            "test_known_rate": round(float(check.known(test_scores).mean()), 4) if len(test_scores) else None,
            "bytes": run.file(FILE).stat().st_size,
        }  # fmt: skip
        trainer.print_fn(check.describe())
    else:
        trainer.print_fn('No "none of these" check: the validation split is empty')
    calibration = metrics["calibration"]
    trainer.print_fn(
        f"Calibration: temperature {temperature:.3g}; expected calibration error on the test photos "
        f"{calibration['test_ece_before']:.1%} before, {calibration['test_ece_after']:.1%} after"
    )
    return RunChecks(calibrating.with_temperature(model, temperature), metrics)


def _fit_check(config, outputs: dict, truth: dict, temperature: float, classes: int) -> OpenSet | None:
    from .calibration import scaled

    if len(truth["validation"]) == 0:
        return None
    check = OpenSet.fit(DEFAULT_METHOD, outputs["train"][1], truth["train"], classes, config.seed)
    validation = check.scores(outputs["validation"][1], scaled(outputs["validation"][0], temperature))
    return check.with_threshold(validation, getattr(config, "known_rate", DEFAULT_KNOWN_RATE))
