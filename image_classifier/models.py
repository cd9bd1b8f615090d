"""The model registry: a name -> how to build it, its input preprocessing and its sensible defaults.

Looking up a name needs no TensorFlow, so bad options fail in a fraction of a second; building does.
Every built model takes RGB images of any size with values 0..255 and resizes them itself, so the saved
`model.keras` can be used on a new photo without repeating the preprocessing by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    """'mlp' and 'cnn' learn from scratch; 'backbone' is a pretrained keras.applications network."""
    default_image_size: int
    preprocessing: str
    """A mode of layers.InputPreprocessing."""
    application: str | None = None
    """The keras.applications constructor, for backbones."""
    min_image_size: int = 32
    dense_units: tuple[int, ...] = ()
    dropout: float = 0.2
    l2: float = 0.0
    """L2 penalty on the dense (and conv) layers' weights."""
    epochs: int = 20
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    """Backbone heads converge in a few epochs and early stopping picks one; long from-scratch runs anneal."""
    batch_norm: bool = False
    """BatchNormalization in each conv block (cnn only)."""
    fine_tune_layers: int = 0
    fine_tune_epochs: int = 0
    feature_layers: tuple[str, ...] = ("final",)
    """Backbone layers whose outputs are pooled and concatenated into the features; "final" is its output."""
    notes: str = field(default="", compare=False)

    @property
    def pretrained(self) -> bool:
        return self.family == "backbone"

    @property
    def default_weights(self) -> str:
        return "imagenet" if self.pretrained else "none"


BATCH_NORM_MOMENTUM = 0.9
"""Keras's 0.99 averages the batch statistics over about 100 steps, longer than the weights of a small
network trained from scratch stay put: a 4-epoch cats-vs-dogs run predicted one class for every photo
(50%). At 0.9 (about 10 steps) the statistics used for prediction follow within the first epoch."""


def _backbone(
    name: str, application: str, preprocessing: str, size: int = 224, min_size: int = 32
) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="backbone",
        application=application,
        preprocessing=preprocessing,
        default_image_size=size,
        min_image_size=min_size,
        fine_tune_layers=30,
        fine_tune_epochs=0,
    )


MOBILENET_V2_MEASURED = (
    "features of four depths (28x28, 14x14, 7x7 and the final 7x7 maps), standardized, L2 0.01 and no dropout: "
    "on trashnet (5-fold cross-validation of the head on cached features, 2524 photos) 87.8% against 84.0% "
    "for the former head on the final layer (dropout 0.2), and a logistic regression with its C tuned 87.9%; "
    "on cats vs dogs all at 99%; the other backbones keep the former head until measured"
)
"""Why MobileNetV2's head defaults differ from the other backbones' (bench/feature_layers.py, bench/trashnet.py)."""

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="mlp",
            family="mlp",
            preprocessing="unit",
            default_image_size=64,
            min_image_size=8,
            dense_units=(512, 256),
            dropout=0.3,
            epochs=30,
            lr_schedule="cosine",
            notes="dense layers on the flattened pixels, as in the classic tutorial",
        ),
        ModelSpec(
            name="cnn",
            family="cnn",
            preprocessing="unit",
            default_image_size=150,
            min_image_size=16,
            dense_units=(512,),
            dropout=0.5,
            epochs=30,
            lr_schedule="cosine",
            batch_norm=True,
            notes="a small Conv2D/MaxPooling network from scratch (Chollet, ch. 5)",
        ),
        replace(
            _backbone("mobilenet_v2", "MobileNetV2", "tf"),
            feature_layers=("block_6_expand_relu", "block_13_expand_relu", "block_16_expand_relu", "final"),
            l2=0.01,
            dropout=0.0,
            notes=MOBILENET_V2_MEASURED,
        ),
        _backbone("mobilenet_v3_small", "MobileNetV3Small", "none"),
        _backbone("mobilenet_v3_large", "MobileNetV3Large", "none"),
        *(
            _backbone(f"efficientnet_b{i}", f"EfficientNetB{i}", "none", size)
            for i, size in enumerate((224, 240, 260, 300, 380, 456, 528, 600))
        ),
        *(
            _backbone(f"efficientnet_v2_{v.lower()}", f"EfficientNetV2{v}", "none", size)
            for v, size in (("B0", 224), ("B1", 240), ("B2", 260), ("B3", 300), ("S", 384))
        ),
        _backbone("resnet50", "ResNet50", "caffe"),
        _backbone("resnet50_v2", "ResNet50V2", "tf"),
        _backbone("vgg16", "VGG16", "caffe"),
        _backbone("vgg19", "VGG19", "caffe"),
        _backbone("inception_v3", "InceptionV3", "tf", 299, 75),
        _backbone("inception_resnet_v2", "InceptionResNetV2", "tf", 299, 75),
        _backbone("xception", "Xception", "tf", 299, 71),
        _backbone("densenet121", "DenseNet121", "torch"),
        _backbone("convnext_tiny", "ConvNeXtTiny", "none"),
    ]
}
DEFAULT_MODEL = "mobilenet_v2"


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(REGISTRY)}") from None


