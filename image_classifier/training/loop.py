"""The training stage: prepared arrays -> a trained, evaluated model in a new run folder.

`train` starts a run, `resume_training` continues an interrupted one; both hand a Trainer the phases of
phases.py to run in order. Under a multi-worker strategy every worker trains; only the chief has a run
folder (the others write into a scratch folder that is thrown away) and finishes the run (finish.py).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from ..config import Workspace
from ..dataset import Dataset
from ..errors import UserError
from ..options import shown
from ..preprocess import prepare_dataset
from ..runs import RunFolder
from .backup import FINISHED, TrainingState, load_state
from .config import RESUME_KEEPS, TrainConfig
from .phases import Phase, PhaseInputs, plan

PrintFn = Callable[..., None]


def train(config: TrainConfig, workspace: Workspace, print_fn: PrintFn = print) -> Path | None:
    """Run the whole stage; returns the run folder's path (None on a multi-worker run's other workers)."""
    config = config.resolve()
    dataset = prepare_dataset(config.preprocess_options(), workspace, print_fn=print_fn)
    return train_on_dataset(config, dataset, workspace, print_fn=print_fn)


def resume_training(workspace: Workspace, name: str, given: dict, print_fn: PrintFn = print) -> Path | None:
    """Continue an interrupted run from its last finished epoch, with the options it was started with.

    `given` holds the training options typed on this command line; one that differs from the run's
    own is an error rather than silently ignored or silently changing a half-trained run.
    """
    run = RunFolder.find_resumable(workspace, name)
    try:
        config = TrainConfig.from_options(run.config["options"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot resume {run.path}: its config.json is unreadable ({error})") from None
    config = replace(config, **{key: value for key, value in given.items() if key in RESUME_KEEPS})
    differing = [
        f"--{key.replace('_', '-')} {shown(value)} (the run has {shown(getattr(config, key))})"
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
    if dataset.fingerprint != run.config.get("data", {}).get("fingerprint"):
        raise UserError(
            f"the images of {run.name} changed since it started, so it cannot continue on the same data; "
            "start a new run without --resume"
        )
    return train_on_dataset(config, dataset, workspace, print_fn=print_fn, run=run, state=load_state(run))


def _normal(value):
    if isinstance(value, (list, tuple)):
        return tuple(_normal(item) for item in value)
    return str(value) if isinstance(value, Path) else value


def train_on_dataset(
    config: TrainConfig,
    dataset: Dataset,
    workspace: Workspace,
    print_fn: PrintFn = print,
    run: RunFolder | None = None,
    state: TrainingState | None = None,
) -> Path | None:
    """Train, evaluate and save; with `run` and `state`, continue that interrupted run instead of a new one."""
    from ..tf_env import import_keras
    from .distribute import make_distribution
    from .finish import finish_run

    distribution = make_distribution(config.distribute)  # first: multi-worker needs it before any TF work
    import_keras().utils.set_random_seed(config.seed)
    built = _build(config, len(dataset.labels), distribution)  # before the run folder: bad weights fail first
    with _run_folder(distribution, workspace, config, dataset, run, print_fn) as folder:
        state = state or TrainingState()
        trainer = Trainer.start(config, dataset, workspace, folder, distribution, built, state, print_fn)
        trainer.run_phases(plan(config))
        trainer.checkpoint.restore_best()
        if not distribution.is_chief:
            print_fn(f"Worker {distribution.worker_index} done; the chief writes the run folder.")
            return None
        finish_run(trainer, distribution.local_copy(trainer.built.model))
        return folder.path


def _build(config: TrainConfig, classes: int, distribution):
    from ..models import build_model

    with distribution.scope():
        return build_model(
            config.spec, classes, config.image_size, resize=config.resize, weights=config.weights,
            dropout=config.dropout, dense_units=config.dense_units, l2=config.l2, batch_norm=config.batch_norm,
            feature_layers=config.feature_layers,
        )  # fmt: skip


@contextlib.contextmanager
def _run_folder(distribution, workspace, config, dataset, run, print_fn) -> Iterator[RunFolder]:
    """The chief's run folder (a new one unless resuming); a scratch folder, thrown away, on other workers."""
    if not distribution.is_chief and run is None:
        with tempfile.TemporaryDirectory(prefix="image-classifier-worker-") as scratch:
            yield RunFolder(scratch)  # never written: only the chief writes a run folder
        return
    if run is None:
        from .finish import write_config

        run = RunFolder.create(workspace, config.spec.name)
        print_fn(f"Run folder: {run.path}")
        write_config(run, config, dataset, distribution)
    yield run


