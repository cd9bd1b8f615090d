"""Every training option, declared once: the parser, --help, config.json and --config FILE all come from here."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from .. import cli
from ..engines import ENGINES
from ..errors import UserError
from ..models import DEFAULT_MODEL, REGISTRY, ModelSpec, check_image_size, check_weights, get_spec
from ..openset import DEFAULT_KNOWN_RATE, known_rate_arg
from ..options import Declaration, as_json, coerce, declared
from ..preprocess import (
    CATEGORIES,
    DEDUPE,
    DEFAULT_RESIZE,
    DEFAULT_SPLIT,
    IMAGE_SIZE,
    IMAGES_DIR,
    RESIZE,
    SPLIT,
    WORKERS,
    PreprocessOptions,
)
from .distribute import STRATEGIES, check_strategy

OPTIMIZERS = ("adam", "rmsprop", "sgd")
LR_SCHEDULES = ("cosine", "constant")
CLASS_WEIGHTS = ("none", "auto")
RESUME_KEEPS = frozenset({"workers"})
QUALITIES: dict[str, dict] = {
    "fast": {"image_size": 160},
    "balanced": {},
    "best": {"fine_tune_epochs": 5},
}
"""--quality presets: values for options left unset (typed options win). See docs/benchmarks-trashnet.md."""
"""Options a resumed run may take from the new command line; every other one is the run's own."""


def _model_help() -> str:
    families = {"mlp": [], "cnn": [], "backbone": []}
    for spec in REGISTRY.values():
        families[spec.family].append(spec.name)
    return f"{', '.join(families['mlp'] + families['cnn'])}, or a pretrained backbone: {', '.join(families['backbone'])}"


