"""What a hyperparameter search tries: the head's knobs, and the feature options whose features are cached.

The head's ranges are fixed here (they are the same for every dataset); the feature options (image sizes,
backbone layers, views) come from the command line, because each distinct value costs one pass of the
backbone over the photos. A trial's values map one to one onto training options, so the best trial is a
TrainConfig that `scripts/machine_learning.py --config best.json` trains again.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from .training.config import LR_SCHEDULES, OPTIMIZERS, TrainConfig

LEARNING_RATES = (1e-4, 1e-2)
"""Sampled on a log scale: the default 1e-3 sits in the middle."""
DROPOUTS = (0.0, 0.6, 0.1)
DENSE_UNITS = ("none", "256", "512", "1024")
"""Hidden layers of the head as --dense-units writes them; none is the default softmax on the features."""
L2_PENALTIES = (0.0, 1e-5, 1e-4, 1e-3)
BATCH_SIZES = (16, 32, 64, 128)

LAYER_PRESETS: dict[str, tuple[tuple[str, ...], ...]] = {
    "mobilenet_v2": (
        ("final",),
        ("block_6_expand_relu", "block_13_expand_relu", "block_16_expand_relu", "final"),
    ),
}
"""Backbone layers tried when --feature-layers is not given: the four depths bench/feature_layers.py
measured best on photos unlike ImageNet's (trashnet); other backbones try their final layer only."""


@dataclass(frozen=True)
class SearchSpace:
    """The feature options searched; the head's ranges are the module's constants."""

    image_sizes: tuple[int, ...]
    feature_layers: tuple[tuple[str, ...], ...]
    feature_views: tuple[int, ...]

    def combinations(self) -> list[tuple[int, tuple[str, ...]]]:
        """Each (image size, layers) whose backbone features must be computed."""
        return [(size, layers) for size in self.image_sizes for layers in self.feature_layers]

    def declare(self, hp) -> None:
        """Every hyperparameter, in the order the HParams dashboard lists them."""
        hp.Float("learning_rate", *LEARNING_RATES, sampling="log")
        hp.Choice("optimizer", list(OPTIMIZERS))
        hp.Choice("lr_schedule", list(LR_SCHEDULES))
        hp.Float("dropout", DROPOUTS[0], DROPOUTS[1], step=DROPOUTS[2])
        hp.Choice("dense_units", list(DENSE_UNITS))
        hp.Choice("l2", list(L2_PENALTIES))
        hp.Choice("batch_size", list(BATCH_SIZES))
        _choice(hp, "image_size", list(self.image_sizes))
        _choice(hp, "feature_layers", [",".join(layers) for layers in self.feature_layers])
        _choice(hp, "feature_views", list(self.feature_views))


def _choice(hp, name: str, values: list):
    """A searched choice, or a fixed value (still shown in HParams) when there is only one."""
    return hp.Choice(name, values) if len(values) > 1 else hp.Fixed(name, values[0])


def trial_config(base: TrainConfig, values: dict) -> TrainConfig:
    """The training options of one trial: `base` (data, model, epochs) with the trial's values."""
    dense = values["dense_units"]
    return replace(
        base,
        learning_rate=float(values["learning_rate"]),
        optimizer=values["optimizer"],
        lr_schedule=values["lr_schedule"],
        dropout=round(float(values["dropout"]), 4),
        dense_units=() if dense == "none" else tuple(int(part) for part in dense.split(",")),
        l2=float(values["l2"]),
        batch_size=int(values["batch_size"]),
        image_size=int(values["image_size"]),
        feature_layers=tuple(values["feature_layers"].split(",")),
        feature_views=int(values["feature_views"]),
        fine_tune_learning_rate=None,
    ).resolve()


def sizes_arg(text: str) -> list[int]:
    """`160,224` -> [160, 224]: image sides to search."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sides in pixels like 160,224, got {text!r}") from None
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected sides in pixels above 0, like 160,224, got {text!r}")
    return values


def layer_choices_arg(text: str) -> list[list[str]]:
    """`final/block_13_expand_relu,final` -> [['final'], ['block_13_expand_relu', 'final']]."""
    choices = [[name.strip() for name in part.split(",") if name.strip()] for part in text.split("/")]
    if not choices or any(not names for names in choices):
        raise argparse.ArgumentTypeError(
            "expected layer lists separated by /, like final/block_13_expand_relu,final, got " + repr(text)
        )
    return choices


def views_arg(text: str) -> list[int]:
    """`1,2` -> [1, 2]: numbers of views of each training photo to search."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected view counts like 1,2, got {text!r}") from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected view counts of 1 or more, like 1,2, got {text!r}")
    return values
