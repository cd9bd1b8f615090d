"""Test-set evaluation: loss, accuracy, per-class precision/recall/F1, the confusion matrix."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .fonts import use_fonts_for


def compute_metrics(probabilities: np.ndarray, truth: np.ndarray, labels: list[str]) -> dict:
    """Everything metrics.json holds, from predicted probabilities and true class ids."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    predicted = probabilities.argmax(axis=1)
    classes = list(range(len(labels)))
    picked = probabilities[np.arange(len(truth)), truth]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))  # the same clipping as Keras's crossentropy
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=classes, zero_division=0
    )
    macro = precision_recall_fscore_support(
        truth, predicted, labels=classes, average="macro", zero_division=0
    )
    return {
        "test_loss": loss,
        "test_accuracy": float(np.mean(predicted == truth)),
        "test_count": int(len(truth)),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "macro_avg": {"precision": float(macro[0]), "recall": float(macro[1]), "f1": float(macro[2])},
        "confusion_matrix": {
            "labels": list(labels),
            "rows": "true class",
            "columns": "predicted class",
            "matrix": confusion_matrix(truth, predicted, labels=classes).tolist(),
        },
    }


def format_report(metrics: dict) -> str:
    """The per-class table printed at the end of training."""
    labels = list(metrics["per_class"])
    from .text import column_width, pad

    width = column_width("class", *labels, "macro avg")
    lines = [f"{pad('class', width)}  precision  recall     f1  support"]
    for label, row in metrics["per_class"].items():
        lines.append(
            f"{pad(label, width)}  {row['precision']:>9.3f}  {row['recall']:>6.3f}  {row['f1']:>5.3f}  {row['support']:>7}"
        )
    macro = metrics["macro_avg"]
    lines.append(
        f"{pad('macro avg', width)}  {macro['precision']:>9.3f}  {macro['recall']:>6.3f}  {macro['f1']:>5.3f}"
        f"  {metrics['test_count']:>7}"
    )
    return "\n".join(lines)


def confusion_matrix_figure(metrics: dict) -> Figure:
    """A labelled confusion matrix: counts in each cell, rows the true class."""
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    labels = metrics["confusion_matrix"]["labels"]
    size = max(4.0, 0.6 * len(labels) + 2.5)
    figure = Figure(figsize=(size + 1, size), layout="tight")
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    accuracy = metrics["test_accuracy"]
    axes.set_title(f"Test set: {accuracy:.1%} correct of {metrics['test_count']}")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(
            column, row, str(count), ha="center", va="center", color="white" if count > threshold else "black"
        )
    return use_fonts_for(figure)
