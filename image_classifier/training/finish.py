"""A run's first and last files: config.json as it starts; the model, history, test evaluation and reports as it ends."""

from __future__ import annotations

import contextlib
import csv
import io
import platform
import sys
import time

import numpy as np

from ..dataset import Dataset
from ..runs import RunFolder
from .config import TrainConfig


def _versions() -> dict:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("tensorflow", "tensorflow-cpu", "keras", "numpy", "pillow", "scikit-learn"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def write_config(run: RunFolder, config: TrainConfig, dataset: Dataset, distribution) -> None:
    """labels.json and config.json: what the run is, written before its first epoch."""
    spec, labels = config.spec, dataset.labels
    run.write_json("labels.json", labels)
    run.write_json(
        "config.json",
        {
            "options": config.options(),
            "model": {"name": spec.name, "family": spec.family, "application": spec.application},
            "labels": labels,
            "data": {
                "dataset": str(dataset.path),
                "fingerprint": dataset.fingerprint,
                "counts": dataset.info["counts"],
                "splits_given": dataset.info["splits_given"],
                "decisions": dataset.info.get("decisions"),
            },
            "distribution": {
                "strategy": distribution.name,
                "replicas": distribution.replicas,
                "workers": distribution.workers,
                "global_batch_size": distribution.global_batch(config.batch_size),
                "learning_rate": distribution.scaled_learning_rate(config.learning_rate),
            },
            "versions": _versions(),
            "command": sys.argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def finish_run(trainer, model) -> None:
    """The chief's last step: the model, history, test evaluation and reports, then the backup goes."""
    from ..evaluate import compute_metrics, confusion_matrix_figure
    from ..openset import fit_checks
    from ..reports import save_figure
    from ..tensorboard_logging import log_run_summaries

    run, dataset, state = trainer.run, trainer.dataset, trainer.state
    checks = fit_checks(trainer, model)  # calibration and "none of these", fitted before the test evaluation
    model = checks.model
    run.save_model(model)
    run.write_history(state.history)
    seconds = trainer.backup.elapsed()
    y_test = dataset.arrays("test")[1]
    probabilities = _test_probabilities(trainer, model)
    metrics = compute_metrics(probabilities, np.asarray(y_test), dataset.labels) | checks.metrics
    metrics["training"] = {
        "epochs_run": len(state.history.get("loss", [])),
        "best_epoch": trainer.checkpoint.best_epoch,
        "best_validation": trainer.checkpoint.best_logs,
        "fine_tune_start_epoch": state.fine_tune_start,
        "seconds": round(seconds, 1),
    }
    if "features" in vars(trainer):  # the backbone ran through features.py
        features = trainer.features
        metrics["features"] = {
            "engine": features.engine_name,
            "computed": features.computed,
            "reused": features.reused,
            "seconds": round(features.seconds, 1),
        }
    run.write_bytes("test_predictions.csv", _predictions_csv(dataset, probabilities, np.asarray(y_test)))
    save_figure(confusion_matrix_figure(metrics), run.file("confusion_matrix.png"))
    run.write_json("metrics.json", metrics)
    trainer.backup.remove()
    run.mark_latest()
    log_run_summaries(run)
    _print_summary(trainer, metrics, seconds)


def _test_probabilities(trainer, model) -> np.ndarray:
    """The kept model on the test photos; with an unchanged frozen backbone, its head on the cached features.

    The head on the backbone's features is the whole model (tests check they agree within 1e-4), and the
    features come from the fast engine, once.
    """
    from ..pipeline import image_batches, images_only

    config, dataset = trainer.config, trainer.dataset
    if config.spec.pretrained and not config.fine_tunes:
        features = trainer.features.of_split(dataset, "test", config.batch_size)
        return model.get_layer("head").predict(features, batch_size=config.batch_size, verbose=0)
    x = dataset.arrays("test")[0]
    batches = image_batches(x, np.zeros(len(x), np.int32), config.batch_size)
    return model.predict(images_only(batches), verbose=0)


def _print_summary(trainer, metrics: dict, seconds: float) -> None:
    from ..evaluate import format_report

    print_fn, checkpoint = trainer.print_fn, trainer.checkpoint
    epochs, start = len(trainer.state.history.get("loss", [])), trainer.state.fine_tune_start
    phases = f"{start} + {epochs - start}" if start else f"{epochs}"
    if checkpoint.best_epoch is None:
        kept = "no epoch gave a finite validation loss, so the last weights were kept"
    else:
        logs = checkpoint.best_logs
        kept = (
            f"best epoch {checkpoint.best_epoch + 1} (val_loss {logs.get('val_loss', float('nan')):.4f}, "
            f"val_accuracy {logs.get('val_accuracy', float('nan')):.4f})"
        )
    print_fn(f"Trained {trainer.config.spec.name} for {phases} epochs in {seconds:.0f}s; {kept}")
    if "features" in vars(trainer):
        print_fn(trainer.features.summary())
    print_fn(f"Test loss: {metrics['test_loss']:.4f}")
    print_fn(f"Test accuracy: {metrics['test_accuracy']:.4f}")
    print_fn(format_report(metrics))
    print_fn(f"Run saved to: {trainer.run.path}")


def _predictions_csv(dataset: Dataset, probabilities: np.ndarray, truth: np.ndarray) -> bytes:
    """One row per test image: its source file, true and predicted class, and the confidence."""
    labels, sources = dataset.labels, dataset.source_files("test")
    predicted = probabilities.argmax(axis=1)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "path", "true", "predicted", "confidence", "correct"])
    for index, (true, guess) in enumerate(zip(truth, predicted, strict=True)):
        source = sources[index] if index < len(sources) else ""
        confidence = f"{probabilities[index, guess]:.4f}"
        writer.writerow([index, source, labels[true], labels[guess], confidence, int(true == guess)])
    return buffer.getvalue().encode("utf-8")