def _option(help: str, group: str = "training", **kwargs) -> Declaration:
    return Declaration(help, group=group, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """Every training option; None means "the model's own default" (see resolve())."""

    categories: tuple[str, ...] = declared(
        replace(CATEGORIES, help="2 or more, like cat,dog,horse (or --resume RUN)")
    )
    images_dir: Path = declared(IMAGES_DIR)
    model: str = declared(
        _option(_model_help(), "model", choices=tuple(REGISTRY), metavar="NAME"), DEFAULT_MODEL
    )
    weights: str | None = declared(
        _option(
            "imagenet (downloads once into KERAS_HOME), none, or a PATH to a Keras .h5 weights file",
            "model",
            per_model="default_weights",
        ),
        None,
    )
    dense_units: tuple[int, ...] | None = declared(
        _option(
            "hidden dense layers of the head, like 1024,512; '' for none",
            "model",
            type=cli.int_list_arg,
            metavar="N,N",
            per_model="dense_units",
        ),
        None,
    )
    dropout: float | None = declared(
        _option("dropout rate in the head", "model", type=cli.probability_arg, per_model="dropout"), None
    )
    feature_layers: tuple[str, ...] | None = declared(
        _option(
            "backbone layers pooled into the features, concatenated and standardized; final is the backbone's "
            "output (earlier layers help on photos unlike ImageNet's)",
            "model",
            type=cli.names_arg,
            metavar="LAYER,LAYER",
            per_model="feature_layers",
        ),
        None,
    )
    feature_views: int = declared(
        _option(
            "views of each training photo whose features the head trains on: 1 the photo, 2 adds it mirrored, "
            "3 and more add random crops; computed once, so no backbone cost per epoch",
            "model",
            type=cli.positive_int,
            metavar="N",
        ),
        1,
    )
    l2: float | None = declared(
        _option("L2 weight penalty on the dense and conv layers", "model", type=float, per_model="l2"), None
    )
    epochs: int | None = declared(
        _option(
            "most epochs of the first phase; early stopping may end sooner",
            type=cli.positive_int,
            per_model="epochs",
        ),
        None,
    )
    batch_size: int = declared(
        _option("images per training step (per replica with --distribute)", type=cli.positive_int), 32
    )
    image_size: int | None = declared(replace(IMAGE_SIZE, per_model="default_image_size"), None)
    optimizer: str = declared(_option("sgd uses momentum 0.9", choices=OPTIMIZERS), "adam")
    learning_rate: float | None = declared(
        _option("", type=cli.positive_float, per_model="learning_rate"), None
    )
    lr_schedule: str | None = declared(
        _option(
            "cosine lowers the learning rate smoothly to 0 by the last epoch of each phase; constant keeps it",
            choices=LR_SCHEDULES,
            per_model="lr_schedule",
        ),
        None,
    )
    batch_norm: bool | None = declared(
        _option(
            "BatchNormalization after each convolution of cnn: faster, steadier learning from scratch "
            "(--no-batch-norm gives the book's network)",
            action="negatable",
            per_model="batch_norm",
        ),
        None,
    )
    augment: bool = declared(
        _option(
            "random flip, rotation, zoom and contrast while training (slower: backbone features can no "
            "longer be computed once)",
            action="flag",
        ),
        False,
    )
    fine_tune_layers: int | None = declared(
        _option(
            "phase 2: unfreeze the top N backbone layers",
            type=cli.non_negative_int,
            metavar="N",
            per_model="fine_tune_layers",
        ),
        None,
    )
    fine_tune_epochs: int | None = declared(
        _option(
            "phase 2 epochs; 0 skips fine-tuning",
            type=cli.non_negative_int,
            metavar="N",
            per_model="fine_tune_epochs",
        ),
        None,
    )
    fine_tune_learning_rate: float | None = declared(
        _option("", type=cli.positive_float, default_text="a tenth of --learning-rate"), None
    )
    early_stopping: int = declared(
        _option(
            "stop after this many epochs without a better validation loss, keeping the best weights; 0 turns it off",
            type=cli.non_negative_int,
            metavar="PATIENCE",
        ),
        5,
    )
    class_weight: str = declared(
        _option("auto weighs rare categories up (for unbalanced folders)", choices=CLASS_WEIGHTS), "none"
    )
    known_rate: float = declared(
        _option(
            'share of the known validation photos the "none of these" check keeps; its threshold is set there',
            type=known_rate_arg,
            metavar="RATE",
        ),
        DEFAULT_KNOWN_RATE,
    )
    seed: int = declared(_option("for the split, shuffling and initial weights", type=int), 0)
    resize: str = declared(RESIZE, DEFAULT_RESIZE)
    split: tuple[float, float, float] = declared(SPLIT, DEFAULT_SPLIT)
    dedupe: str = declared(DEDUPE, "exact")
    distribute: str = declared(
        _option(
            "tf.distribute strategy: mirrored uses every GPU of this machine; multi-worker runs the same command "
            "on every machine of $TF_CONFIG (each reads its share of the data; the chief writes the run); the "
            "batch size is per replica and the learning rate is multiplied by the number of replicas",
            choices=STRATEGIES,
        ),
        "none",
    )
    quality: str = declared(
        _option(
            "a preset for pretrained backbones: fast trains on smaller images (160 px, about half the backbone "
            "time), balanced is the defaults, best adds 5 epochs of fine-tuning the top backbone layers with "
            "augmentation (kept only when it lowers the validation loss; minutes to hours on a CPU, estimated "
            "before it starts); options you type win over the preset",
            choices=tuple(QUALITIES),
        ),
        "balanced",
    )
    engine: str | None = declared(
        _option(
            "what runs the frozen backbone when its features are computed once (LiteRT and ONNX Runtime are "
            "fast CPU engines; keras is TensorFlow itself)",
            choices=ENGINES,
            default_text="litert on a CPU, keras on a GPU",
        ),
        None,
    )
    workers: int = declared(WORKERS, 0, compare=False)

    def resolve(self) -> TrainConfig:
        """Fill the --quality preset and model-dependent defaults; check the combination before slow work."""
        spec = get_spec(self.model)
        if self.quality not in QUALITIES:
            raise UserError(f"unknown --quality {self.quality!r}; choose from {', '.join(QUALITIES)}")
        if self.quality != "balanced" and not spec.pretrained:
            raise UserError(
                f"--quality {self.quality} is a preset for pretrained backbones; {spec.name} has none "
                "(leave out --quality, or use a backbone such as mobilenet_v2)"
            )
        preset = {key: value for key, value in QUALITIES[self.quality].items() if getattr(self, key) is None}
        self = replace(self, **preset)
        filled = {
            item.name: getattr(spec, item.metadata["declaration"].per_model)
            for item in fields(self)
            if item.metadata["declaration"].per_model and getattr(self, item.name) is None
        }
        resolved = replace(self, **filled)
        if resolved.fine_tune_learning_rate is None:
            resolved = replace(resolved, fine_tune_learning_rate=resolved.learning_rate / 10)
        resolved._check(spec)
        return resolved

    def _check(self, spec: ModelSpec) -> None:
        """The checks argparse cannot make: values from --config or config.json, and combinations."""
        if len(self.categories) < 2:
            raise UserError("a classifier needs at least 2 categories; write them like --categories cat,dog")
        for name, value, allowed in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("lr-schedule", self.lr_schedule, LR_SCHEDULES),
            ("class-weight", self.class_weight, CLASS_WEIGHTS),
        ):
            if value not in allowed:
                raise UserError(f"unknown --{name} {value!r}; choose from {', '.join(allowed)}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be at least 0 and below 1, got {self.dropout}")
        if self.batch_norm and spec.family != "cnn":
            raise UserError(
                f"--batch-norm adds BatchNormalization to cnn's conv blocks; {spec.name} has none "
                "(use --model cnn, or leave out --batch-norm)"
            )
        if tuple(self.feature_layers) != ("final",) and not spec.pretrained:
            raise UserError(
                f"--feature-layers pools layers of a pretrained backbone; {spec.name} has none "
                "(use a backbone such as mobilenet_v2, or leave out --feature-layers)"
            )
        if self.feature_views > 1 and (self.augment or not spec.pretrained):
            raise UserError(
                "--feature-views trains the head on cached features of a pretrained backbone, which "
                f"{'--augment' if self.augment else spec.name} does not use; drop one of them"
            )
        if self.l2 < 0:
            raise UserError(f"--l2 must be 0 or more, got {self.l2}")
        if not 0 < self.known_rate <= 1:
            raise UserError(f"--known-rate must be above 0 and at most 1, got {self.known_rate}")
        if self.fine_tune_epochs and self.fine_tune_layers and not spec.pretrained:
            raise UserError(
                f"{spec.name} has no pretrained backbone to fine-tune; drop --fine-tune-* options"
            )
        check_image_size(spec, self.image_size)
        check_weights(spec, self.weights)
        check_strategy(self.distribute)

    @property
    def spec(self) -> ModelSpec:
        return get_spec(self.model)

    @property
    def augments_fine_tuning(self) -> bool:
        return self.augment or self.quality == "best"

    @property
    def fine_tunes(self) -> bool:
        return bool(self.spec.pretrained and self.fine_tune_layers and self.fine_tune_epochs)

    def options(self) -> dict:
        """As stored in a run's config.json."""
        return as_json(self)

    @classmethod
    def from_options(cls, options: dict) -> TrainConfig:
        """Back from config.json (JSON has lists where the config has tuples), resolved again."""
        values = coerce(cls, options)
        values.setdefault("lr_schedule", "constant")  # runs made before these options existed
        values.setdefault("batch_norm", False)
        values.setdefault("feature_layers", ("final",))
        values.setdefault("l2", 0.0)
        return cls(**values).resolve()

    def preprocess_options(self) -> PreprocessOptions:
        names = {item.name for item in fields(PreprocessOptions)}
        return PreprocessOptions(**{name: getattr(self, name) for name in names})
