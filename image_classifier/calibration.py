"""Calibrated confidence: temperature scaling fitted on the validation split, and how far "90%" is from 90%.

A network trained with cross-entropy is usually overconfident; dividing its logits by one number T, chosen
to give the validation photos the lowest log loss, fixes most of that without changing any prediction's
order (Guo et al. 2017, "On Calibration of Modern Neural Networks"). The model's softmax probabilities are
scaled as softmax(log p / T), which equals softmax(z / T) for the logits z, so no layer has to change.
The expected calibration error (ECE) is the gap between confidence and accuracy, averaged over 15 equal
confidence bins weighted by their photo counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from .fonts import use_fonts_for

BINS = 15
SMALLEST = 1e-30
"""Probabilities below this are treated as this before their logarithm (float32 keeps ~1e-38)."""
TEMPERATURE_RANGE = (0.05, 20.0)
PRIOR_SPREAD = 0.5
"""Standard deviation of the prior on log T: before any photo, T is within 0.37..2.7 at 95%."""


def scaled(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) row by row, in float64."""
    logits = np.log(np.maximum(np.asarray(probabilities, np.float64), SMALLEST)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def log_loss(probabilities: np.ndarray, truth: np.ndarray) -> float:
    picked = np.asarray(probabilities, np.float64)[np.arange(len(truth)), np.asarray(truth)]
    return float(-np.mean(np.log(np.maximum(picked, SMALLEST))))


def fit_temperature(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE with the lowest log loss on these (validation) photos, 1 with none.

    A few validation photos all classified right would drive T towards 0 (ever more confident); a normal
    prior on log T (PRIOR_SPREAD) keeps T near 1 until enough photos say otherwise (a MAP estimate).
    """
    from scipy.optimize import minimize_scalar

    if len(truth) == 0:
        return 1.0
    low, high = np.log(TEMPERATURE_RANGE)
    count = len(truth)
    result = minimize_scalar(
        lambda log_t: (
            count * log_loss(scaled(probabilities, float(np.exp(log_t))), truth)
            + log_t**2 / (2 * PRIOR_SPREAD**2)
        ),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


@dataclass(frozen=True)
class Reliability:
    """Per confidence bin: photos, mean confidence, accuracy; and the ECE they add up to."""

    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    ece: float


def reliability(probabilities: np.ndarray, truth: np.ndarray, bins: int = BINS) -> Reliability:
    probabilities = np.asarray(probabilities, np.float64)
    confidence = probabilities.max(axis=1) if len(probabilities) else np.zeros(0)
    correct = probabilities.argmax(axis=1) == np.asarray(truth) if len(probabilities) else np.zeros(0)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    counts = np.bincount(which, minlength=bins)
    sums = np.bincount(which, weights=confidence, minlength=bins)
    hits = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence, accuracy = sums / counts, hits / counts
    gaps = np.abs(np.nan_to_num(mean_confidence) - np.nan_to_num(accuracy)) * counts
    ece = float(gaps.sum() / max(1, counts.sum()))
    return Reliability(counts, mean_confidence, accuracy, ece)


def expected_calibration_error(probabilities: np.ndarray, truth: np.ndarray, bins: int = BINS) -> float:
    return reliability(probabilities, truth, bins).ece


def calibration_metrics(temperature: float, validation: tuple, test: tuple) -> dict:
    """metrics.json's "calibration": T and the ECE before and after scaling, on validation and test.

    `validation` holds unscaled probabilities and labels; `test` the scaled probabilities (what the saved
    model returns) and labels, unscaled again with T itself for the "before" number.
    """
    (val_probabilities, val_truth), (test_probabilities, test_truth) = validation, test
    before_test = scaled(test_probabilities, 1.0 / temperature)
    return {
        "method": "temperature scaling on the validation split",
        "temperature": round(temperature, 4),
        "bins": BINS,
        "validation_ece_before": round(expected_calibration_error(val_probabilities, val_truth), 4),
        "validation_ece_after": round(
            expected_calibration_error(scaled(val_probabilities, temperature), val_truth), 4
        ),
        "test_ece_before": round(expected_calibration_error(before_test, test_truth), 4),
        "test_ece_after": round(expected_calibration_error(test_probabilities, test_truth), 4),
    }


def reliability_figure(before: Reliability, after: Reliability, title: str, split: str = "test") -> Figure:
    """Accuracy against confidence per bin, before and after scaling; the diagonal is perfect calibration."""
    figure = Figure(figsize=(9.0, 4.4), layout="constrained")
    edges = np.linspace(0, 1, len(before.counts) + 1)
    width = edges[1] - edges[0]
    for ax, shown, name in zip(figure.subplots(1, 2), (before, after), ("before", "after"), strict=True):
        filled = shown.counts > 0
        ax.bar(edges[:-1][filled], shown.accuracy[filled], width=width, align="edge", color="tab:blue",
               edgecolor="white", label="accuracy")  # fmt: skip
        ax.bar(edges[:-1][filled], (shown.confidence - shown.accuracy)[filled], bottom=shown.accuracy[filled],
               width=width, align="edge", color="tab:red", alpha=0.35, label="gap to confidence")  # fmt: skip
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
        ax.set_title(f"{name} temperature scaling: ECE {shown.ece:.1%}")
        ax.legend(loc="upper left", fontsize="small")
    figure.suptitle(f"{title}\nreliability on the {split} photos ({int(before.counts.sum())})")
    return use_fonts_for(figure)


def with_temperature(model, temperature: float):
    """The same model with layers.Temperature at the end of its head, so model.keras returns calibrated
    probabilities and a backbone's head on cached features (predict.py, the test evaluation) does too."""
    from .layers import Temperature
    from .tf_env import import_keras

    keras = import_keras()
    head = model.get_layer("head")
    calibrated = keras.Model(
        head.input, Temperature(temperature, name="temperature")(head.output), name="head"
    )
    feeder = model.get_layer("pool" if _is_backbone(model) else "flatten")
    return keras.Model(model.input, calibrated(feeder.output), name=model.name)


def _is_backbone(model) -> bool:
    return any(layer.name == "pool" for layer in model.layers)