def check_image_size(spec: ModelSpec, image_size: int) -> None:
    if image_size < spec.min_image_size:
        raise UserError(
            f"{spec.name} cannot take {image_size}x{image_size} images; use --image-size "
            f"{spec.min_image_size} or more (its native size is {spec.default_image_size})"
        )


def check_weights(spec: ModelSpec, weights: str) -> None:
    """Reject weights that cannot apply before any work is done."""
    if weights == "imagenet" and not spec.pretrained:
        raise UserError(
            f"{spec.name} learns from scratch, there are no ImageNet weights for it; "
            "use --weights none, or a pretrained --model such as mobilenet_v2"
        )
    if weights not in ("imagenet", "none"):
        path = Path(weights)
        if not path.is_file():
            raise UserError(
                f"weights file {path} does not exist; give the path of a Keras .h5 / .weights.h5 file, "
                "or use --weights imagenet (downloads once) or --weights none"
            )


@dataclass
class BuiltModel:
    """The full model and, for backbones, the parts the training phases use separately."""

    model: object
    spec: ModelSpec
    backbone: object | None = None
    features: object | None = None
    """image -> pooled backbone features (the part whose output can be cached)."""
    head: object | None = None
    """pooled features -> class probabilities (the part trained on cached features)."""


def _regularizer(keras, l2: float):
    return keras.regularizers.L2(l2) if l2 > 0 else None


def build_head(
    keras,
    feature_dim: int,
    num_classes: int,
    dense_units,
    dropout: float,
    l2: float,
    standardize: bool = False,
    groups: list[int] | None = None,
):
    """[Standardize ->] Dropout -> [Dense -> Dropout]* -> softmax, as its own small model."""
    from .layers import Standardize

    inputs = keras.Input((feature_dim,), name="features")
    x = Standardize(groups, name="standardize")(inputs) if standardize else inputs
    x = keras.layers.Dropout(dropout, name="head_dropout")(x) if dropout > 0 else x
    for i, units in enumerate(dense_units, start=1):
        x = keras.layers.Dense(
            units, activation="relu", kernel_regularizer=_regularizer(keras, l2), name=f"dense_{i}"
        )(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=_regularizer(keras, l2), name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name="head")


def _resized_input(keras, image_size: int, resize: str):
    """Any-size RGB input, resized the way preprocessing resized the training images."""
    from .layers import SquareResize

    inputs = keras.Input((None, None, 3), name="image")
    return inputs, SquareResize(image_size, resize, name="resize")(inputs)


def _load_backbone(keras, spec: ModelSpec, image_size: int, weights: str):
    from .tf_env import keras_home

    constructor = getattr(keras.applications, spec.application)
    source = {"imagenet": "imagenet", "none": None}.get(weights, weights)
    try:
        return constructor(include_top=False, weights=source, input_shape=(image_size, image_size, 3))
    except Exception as error:
        message = str(error)
        url = re.search(r"https?://\S+?\.h5", message)
        if weights == "imagenet" and (url or "fetch" in message.lower() or isinstance(error, OSError)):
            cache = Path(keras_home()) / "models"
            where = (
                f"download {url.group(0)} elsewhere" if url else f"get the {spec.application} no-top weights"
            )
            raise UserError(
                f"could not download the ImageNet weights for {spec.name} (no internet?); connect once and "
                f"Keras keeps them in {cache}, or {where} and put the file in {cache}, or pass a weights "
                "file with --weights PATH"
            ) from None
        if weights not in ("imagenet", "none"):
            raise UserError(
                f"could not load weights file {weights} into {spec.name}: {message.splitlines()[0][:200]}; "
                f"it must be Keras weights for {spec.application} without its top (include_top=False)"
            ) from None
        raise


