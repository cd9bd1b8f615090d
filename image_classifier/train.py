"""The training stage: prepared arrays -> a trained, evaluated model in a new run folder.

Transfer learning runs in two phases. Phase 1 trains the new head on the frozen backbone; without
augmentation the backbone's output for each image never changes, so it is computed once and the head
trains on those cached features (seconds per epoch instead of minutes on a CPU). Phase 2, when asked
for, unfreezes the top backbone layers (BatchNorm kept in inference mode) and continues at a lower
learning rate on the images themselves.
"""

from __future__ import annotations

import contextlib
import csv
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .config import Workspace
from .dataset import Dataset
from .errors import UserError
from .models import DEFAULT_MODEL, ModelSpec, check_image_size, check_weights, get_spec
from .preprocess import DEFAULT_RESIZE, DEFAULT_SPLIT, PreprocessOptions, prepare_dataset

OPTIMIZERS = ("adam", "rmsprop", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Every training option; None means "the model's own default" (see resolve())."""

    categories: tuple[str, ...]
    images_dir: Path
    model: str = DEFAULT_MODEL
    epochs: int | None = None
    batch_size: int = 32
    image_size: int | None = None
    optimizer: str = "adam"
    learning_rate: float | None = None
    dropout: float | None = None
    dense_units: tuple[int, ...] | None = None
    l2: float = 0.0
    augment: bool = False
    fine_tune_layers: int | None = None
    fine_tune_epochs: int | None = None
    fine_tune_learning_rate: float | None = None
    early_stopping: int = 5
    class_weight: str = "none"
    seed: int = 0
    weights: str | None = None
    resize: str = DEFAULT_RESIZE
    split: tuple[float, float, float] = DEFAULT_SPLIT
    dedupe: str = "exact"
    workers: int = field(default=0, compare=False)

    def resolve(self) -> TrainConfig:
        """Fill model-dependent defaults and check the combination before any slow work."""
        spec = get_spec(self.model)
        resolved = replace(
            self,
            epochs=self.epochs or spec.epochs,
            image_size=self.image_size or spec.default_image_size,
            learning_rate=self.learning_rate or spec.learning_rate,
            dropout=spec.dropout if self.dropout is None else self.dropout,
            dense_units=spec.dense_units if self.dense_units is None else tuple(self.dense_units),
            fine_tune_layers=spec.fine_tune_layers
            if self.fine_tune_layers is None
            else self.fine_tune_layers,
            fine_tune_epochs=spec.fine_tune_epochs
            if self.fine_tune_epochs is None
            else self.fine_tune_epochs,
            weights=self.weights or ("imagenet" if spec.pretrained else "none"),
        )
        resolved = replace(
            resolved, fine_tune_learning_rate=self.fine_tune_learning_rate or resolved.learning_rate / 10
        )
        if len(resolved.categories) < 2:
            raise UserError("a classifier needs at least 2 categories; write them like --categories cat,dog")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown --optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if not 0 <= resolved.dropout < 1:
            raise UserError(f"--dropout must be at least 0 and below 1, got {resolved.dropout}")
        if resolved.l2 < 0:
            raise UserError(f"--l2 must be 0 or more, got {resolved.l2}")
        if self.class_weight not in ("none", "auto"):
            raise UserError(f"unknown --class-weight {self.class_weight!r}; choose auto or none")
        if resolved.fine_tune_epochs and resolved.fine_tune_layers and not spec.pretrained:
            raise UserError(
                f"{spec.name} has no pretrained backbone to fine-tune; drop --fine-tune-* options"
            )
        check_image_size(spec, resolved.image_size)
        check_weights(spec, resolved.weights)
        return resolved

    @property
    def spec(self) -> ModelSpec:
        return get_spec(self.model)

    def preprocess_options(self) -> PreprocessOptions:
        return PreprocessOptions(
            categories=tuple(self.categories),
            images_dir=self.images_dir,
            image_size=self.image_size,
            resize=self.resize,
            split=self.split,
            seed=self.seed,
            dedupe=self.dedupe,
            workers=self.workers,
        )


def _versions() -> dict:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("tensorflow", "tensorflow-cpu", "keras", "numpy", "pillow", "scikit-learn"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def _optimizer(keras, name: str, learning_rate: float):
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    return keras.optimizers.Adam(learning_rate)


def _class_weights(config: TrainConfig, y: np.ndarray, classes: int) -> dict | None:
    if config.class_weight != "auto":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(classes), y=y)
    return {i: float(w) for i, w in enumerate(weights)}


def _callbacks(keras, run: Path, checkpoint, patience: int, extra=()):
    callbacks = [
        *extra,  # first, so what they add to the logs reaches TensorBoard and the CSV
        keras.callbacks.TensorBoard(log_dir=str(run / "logs")),
        keras.callbacks.CSVLogger(str(run / "training_log.csv"), append=True),
        checkpoint,
    ]
    if patience > 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
        )
    return callbacks


def _merge(history: dict, more: dict) -> dict:
    merged = {key: list(values) for key, values in history.items()}
    for key, values in more.items():
        merged.setdefault(key, [float("nan")] * len(next(iter(history.values()), [])))
        merged[key].extend(float(v) for v in values)
    return merged


def _predict_probabilities(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    from .pipeline import image_batches, images_only

    return model.predict(images_only(image_batches(x, np.zeros(len(x), np.int32), batch_size)), verbose=0)


def train(config: TrainConfig, workspace: Workspace, print_fn=print) -> Path:
    """Run the whole stage; returns the run folder."""
    config = config.resolve()
    dataset = prepare_dataset(config.preprocess_options(), workspace, print_fn=print_fn)
    return train_on_dataset(config, dataset, workspace, print_fn=print_fn)


def train_on_dataset(config: TrainConfig, dataset: Dataset, workspace: Workspace, print_fn=print) -> Path:
    from .callbacks import BestModelCheckpoint, EpochTimer
    from .evaluate import compute_metrics, format_report, plot_confusion_matrix
    from .models import build_model, unfreeze_top
    from .pipeline import image_batches, images_only, make_augmenter
    from .runs import create_run, mark_latest, save_model_atomic, write_json, write_pickle
    from .tensorboard_logging import log_run_summaries
    from .tf_env import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(config.seed)
    spec = config.spec
    labels = dataset.labels
    started = time.monotonic()
    built = build_model(
        spec,
        len(labels),
        config.image_size,
        resize=config.resize,
        weights=config.weights,
        dropout=config.dropout,
        dense_units=config.dense_units,
        l2=config.l2,
    )
    x_train, y_train = dataset.arrays("train")
    x_val, y_val = dataset.arrays("validation")
    x_test, y_test = dataset.arrays("test")

    run = create_run(workspace, spec.name)
    print_fn(f"Run folder: {run}")
    write_json(run / "labels.json", labels)
    write_json(
        run / "config.json",
        {
            "options": {**asdict(config), "images_dir": str(config.images_dir)},
            "model": {"name": spec.name, "family": spec.family, "application": spec.application},
            "labels": labels,
            "data": {
                "dataset": str(dataset.path),
                "fingerprint": dataset.fingerprint,
                "counts": dataset.info["counts"],
                "splits_given": dataset.info["splits_given"],
            },
            "versions": _versions(),
            "command": sys.argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    checkpoint = BestModelCheckpoint(built.model, run / "model.keras")
    timer = EpochTimer()
    class_weight = _class_weights(config, y_train, len(labels))
    augmenter = make_augmenter(config.seed) if config.augment else None
    val_batches = image_batches(x_val, y_val, config.batch_size)

    def fit(model, learning_rate: float, x, epochs: int, validation, initial_epoch: int = 0, **data):
        model.compile(
            optimizer=_optimizer(keras, config.optimizer, learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
        )
        result = model.fit(
            x,
            epochs=epochs,
            initial_epoch=initial_epoch,
            validation_data=validation,
            class_weight=class_weight,
            callbacks=_callbacks(keras, run, checkpoint, config.early_stopping, [timer]),
            verbose=2,
            **data,
        )
        return {key: [float(v) for v in values] for key, values in result.history.items()}

    def train_batches():
        return image_batches(
            x_train, y_train, config.batch_size, shuffle=True, seed=config.seed, augmenter=augmenter
        )

    if spec.pretrained and not config.augment:
        print_fn(f"Phase 1: computing {spec.name} features once for {len(y_train) + len(y_val)} images")
        train_features = built.features.predict(
            images_only(image_batches(x_train, y_train, config.batch_size)), verbose=1
        )
        val_features = built.features.predict(images_only(val_batches), verbose=1)
        print_fn(f"Phase 1: training the head on cached features for up to {config.epochs} epochs")
        history = fit(
            built.head, config.learning_rate, train_features, config.epochs, (val_features, y_val),
            y=y_train, batch_size=config.batch_size, shuffle=True,
        )  # fmt: skip
    else:
        what = "the head on the frozen backbone" if spec.pretrained else f"{spec.name} from scratch"
        print_fn(f"Phase 1: training {what} for up to {config.epochs} epochs")
        # shuffle=False: the tf.data pipeline reshuffles every epoch itself
        history = fit(
            built.model, config.learning_rate, train_batches(), config.epochs, val_batches, shuffle=False
        )
    fine_tune_start = None

    if spec.pretrained and config.fine_tune_layers and config.fine_tune_epochs:
        checkpoint.restore_best()
        fine_tune_start = len(history["loss"])
        unfrozen = unfreeze_top(built, config.fine_tune_layers)
        print_fn(
            f"Phase 2: fine-tuning the top {config.fine_tune_layers} backbone layers ({unfrozen} with weights, "
            f"BatchNorm frozen) at learning rate {config.fine_tune_learning_rate:g} for up to "
            f"{config.fine_tune_epochs} epochs"
        )
        more = fit(
            built.model, config.fine_tune_learning_rate, train_batches(), fine_tune_start + config.fine_tune_epochs,
            val_batches, initial_epoch=fine_tune_start, shuffle=False,
        )  # fmt: skip
        history = _merge(history, more)

    checkpoint.restore_best()
    save_model_atomic(built.model, run / "model.keras")
    write_pickle(run / "history.pickle", history)
    write_json(run / "history.json", history)
    train_seconds = time.monotonic() - started

    probabilities = _predict_probabilities(built.model, x_test, config.batch_size)
    metrics = compute_metrics(probabilities, np.asarray(y_test), labels)
    metrics["training"] = {
        "epochs_run": len(history["loss"]),
        "best_epoch": checkpoint.best_epoch,
        "best_validation": checkpoint.best_logs,
        "fine_tune_start_epoch": fine_tune_start,
        "seconds": round(train_seconds, 1),
    }
    write_json(run / "metrics.json", metrics)
    _write_predictions(run / "test_predictions.csv", dataset, probabilities, np.asarray(y_test), labels)
    plot_confusion_matrix(metrics, run / "confusion_matrix.png")
    mark_latest(workspace, run)
    log_run_summaries(run)

    phases = (
        f"{fine_tune_start} + {len(history['loss']) - fine_tune_start}"
        if fine_tune_start
        else f"{len(history['loss'])}"
    )
    print_fn(
        f"Trained {spec.name} for {phases} epochs in {train_seconds:.0f}s; best epoch {checkpoint.best_epoch + 1} "
        f"(val_loss {checkpoint.best_logs.get('val_loss', float('nan')):.4f}, "
        f"val_accuracy {checkpoint.best_logs.get('val_accuracy', float('nan')):.4f})"
    )
    print_fn(f"Test loss: {metrics['test_loss']:.4f}")
    print_fn(f"Test accuracy: {metrics['test_accuracy']:.4f}")
    print_fn(format_report(metrics))
    print_fn(f"Run saved to: {run}")
    return run


def _write_predictions(
    path: Path, dataset: Dataset, probabilities: np.ndarray, truth: np.ndarray, labels
) -> None:
    """One row per test image: its source file, true and predicted class, and the confidence."""
    sources = dataset.source_files("test")
    predicted = probabilities.argmax(axis=1)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "path", "true", "predicted", "confidence", "correct"])
        for index, (true, guess) in enumerate(zip(truth, predicted, strict=True)):
            source = sources[index] if index < len(sources) else ""
            writer.writerow(
                [
                    index,
                    source,
                    labels[true],
                    labels[guess],
                    f"{probabilities[index, guess]:.4f}",
                    int(true == guess),
                ]
            )