@dataclass
class Trainer:
    """What the phases of one training process share: the model, the data, the run's state and callbacks."""

    config: TrainConfig
    dataset: Dataset
    workspace: Workspace
    run: RunFolder
    distribution: object
    built: object
    state: TrainingState
    backup: object
    checkpoint: object
    print_fn: PrintFn

    @classmethod
    def start(cls, config, dataset, workspace, run, distribution, built, state, print_fn) -> Trainer:
        """The model's backup and best checkpoint; a resumed run gets its weights and best checkpoint back."""
        from .backup import RunBackup
        from .callbacks import BestModelCheckpoint

        chief = distribution.is_chief
        backup = RunBackup(run, built.model, state, writes=chief)
        checkpoint = BestModelCheckpoint(built.model, run.model_path, writes=chief)
        trainer = cls(
            config, dataset, workspace, run, distribution, built, state, backup, checkpoint, print_fn
        )
        if distribution.replicas > 1:
            print_fn(
                f"Distributed ({distribution.name}): {distribution.replicas} replicas on {distribution.workers} "
                f"worker(s), this is worker {distribution.worker_index}{' (chief)' if chief else ''}; global "
                f"batch {distribution.global_batch(config.batch_size)}, learning rates x{distribution.replicas}"
            )
        if state.epochs_done or state.phase is not None:
            with distribution.scope():
                checkpoint.load_state(state.best, backup.best_weights())
                backup.restore_weights()
        return trainer

    @property
    def y_train(self) -> np.ndarray:
        return self.dataset.arrays("train")[1]

    @property
    def y_validation(self) -> np.ndarray:
        return self.dataset.arrays("validation")[1]

    @property
    def class_weight(self) -> dict | None:
        if self.config.class_weight != "auto":
            return None
        from sklearn.utils.class_weight import compute_class_weight

        classes = np.arange(len(self.dataset.labels))
        weights = compute_class_weight("balanced", classes=classes, y=self.y_train)
        return {index: float(weight) for index, weight in enumerate(weights)}

    def image_sources(self, augment: bool | None = None) -> tuple[object, object]:
        """Training batches (shuffled, augmented when asked) and validation batches of the photos."""
        from ..pipeline import batch_source, make_augmenter

        config = self.config
        augment = config.augment if augment is None else augment
        augmenter = make_augmenter(config.seed) if augment else None
        x_train, y_train = self.dataset.arrays("train")
        x_validation, y_validation = self.dataset.arrays("validation")
        return (
            batch_source(
                x_train,
                y_train,
                shuffle=True,
                seed=config.seed,
                augmenter=augmenter,
                class_weight=self.class_weight,
            ),
            batch_source(x_validation, y_validation),
        )

    @cached_property
    def features(self):
        """The frozen backbone's features (features.py); each worker computes all, with no collectives."""
        from ..features import BackboneFeatures

        config, chief = self.config, self.distribution.is_chief
        model = self.distribution.local_copy(self.built.features)
        return BackboneFeatures(
            model,
            config.spec.name,
            config.image_size,
            self.workspace,
            config.engine,
            self.print_fn,
            writes=chief,
            layers=tuple(config.feature_layers),
        )

    def standardize_head(self, train_features: Callable[[], np.ndarray]) -> None:
        """A head on features of several depths standardizes them with the training features' statistics."""
        names = [layer.name for layer in self.built.head.layers]
        if "standardize" in names:
            self.built.head.get_layer("standardize").set_statistics(train_features())

    def cached_features(self, views: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The frozen backbone's pooled features of `views` views of each training photo (their labels
        repeated) and of the validation photos, computed once and cached."""
        config, dataset = self.config, self.dataset
        total = self.dataset.count("train") * views + self.dataset.count("validation")
        self.print_fn(f"Phase 1: computing {config.spec.name} features once for {total} images")
        train = [
            self.features.of_split(dataset, "train", config.batch_size, view=view, seed=config.seed)
            for view in range(views)
        ]
        labels = np.concatenate([self.y_train] * views)
        validation = self.features.of_split(dataset, "validation", config.batch_size)
        return np.concatenate(train) if views > 1 else train[0], labels, validation

    def run_phases(self, phases: list[Phase]) -> None:
        """Run each phase not yet done, in order; the state names the one in progress."""
        state = self.state
        names = [phase.name for phase in phases]
        if state.phase is None:
            state.phase = names[0]
        if state.phase != FINISHED and state.phase not in names:
            raise UserError(
                f"the backup of {self.run.name} is in phase {state.phase!r}, which this run does not have"
            )
        if state.epochs_done or state.phase != names[0]:
            number = names.index(state.phase) + 1 if state.phase in names else len(names)
            self.print_fn(f"Resuming {self.run.path} after epoch {state.epochs_done} (phase {number})")
        try:
            for index, phase in enumerate(phases):
                if state.phase != phase.name:
                    continue
                inputs = phase.start(self)
                self.print_fn(inputs.announcement)
                last_epoch = state.phase_start + phase.epochs(self.config)
                self._fit(inputs, state.phase_start, last_epoch)
                self._say_if_still_improving(last_epoch)
                self._end_phase(names[index + 1] if index + 1 < len(names) else FINISHED)
        except KeyboardInterrupt as error:
            if isinstance(error, Interrupted):
                raise
            raise Interrupted(self.run, state.epochs_done) from None

    def _say_if_still_improving(self, last_epoch: int) -> None:
        """A phase whose best epoch is its last stopped for lack of epochs, not because it had learned enough."""
        if self.checkpoint.best_epoch is not None and self.checkpoint.best_epoch + 1 == last_epoch:
            self.print_fn(
                f"The validation loss was still falling at the last epoch ({last_epoch}): this phase stopped for "
                "lack of epochs, not because it had converged; more epochs (--epochs, --fine-tune-epochs) may help"
            )

    def _end_phase(self, following: str) -> None:
        """Mark the phase done in the backup, with the best weights in the model, as the next phase starts."""
        self.checkpoint.restore_best()
        state = self.state
        state.phase, state.phase_start, state.early_stopping = following, state.epochs_done, {}
        if following == "fine_tune":
            state.fine_tune_start = state.epochs_done
        self.backup.save(self.checkpoint)

    def _fit(self, inputs: PhaseInputs, first_epoch: int, last_epoch: int) -> None:
        """One phase's epochs: compile, put back a resumed phase's optimizer, fit with the run's callbacks."""
        from .backup import GracefulStop

        count = (inputs.train_count or len(self.y_train)) * inputs.passes
        self._compile(inputs, last_epoch - first_epoch, count)
        early_stopping = self._early_stopping()
        state = self.state
        if (
            early_stopping is not None and state.early_stopping.get("stopped")
        ) or state.epochs_done >= last_epoch:
            return
        distribution, per_replica = self.distribution, self.config.batch_size
        stop = GracefulStop(self.print_fn)
        with stop:
            inputs.model.fit(
                distribution.dataset(inputs.train_source, per_replica),
                epochs=last_epoch,
                initial_epoch=state.epochs_done,
                steps_per_epoch=distribution.steps(count, per_replica),
                validation_data=distribution.dataset(inputs.validation_source, per_replica),
                validation_steps=distribution.steps(len(self.y_validation), per_replica),
                shuffle=False,  # the tf.data pipeline reshuffles every epoch itself
                callbacks=self._callbacks(
                    early_stopping, stop, self._time_left(count, first_epoch, last_epoch)
                ),
                verbose=2,
            )
        if stop.requested:
            raise Interrupted(self.run, state.epochs_done)

    def _compile(self, inputs: PhaseInputs, epochs: int, count: int) -> None:
        from ..tf_env import import_keras

        keras, distribution, config = import_keras(), self.distribution, self.config
        decay_steps = epochs * distribution.batches(count, config.batch_size)
        with distribution.scope():
            inputs.model.compile(
                optimizer=make_optimizer(
                    keras,
                    config.optimizer,
                    distribution.scaled_learning_rate(inputs.learning_rate),
                    config.lr_schedule,
                    decay_steps,
                ),  # fmt: skip
                loss=keras.losses.SparseCategoricalCrossentropy(),
                metrics=["accuracy"],
            )
            self.backup.restore_optimizer(inputs.model, inputs.model.optimizer)

    def _early_stopping(self):
        from .callbacks import ResumableEarlyStopping

        if self.config.early_stopping <= 0:
            return None
        return ResumableEarlyStopping(self.config.early_stopping, self.state.early_stopping)

    def _time_left(self, count: int, first_epoch: int, last_epoch: int):
        from .callbacks import TimeLeft

        steps = self.distribution.batches(count, self.config.batch_size)
        return TimeLeft(self.print_fn, steps, max(first_epoch, self.state.epochs_done), last_epoch)

    def _callbacks(self, early_stopping, stop, time_left=None) -> list:
        """The run's callbacks, in the order they must run at each epoch's end."""
        from ..tf_env import import_keras
        from .callbacks import EpochBackup, EpochTimer

        tensorboard = [import_keras().callbacks.TensorBoard(log_dir=str(self.run.logs))]
        return [
            EpochTimer(),  # first, so the seconds it adds to the logs reach TensorBoard and the history
            *([time_left] if time_left else []),
            *(tensorboard if self.distribution.is_chief else []),
            self.checkpoint,
            *([early_stopping] if early_stopping else []),
            EpochBackup(
                self.backup, self.checkpoint, early_stopping, stop
            ),  # last: it saves what the others decided
        ]


def make_optimizer(keras, name: str, learning_rate: float, schedule: str, decay_steps: int):
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


class Interrupted(KeyboardInterrupt):
    """Training stopped on request; the backup lets `--resume` continue where it stopped."""

    def __init__(self, run: RunFolder, epochs_done: int):
        done = f"after epoch {epochs_done}, which is saved" if epochs_done else "before the first epoch ended"
        super().__init__(
            f"stopped {done}; continue with: python scripts/machine_learning.py --resume {run.name}"
        )
