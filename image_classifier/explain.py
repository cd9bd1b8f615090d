"""Where the model looked: Grad-CAM heatmaps (Selvaraju et al. 2017; Chollet, Deep Learning with Python,
ch. 5.4; keras-io's "Grad-CAM class activation visualization").

The gradient of the top class's logit with respect to the last convolutional feature map, averaged over the
map, weighs each channel; their weighted sum, clipped at 0, is the heatmap. The logit (the head's last Dense
layer without its softmax, as keras-io does by removing the activation) rather than the probability: a
confident softmax saturates and its gradient vanishes. A backbone with several --feature-layers gives one
map per depth, each normalized and averaged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError

BATCH = 16
ALPHA = 0.45
"""How much of the overlay is heatmap."""


class GradCam:
    """A model cut at its last feature maps: photo -> maps (front), maps -> the head's logits (back)."""

    def __init__(self, model) -> None:
        from .tf_env import import_keras

        keras = import_keras()
        names = [layer.name for layer in model.layers]
        head = model.get_layer("head")
        dense = head.get_layer("predictions")
        if "pool" in names:
            pool = model.get_layer("pool")
            taps = [model.get_layer(n).input for n in names if n.startswith("pool_")] or [pool.input]
            feeder = pool.output
        elif "flatten" in names and any(_is_map(layer) for layer in model.layers):
            taps = [[layer for layer in model.layers if _is_map(layer)][-1].output]
            feeder = model.get_layer("flatten").output
        else:
            raise UserError(
                f"{model.name} has no convolutional feature maps to explain; Grad-CAM needs cnn or a backbone"
            )
        self.front = keras.Model(model.input, taps)
        self.back = keras.Model(taps, keras.Model(head.input, dense.input)(feeder))
        self.kernel, self.bias = dense.kernel, dense.bias

    def heatmaps(self, images: np.ndarray) -> np.ndarray:
        """uint8 images N x H x W x 3 -> N x H x W heatmaps in [0, 1] for each image's top class."""
        import tensorflow as tf

        maps = self.front(tf.constant(np.asarray(images, np.float32)), training=False)
        maps = list(maps) if isinstance(maps, (list, tuple)) else [maps]
        with tf.GradientTape() as tape:
            tape.watch(maps)
            hidden = self.back(maps if len(maps) > 1 else maps[0], training=False)
            logits = tf.matmul(hidden, self.kernel) + self.bias
            chosen = tf.gather(logits, tf.argmax(logits, axis=1), axis=1, batch_dims=1)
        gradients = tape.gradient(chosen, maps)
        size = images.shape[1:3]
        combined = np.zeros((len(images), *size), np.float32)
        for feature_map, gradient in zip(maps, gradients, strict=True):
            weights = tf.reduce_mean(gradient, axis=(1, 2), keepdims=True)
            cam = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1))[..., None]
            resized = tf.image.resize(cam, size, method="bilinear").numpy()[..., 0]
            combined += _unit(resized)
        return _unit(combined / len(maps))


def _is_map(layer) -> bool:
    """A convolution's activation: a 4-D output that is not pooling (cnn's relu_N, conv_N)."""
    shape = getattr(getattr(layer, "output", None), "shape", None)
    return (
        shape is not None
        and len(shape) == 4
        and "Pooling" not in type(layer).__name__
        and layer.name
        not in (
            "resize",
            "preprocessing",
            "image",
        )
    )


def _unit(heatmaps: np.ndarray) -> np.ndarray:
    """Each heatmap scaled to [0, 1] by its own maximum (all zeros stays zeros)."""
    peak = heatmaps.reshape(len(heatmaps), -1).max(axis=1) if len(heatmaps) else np.zeros(0)
    return (heatmaps / np.maximum(peak, 1e-12)[:, None, None]).astype(np.float32)


def gradcam(run_or_model, images: np.ndarray) -> np.ndarray:
    """Grad-CAM heatmaps (N x H x W, in [0, 1]) of the top class, for uint8 images as load_array makes them.

    `run_or_model` is a RunFolder (its model.keras is loaded) or a loaded Keras model of this project.
    """
    model = run_or_model
    if hasattr(run_or_model, "model_path"):
        from .models import load_model

        model = load_model(run_or_model.model_path)
    explainer = GradCam(model)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"Grad-CAM takes N x H x W x 3 RGB images, got an array of shape {images.shape}")
    parts = [explainer.heatmaps(images[start : start + BATCH]) for start in range(0, len(images), BATCH)]
    return np.concatenate(parts) if parts else np.zeros((0, *images.shape[1:3]), np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """The heatmap in the jet colour map over the photo, as keras-io draws it: uint8 RGB, the photo's size."""
    from matplotlib import colormaps
    from PIL import Image

    image = np.asarray(image, np.uint8)
    height, width = image.shape[:2]
    heat = np.clip(np.asarray(heatmap, np.float32), 0, 1)
    if heat.shape != (height, width):
        heat = np.asarray(Image.fromarray(heat).resize((width, height), Image.Resampling.BILINEAR))
    colours = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def explanation_name(source: str, folder: Path, taken: set[str]) -> Path:
    """<folder>/<photo's stem>.gradcam.png, numbered when that name is taken (never overwrites a file)."""
    stem = Path(source.rstrip("/").split("?")[0]).stem or "image"
    for number in range(1, 100_000):
        name = f"{stem}.gradcam.png" if number == 1 else f"{stem}-{number}.gradcam.png"
        if name not in taken and not (folder / name).exists():
            taken.add(name)
            return folder / name
    raise UserError(f"no free file name for the heatmap of {source} in {folder}")


SHOWN_SIZE = 224
"""Heatmaps of small model inputs are drawn at least this large, so they can be seen."""


class HeatmapWriter:
    """predict.py --explain DIR: each photo as the model saw it, its Grad-CAM heatmap over it, as a PNG."""

    def __init__(self, load_model, folder: Path) -> None:
        """`load_model` gives the model on the first photo: inputs that are all unreadable load nothing."""
        self.load_model = load_model
        self._explainer = None
        self.folder = folder
        self.taken: set[str] = set()
        self.written: list[Path] = []

    @property
    def explainer(self) -> GradCam:
        if self._explainer is None:
            self._explainer = GradCam(self.load_model())
        return self._explainer

    def __call__(self, names: list[str], images: np.ndarray) -> list[Path]:
        import io

        from PIL import Image

        from .atomic import write_atomic

        paths = []
        for start in range(0, len(images), BATCH):
            batch = np.asarray(images[start : start + BATCH])
            for name, image, heatmap in zip(
                names[start:], batch, self.explainer.heatmaps(batch), strict=False
            ):
                picture = Image.fromarray(image)
                side = max(SHOWN_SIZE, image.shape[0])
                if side != image.shape[0]:
                    picture = picture.resize((side, side), Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                Image.fromarray(overlay(np.asarray(picture), heatmap)).save(buffer, "PNG")
                path = explanation_name(name, self.folder, self.taken)
                write_atomic(path, buffer.getvalue())
                paths.append(path)
        self.written.extend(paths)
        return paths


def explanation_folder(text: str) -> Path:
    """The --explain folder, made if missing; a file there is refused before any work."""
    folder = Path(text)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--explain {text} is a file; give a folder for the heatmaps (it is made if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot make the --explain folder {text}: {error.strerror or error}") from None
    return folder
