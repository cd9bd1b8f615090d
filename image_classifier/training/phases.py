"""Training phases: each trains one model on one kind of input for a span of epochs.

A run is a list of phases (`plan`): the first trains the new head (on cached backbone features when the
backbone's output never changes, else end to end) or a model from scratch; fine-tuning, when asked for,
follows. The Trainer (loop.py) runs them in order; each phase only says what to fit and says so in a line.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .config import TrainConfig

if TYPE_CHECKING:
    from .loop import Trainer


@dataclass
class PhaseInputs:
    """What one phase fits: a model, its learning rate, its training and validation batches."""

    announcement: str
    model: object
    learning_rate: float
    train_source: object
    validation_source: object
    train_count: int | None = None
    """Examples per training epoch when they are not the training photos (augmented views of them)."""
    passes: int = 1
    """Passes over the training examples in one epoch (several for a tiny folder, see `head_passes`)."""


class Phase(ABC):
    name: ClassVar[str]

    def epochs(self, config: TrainConfig) -> int:
        return config.epochs

    @abstractmethod
    def start(self, trainer: Trainer) -> PhaseInputs:
        """Make the model ready for this phase and say what it fits (also when a resumed run re-enters it)."""


MIN_HEAD_STEPS = 500
"""Optimizer steps the head on cached features gets at least, whatever the folder's size. 12 photos at
batch size 32 are one step per epoch: 20 epochs left a head that had barely moved from its random start.
bench/few_shot.py (cats/dogs, 3 seeded draws, the full test split): with 5 photos per category 92.9% test
accuracy at one pass per epoch, 94.0% with 500 steps, a logistic regression on the same features 94.5%;
with 10, 20 and 50 per category 94.0 -> 96.2%, 96.5 -> 97.3% and 96.7 -> 97.6%, within 1 point of it."""


def head_passes(examples: int, batch_size: int, epochs: int) -> int:
    """Passes over a small training set per epoch so that all epochs together make MIN_HEAD_STEPS steps."""
    steps_per_pass = max(1, math.ceil(examples / batch_size))
    return max(1, math.ceil(MIN_HEAD_STEPS / (steps_per_pass * max(1, epochs))))


class HeadOnCachedFeatures(Phase):
    """The frozen backbone's output for a photo never changes without augmentation: compute it once."""

    name = "head_on_features"

    def start(self, trainer: Trainer) -> PhaseInputs:
        from ..pipeline import batch_source

        config = trainer.config
        train_features, train_labels, validation_features = trainer.cached_features(config.feature_views)
        trainer.standardize_head(lambda: train_features)
        views = f" ({config.feature_views} views of each training photo)" if config.feature_views > 1 else ""
        passes = head_passes(
            len(train_labels), trainer.distribution.global_batch(config.batch_size), config.epochs
        )
        repeated = (
            f"; {len(train_labels)} training examples are few, so each epoch passes over them {passes} times "
            f"(at least {MIN_HEAD_STEPS} optimizer steps in all)"
            if passes > 1
            else ""
        )
        return PhaseInputs(
            f"Phase 1: training the head on cached features{views} for up to {config.epochs} epochs{repeated}",
            trainer.built.head,
            config.learning_rate,
            batch_source(
                train_features,
                train_labels,
                shuffle=True,
                seed=config.seed,
                class_weight=trainer.class_weight,
                passes=passes,
            ),
            batch_source(validation_features, trainer.y_validation),
            train_count=len(train_labels),
            passes=passes,
        )


class EndToEnd(Phase):
    """The whole model on the photos: a from-scratch network, or a head on a frozen backbone with augmentation."""

    name = "end_to_end"

    def start(self, trainer: Trainer) -> PhaseInputs:
        config = trainer.config
        what = (
            "the head on the frozen backbone"
            if config.spec.pretrained
            else f"{config.spec.name} from scratch"
        )
        if config.spec.pretrained:
            trainer.standardize_head(lambda: trainer.cached_features(views=1)[0])
        train, validation = trainer.image_sources()
        return PhaseInputs(
            f"Phase 1: training {what} for up to {config.epochs} epochs",
            trainer.built.model,
            config.learning_rate,
            train,
            validation,
        )


class FineTune(Phase):
    """Unfreeze the top backbone layers (BatchNorm kept frozen) and continue at a lower rate."""

    name = "fine_tune"

    def epochs(self, config: TrainConfig) -> int:
        return config.fine_tune_epochs

    def start(self, trainer: Trainer) -> PhaseInputs:
        from ..models import unfreeze_top

        config = trainer.config
        unfrozen = unfreeze_top(trainer.built, config.fine_tune_layers)
        train, validation = trainer.image_sources(augment=config.augments_fine_tuning)
        augmented = ", photos randomly augmented" if config.augments_fine_tuning else ""
        return PhaseInputs(
            f"Phase 2: fine-tuning the top {config.fine_tune_layers} backbone layers ({unfrozen} with weights, "
            f"BatchNorm frozen{augmented}) at learning rate {config.fine_tune_learning_rate:g} ({config.lr_schedule}) "
            f"for up to {config.fine_tune_epochs} epochs; the model kept is the best on validation of both phases",
            trainer.built.model,
            config.fine_tune_learning_rate,
            train,
            validation,
        )


def plan(config: TrainConfig) -> list[Phase]:
    """The phases `config` asks for, in order."""
    cached = config.spec.pretrained and not config.augment
    phases: list[Phase] = [HeadOnCachedFeatures() if cached else EndToEnd()]
    if config.fine_tunes:
        phases.append(FineTune())
    return phases