def build_model(
    spec: ModelSpec,
    num_classes: int,
    image_size: int,
    *,
    resize: str = "squash",
    weights: str = "none",
    dropout: float | None = None,
    dense_units=None,
    l2: float = 0.0,
    batch_norm: bool | None = None,
    feature_layers: tuple[str, ...] | None = None,
) -> BuiltModel:
    """Build the network for `spec`; backbones come frozen, ready for the first training phase."""
    from .layers import InputPreprocessing
    from .tf_env import import_keras

    keras = import_keras()
    check_image_size(spec, image_size)
    dropout = spec.dropout if dropout is None else dropout
    dense_units = spec.dense_units if dense_units is None else tuple(dense_units)
    batch_norm = spec.batch_norm if batch_norm is None else batch_norm
    inputs, x = _resized_input(keras, image_size, resize)
    x = InputPreprocessing(spec.preprocessing, name="preprocessing")(x)

    if spec.family == "backbone":
        layers = tuple(feature_layers or spec.feature_layers)
        backbone = _taps(keras, _load_backbone(keras, spec, image_size, weights), layers)
        backbone.trainable = False
        tapped = backbone(x)
        pooled = _pooled(keras, tapped)
        features = keras.Model(inputs, pooled, name="features")
        several = layers != ("final",)  # depths differ in scale by an order of magnitude: standardize them
        groups = [int(t.shape[-1]) for t in tapped] if isinstance(tapped, (list, tuple)) else None
        head = build_head(
            keras, pooled.shape[-1], num_classes, dense_units, dropout, l2, standardize=several, groups=groups
        )
        model = keras.Model(inputs, head(pooled), name=spec.name)
        return BuiltModel(model=model, spec=spec, backbone=backbone, features=features, head=head)

    if spec.family == "cnn":
        for i, filters in enumerate((32, 64, 128, 128), start=1):
            x = keras.layers.Conv2D(
                filters,
                3,
                padding="same",
                use_bias=not batch_norm,  # BatchNormalization's own offset replaces the bias
                kernel_regularizer=_regularizer(keras, l2),
                name=f"conv_{i}",
            )(x)
            if batch_norm:
                x = keras.layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"batch_norm_{i}")(x)
            x = keras.layers.Activation("relu", name=f"relu_{i}")(x)
            x = keras.layers.MaxPooling2D(2, name=f"pool_{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    head = build_head(keras, x.shape[-1], num_classes, dense_units, dropout, l2)
    model = keras.Model(inputs, head(x), name=spec.name)
    if weights not in ("imagenet", "none"):
        try:
            model.load_weights(weights)
        except Exception as error:
            raise UserError(
                f"could not load weights file {weights} into {spec.name}: {str(error).splitlines()[0][:200]}; "
                "it must come from the same --model, --image-size, --dense-units and categories"
            ) from None
    return BuiltModel(model=model, spec=spec, head=head)


def _taps(keras, backbone, layers: tuple[str, ...]):
    """The backbone with an output at each of `layers` ("final": its own output); itself for ("final",)."""
    if tuple(layers) == ("final",):
        return backbone
    names = [layer.name for layer in backbone.layers]
    unknown = [name for name in layers if name != "final" and name not in names]
    if unknown:
        raise UserError(
            f"{backbone.name} has no layer {', '.join(unknown)}; --feature-layers takes layer names such as "
            f"{', '.join(names[-40::13])} (scripts/summary.py lists them all), or final"
        )
    outputs = [backbone.output if name == "final" else backbone.get_layer(name).output for name in layers]
    return keras.Model(backbone.input, outputs, name=backbone.name)


def _pooled(keras, outputs):
    """Each feature map averaged over space, concatenated: one vector per photo, named "pool"."""
    if not isinstance(outputs, (list, tuple)):
        return keras.layers.GlobalAveragePooling2D(name="pool")(outputs)
    pooled = [
        keras.layers.GlobalAveragePooling2D(name=f"pool_{i}")(output) for i, output in enumerate(outputs)
    ]
    return keras.layers.Concatenate(name="pool")(pooled)


def unfreeze_top(built: BuiltModel, layers: int) -> int:
    """Make the top `layers` backbone layers trainable, BatchNorm excepted; returns how many were."""
    from .tf_env import import_keras

    keras = import_keras()
    backbone = built.backbone
    backbone.trainable = True
    cut = max(0, len(backbone.layers) - layers)
    for index, layer in enumerate(backbone.layers):
        # A frozen BatchNormalization layer runs in inference mode: its ImageNet statistics stay intact.
        layer.trainable = index >= cut and not isinstance(layer, keras.layers.BatchNormalization)
    return sum(1 for layer in backbone.layers if layer.trainable and layer.weights)


def load_model(path: Path):
    """Load a saved model.keras (the project's custom layers registered first)."""
    from . import layers  # noqa: F401
    from .tf_env import import_keras

    return import_keras().models.load_model(path)


def show_architecture(
    spec: ModelSpec, num_classes: int, image_size: int, diagram: Path, dense_units=None, print_fn=print
) -> Path | None:
    """Print model.summary() and draw the diagram with keras.utils.model_to_dot when Graphviz is installed."""
    from .tf_env import import_keras

    keras = import_keras()
    built = build_model(spec, num_classes, image_size, dense_units=dense_units)
    built.model.summary(print_fn=print_fn, expand_nested=False)
    if built.backbone is not None:
        print_fn(
            f"The backbone {spec.application} has {len(built.backbone.layers)} layers (--fine-tune-layers counts these)."
        )
    try:
        diagram.parent.mkdir(parents=True, exist_ok=True)
        graph = keras.utils.model_to_dot(built.model, show_shapes=True, show_layer_names=True, dpi=96)
        # plot_model's orthogonal edges crash Graphviz 2.43 (Debian's) on the cnn ("trapezoid-table overflow")
        graph.set("splines", "polyline")
        graph.write(str(diagram), format="png")
    except ImportError as error:
        print_fn(f"No diagram: {error} (on Debian/Ubuntu: apt-get install graphviz)")
        return None
    print_fn(f"Diagram saved to: {diagram}")
    return diagram
