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
import io
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .atomic import write_atomic, write_json
from .config import Workspace
from .dataset import Dataset
from .distribute import check_strategy
from .errors import UserError
from .models import DEFAULT_MODEL, ModelSpec, check_image_size, check_weights, get_spec
from .preprocess import DEFAULT_RESIZE, DEFAULT_SPLIT, PreprocessOptions, prepare_dataset

OPTIMIZERS = ("adam", "rmsprop", "sgd")
LR_SCHEDULES = ("cosine", "constant")


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
    lr_schedule: str | None = None
    dropout: float | None = None
    dense_units: tuple[int, ...] | None = None
    l2: float = 0.0
    batch_norm: bool | None = None
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
    distribute: str = "none"
    workers: int = field(default=0, compare=False)

    def resolve(self) -> TrainConfig:
        """Fill model-dependent defaults and check the combination before any slow work."""
        spec = get_spec(self.model)
        resolved = replace(
            self,
            epochs=self.epochs or spec.epochs,
            image_size=self.image_size or spec.default_image_size,
            learning_rate=self.learning_rate or spec.learning_rate,
            lr_schedule=self.lr_schedule or spec.lr_schedule,
            batch_norm=spec.batch_norm if self.batch_norm is None else self.batch_norm,
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
        if resolved.lr_schedule not in LR_SCHEDULES:
            raise UserError(
                f"unknown --lr-schedule {resolved.lr_schedule!r}; choose from {', '.join(LR_SCHEDULES)}"
            )
        if not 0 <= resolved.dropout < 1:
            raise UserError(f"--dropout must be at least 0 and below 1, got {resolved.dropout}")
        if resolved.batch_norm and spec.family != "cnn":
            raise UserError(
                f"--batch-norm adds BatchNormalization to cnn's conv blocks; {spec.name} has none "
                "(use --model cnn, or leave out --batch-norm)"
            )
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
        check_strategy(resolved.distribute)
        return resolved

    @property
    def spec(self) -> ModelSpec:
        return get_spec(self.model)

    def options(self) -> dict:
        """As stored in a run's config.json."""
        return {**asdict(self), "images_dir": str(self.images_dir)}

    @classmethod
    def from_options(cls, options: dict) -> TrainConfig:
        """Back from config.json (JSON has lists where the config has tuples), resolved again."""
        known = {item.name for item in fields(cls)}
        values = {key: value for key, value in options.items() if key in known}
        values["images_dir"] = Path(values["images_dir"])
        values.setdefault("lr_schedule", "constant")  # runs made before these options existed
        values.setdefault("batch_norm", False)
        for key in ("categories", "split", "dense_units"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values).resolve()

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


def _optimizer(keras, name: str, learning_rate: float, schedule: str, decay_steps: int):
    """The named optimizer; "cosine" lowers the rate along a half cosine to 0 over `decay_steps` steps.

    The schedule is a function of the optimizer's step count, which the backup restores, so a resumed
    run continues on the same curve.
    """
    if schedule == "cosine" and decay_steps > 0:
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
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


def _predict_probabilities(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    from .pipeline import image_batches, images_only

    return model.predict(images_only(image_batches(x, np.zeros(len(x), np.int32), batch_size)), verbose=0)


def train(config: TrainConfig, workspace: Workspace, print_fn=print) -> Path | None:
    """Run the whole stage; returns the run folder (None on a multi-worker run's other workers)."""
    config = config.resolve()
    dataset = prepare_dataset(config.preprocess_options(), workspace, print_fn=print_fn)
    return train_on_dataset(config, dataset, workspace, print_fn=print_fn)


RESUME_KEEPS = frozenset({"workers"})
"""Options a resumed run may take from the new command line; every other one is the run's own."""


def resume(workspace: Workspace, name: str, given: dict, print_fn=print) -> Path | None:
    """Continue an interrupted run from its last finished epoch, with the options it was started with.

    `given` holds the training options typed on this command line; one that differs from the run's
    own is an error rather than silently ignored or silently changing a half-trained run.
    """
    from .resume import find_resumable, load_state

    run = find_resumable(workspace, name)
    try:
        saved = json.loads((run / "config.json").read_text(encoding="utf-8"))
        config = TrainConfig.from_options(saved["options"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot resume {run}: its config.json is unreadable ({error})") from None
    config = replace(config, **{key: value for key, value in given.items() if key in RESUME_KEEPS})
    differing = [
        f"--{key.replace('_', '-')} {_shown(value)} (the run has {_shown(getattr(config, key))})"
        for key, value in given.items()
        if key not in RESUME_KEEPS
        and hasattr(config, key)
        and _normal(value) != _normal(getattr(config, key))
    ]
    if differing:
        raise UserError(
            f"--resume continues {run.name} with its own options, but this command asks for "
            f"{'; '.join(differing)}; drop those options, or start a new run without --resume"
        )
    dataset = prepare_dataset(config.preprocess_options(), workspace, print_fn=print_fn)
    if dataset.fingerprint != saved.get("data", {}).get("fingerprint"):
        raise UserError(
            f"the images of {run.name} changed since it started, so it cannot continue on the same data; "
            "start a new run without --resume"
        )
    return train_on_dataset(config, dataset, workspace, print_fn=print_fn, run=run, state=load_state(run))


def _normal(value):
    if isinstance(value, (list, tuple)):
        return tuple(_normal(item) for item in value)
    if isinstance(value, Path):
        return str(value)
    return value


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def _write_config(run: Path, config: TrainConfig, dataset: Dataset, labels, distribution) -> None:
    spec = config.spec
    write_json(run / "labels.json", labels)
    write_json(
        run / "config.json",
        {
            "options": config.options(),
            "model": {"name": spec.name, "family": spec.family, "application": spec.application},
            "labels": labels,
            "data": {
                "dataset": str(dataset.path),
                "fingerprint": dataset.fingerprint,
                "counts": dataset.info["counts"],
                "splits_given": dataset.info["splits_given"],
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


def train_on_dataset(
    config: TrainConfig,
    dataset: Dataset,
    workspace: Workspace,
    print_fn=print,
    run: Path | None = None,
    state=None,
) -> Path | None:
    """Train, evaluate and save; with `run` and `state`, continue that interrupted run instead of a new one.

    Under a multi-worker strategy every worker runs this; only the chief writes the run folder (and
    returns it), the others return None.
    """
    from .callbacks import BestModelCheckpoint, EpochBackup, EpochTimer, ResumableEarlyStopping
    from .distribute import make_distribution
    from .models import build_model, unfreeze_top
    from .pipeline import batch_source, images_only, make_augmenter
    from .resume import FINISHED, GracefulStop, RunBackup, TrainingState
    from .runs import create_run
    from .tf_env import import_keras

    distribution = make_distribution(config.distribute)  # first: multi-worker needs it before any TF work
    chief = distribution.is_chief
    keras = import_keras()
    keras.utils.set_random_seed(config.seed)
    spec = config.spec
    labels = dataset.labels
    with distribution.scope():
        built = build_model(
            spec,
            len(labels),
            config.image_size,
            resize=config.resize,
            weights=config.weights,
            dropout=config.dropout,
            dense_units=config.dense_units,
            l2=config.l2,
            batch_norm=config.batch_norm,
        )
    x_train, y_train = dataset.arrays("train")
    x_val, y_val = dataset.arrays("validation")
    per_replica = config.batch_size
    if distribution.replicas > 1:
        print_fn(
            f"Distributed ({distribution.name}): {distribution.replicas} replicas on {distribution.workers} "
            f"worker(s), this is worker {distribution.worker_index}{' (chief)' if chief else ''}; global batch "
            f"{distribution.global_batch(per_replica)}, learning rates x{distribution.replicas}"
        )

    scratch = None
    if run is None:
        if chief:
            run = create_run(workspace, spec.name)
            print_fn(f"Run folder: {run}")
            _write_config(run, config, dataset, labels, distribution)
        else:
            scratch = tempfile.TemporaryDirectory(prefix="image-classifier-worker-")
            run = Path(scratch.name)  # never written: only the chief writes a run folder
    state = state or TrainingState()
    backup = RunBackup(run, built.model, state, writes=chief)
    checkpoint = BestModelCheckpoint(built.model, run / "model.keras", writes=chief)
    if state.epochs_done or state.phase > 1:
        with distribution.scope():
            checkpoint.load_state(state.best, backup.best_weights())
            backup.restore_weights()
        print_fn(f"Resuming {run} after epoch {state.epochs_done} (phase {min(state.phase, 2)})")
    timer = EpochTimer()
    class_weight = _class_weights(config, y_train, len(labels))
    augmenter = make_augmenter(config.seed) if config.augment else None
    stop = GracefulStop(print_fn)

    def fit(
        model, learning_rate: float, train_source, validation_source, epochs: int, first_epoch: int = 0
    ) -> None:
        """One phase (epochs first_epoch..epochs): compile, put back a resumed phase's optimizer, fit."""
        with distribution.scope():
            model.compile(
                optimizer=_optimizer(
                    keras,
                    config.optimizer,
                    distribution.scaled_learning_rate(learning_rate),
                    config.lr_schedule,
                    (epochs - first_epoch) * distribution.batches(len(y_train), per_replica),
                ),
                loss=keras.losses.SparseCategoricalCrossentropy(),
                metrics=["accuracy"],
            )
            backup.restore_optimizer(model, model.optimizer)
        early_stopping = None
        if config.early_stopping > 0:
            early_stopping = ResumableEarlyStopping(config.early_stopping, state.early_stopping)
            if state.early_stopping.get("stopped"):
                return
        if state.epochs_done >= epochs:
            return
        callbacks = [
            timer,  # first, so the seconds it adds to the logs reach TensorBoard and the history
            *([keras.callbacks.TensorBoard(log_dir=str(run / "logs"))] if chief else []),
            checkpoint,
            *([early_stopping] if early_stopping else []),
            EpochBackup(backup, checkpoint, early_stopping, stop),  # last: it saves what the others decided
        ]
        with stop:
            model.fit(
                distribution.dataset(train_source, per_replica),
                epochs=epochs,
                initial_epoch=state.epochs_done,
                steps_per_epoch=distribution.steps(len(y_train), per_replica),
                validation_data=distribution.dataset(validation_source, per_replica),
                validation_steps=distribution.steps(len(y_val), per_replica),
                shuffle=False,  # the tf.data pipeline reshuffles every epoch itself
                callbacks=callbacks,
                verbose=2,
            )
        if stop.requested:
            raise Interrupted(run, state.epochs_done)

    def end_phase(phase: int) -> None:
        """Mark the phase done in the backup, with the best weights in the model, as the next phase starts."""
        checkpoint.restore_best()
        state.phase = phase
        state.early_stopping = {}
        backup.save(checkpoint)

    def images(x, y, train: bool):
        return batch_source(
            x, y, shuffle=train, seed=config.seed, augmenter=augmenter if train else None,
            class_weight=class_weight if train else None,
        )  # fmt: skip

    try:
        if state.phase == 1:
            if spec.pretrained and not config.augment:
                print_fn(
                    f"Phase 1: computing {spec.name} features once for {len(y_train) + len(y_val)} images"
                )
                features = distribution.local_copy(built.features)  # each worker computes all, no collectives
                train_features, val_features = (
                    features.predict(images_only(images(x, y, train=False)(per_replica)), verbose=1)
                    for x, y in ((x_train, y_train), (x_val, y_val))
                )
                print_fn(f"Phase 1: training the head on cached features for up to {config.epochs} epochs")
                train_source = batch_source(
                    train_features, y_train, shuffle=True, seed=config.seed, class_weight=class_weight
                )
                fit(
                    built.head,
                    config.learning_rate,
                    train_source,
                    batch_source(val_features, y_val),
                    config.epochs,
                )
            else:
                what = "the head on the frozen backbone" if spec.pretrained else f"{spec.name} from scratch"
                print_fn(f"Phase 1: training {what} for up to {config.epochs} epochs")
                fit(
                    built.model, config.learning_rate, images(x_train, y_train, train=True),
                    images(x_val, y_val, train=False), config.epochs,
                )  # fmt: skip
            fine_tunes = bool(spec.pretrained and config.fine_tune_layers and config.fine_tune_epochs)
            if fine_tunes:
                state.fine_tune_start = state.epochs_done
            end_phase(2 if fine_tunes else FINISHED)

        if state.phase == 2:
            unfrozen = unfreeze_top(built, config.fine_tune_layers)
            print_fn(
                f"Phase 2: fine-tuning the top {config.fine_tune_layers} backbone layers ({unfrozen} with weights, "
                f"BatchNorm frozen) at learning rate {config.fine_tune_learning_rate:g} ({config.lr_schedule}) for up to "
                f"{config.fine_tune_epochs} epochs"
            )
            fit(
                built.model, config.fine_tune_learning_rate, images(x_train, y_train, train=True),
                images(x_val, y_val, train=False), state.fine_tune_start + config.fine_tune_epochs,
                first_epoch=state.fine_tune_start,
            )  # fmt: skip
            end_phase(FINISHED)
    except KeyboardInterrupt as error:
        if isinstance(error, Interrupted):
            raise
        raise Interrupted(run, state.epochs_done) from None

    checkpoint.restore_best()
    if not chief:
        print_fn(f"Worker {distribution.worker_index} done; the chief writes the run folder.")
        if scratch is not None:
            scratch.cleanup()
        return None
    model = distribution.local_copy(built.model)  # outside the strategy: no collectives in what follows
    _finish_run(config, dataset, workspace, run, model, state, checkpoint, backup, print_fn)
    return run


def _finish_run(config, dataset, workspace, run, model, state, checkpoint, backup, print_fn) -> None:
    """The chief's last step: the model, history, test evaluation and reports, then the backup goes."""
    from .atomic import save_model_atomic, write_pickle
    from .evaluate import compute_metrics, format_report, plot_confusion_matrix
    from .runs import mark_latest
    from .tensorboard_logging import log_run_summaries

    spec, labels = config.spec, dataset.labels
    x_test, y_test = dataset.arrays("test")
    history = state.history
    fine_tune_start = state.fine_tune_start
    save_model_atomic(model, run / "model.keras")
    write_pickle(run / "history.pickle", history)
    write_json(run / "history.json", history)
    train_seconds = backup.elapsed()

    probabilities = _predict_probabilities(model, x_test, config.batch_size)
    metrics = compute_metrics(probabilities, np.asarray(y_test), labels)
    metrics["training"] = {
        "epochs_run": len(history["loss"]),
        "best_epoch": checkpoint.best_epoch,
        "best_validation": checkpoint.best_logs,
        "fine_tune_start_epoch": fine_tune_start,
        "seconds": round(train_seconds, 1),
    }
    _write_predictions(run / "test_predictions.csv", dataset, probabilities, np.asarray(y_test), labels)
    plot_confusion_matrix(metrics, run / "confusion_matrix.png")
    write_json(run / "metrics.json", metrics)
    backup.remove()
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


class Interrupted(KeyboardInterrupt):
    """Training stopped on request; the backup lets `--resume` continue where it stopped."""

    def __init__(self, run: Path, epochs_done: int):
        done = f"after epoch {epochs_done}, which is saved" if epochs_done else "before the first epoch ended"
        super().__init__(
            f"stopped {done}; continue with: python scripts/machine_learning.py --resume {run.name}"
        )


def _write_predictions(
    path: Path, dataset: Dataset, probabilities: np.ndarray, truth: np.ndarray, labels
) -> None:
    """One row per test image: its source file, true and predicted class, and the confidence."""
    sources = dataset.source_files("test")
    predicted = probabilities.argmax(axis=1)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
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
    write_atomic(path, buffer.getvalue().encode("utf-8"))
