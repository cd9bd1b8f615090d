"""Export a run's model for deployment (SavedModel, TFLite, ONNX), and prove the copy predicts like the original.

Every export takes uint8 RGB images (0..255), so nobody has to guess between 0..1 and 0..255 floats, and
returns softmax probabilities in labels.json order (calibrated: model.keras holds the run's temperature). A
SavedModel of a run with a "none of these" check (openset.py) also returns `known_score`, one number per
image: the photo belongs to some category when it is at least export.json's threshold. The SavedModel keeps the whole model, resizing
included, and takes any image size. TFLite and ONNX have no equivalent of TensorFlow's antialiased resize
(ScaleAndTranslate), so they take images already resized to the run's --image-size, the way predict.py
resizes them; at that size the model's resize layer is an exact identity and is left out.

An export is written into a hidden folder inside <run>/export/, checked against the Keras model on the
run's test images, and only then moved into place: a failed check leaves any earlier export untouched.
Every forward pass is traced with training=False: Keras 3's own `model.export()` calls the model without it,
and the Resizing layer then switches the dropout layers on (the exported model gives random answers).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .atomic import write_json
from .config import Workspace
from .errors import UserError
from .runs import RunFolder

FORMATS = ("savedmodel", "tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "int8")
TOLERANCES = {"none": 1e-4, "float16": 0.1, "int8": 0.2}
"""Largest allowed |probability difference| from the Keras model. Measured on MobileNetV2 (96 px, 320 real
photos): float32 exports differ by at most 8e-6, float16 weights by 0.064, dynamic-range int8 by 0.10."""
ONNX_OPSET = 17
CHECK_BATCH = 32
EXPORT_DIR = "export"
INDEX_NAME = "export.json"


@dataclass(frozen=True)
class ExportOptions:
    format: str
    run: str = "latest"
    quantize: str = "none"

    def validate(self) -> None:
        """Reject impossible combinations before TensorFlow is imported."""
        if self.format not in FORMATS:
            raise UserError(f"unknown --format {self.format!r}; choose from {', '.join(FORMATS)}")
        if self.quantize not in QUANTIZATIONS:
            raise UserError(f"unknown --quantize {self.quantize!r}; choose from {', '.join(QUANTIZATIONS)}")
        if self.quantize != "none" and self.format != "tflite":
            raise UserError(f"--quantize applies to --format tflite only, not {self.format}")

    @property
    def artifact(self) -> str:
        if self.format == "savedmodel":
            return "savedmodel"
        if self.format == "onnx":
            return "model.onnx"
        return "model.tflite" if self.quantize == "none" else f"model_{self.quantize}.tflite"

    @property
    def title(self) -> str:
        return self.format if self.quantize == "none" else f"{self.format} ({self.quantize})"


@dataclass(frozen=True)
class Check:
    """How an export's probabilities compare with the Keras model's on the same images."""

    images: int
    split: str
    top1_same: int
    near_tie_flips: int
    max_difference: float
    mean_difference: float
    tolerance: float
    passed: bool
    known_score_difference: float | None = None
    """Largest |known_score difference| from the check computed in numpy (SavedModel only)."""

    def describe(self) -> str:
        verdict = "passed" if self.passed else "failed"
        flips = f" (the other {self.near_tie_flips} near-ties)" if self.near_tie_flips else ""
        known = (
            ""
            if self.known_score_difference is None
            else f", max |known_score difference| {self.known_score_difference:.2g}"
        )
        return (
            f"Check on {self.images} {self.split} images: top-1 the same on {self.top1_same}/{self.images}"
            f"{flips}, max |probability difference| {self.max_difference:.2g} (mean {self.mean_difference:.2g})"
            f"{known}, tolerance {self.tolerance:g}: {verdict}"
        )


def compare(
    reference: np.ndarray,
    exported: np.ndarray,
    tolerance: float,
    *,
    allow_near_ties: bool,
    split: str = "test",
) -> Check:
    """Every probability within `tolerance`, and the same top-1 on every image.

    With `allow_near_ties` (quantized exports) a different top-1 is accepted where the Keras model's two best
    classes are within 2 x tolerance of each other, the only places where probabilities that are all within
    tolerance can swap the winner; quantization does flip such close calls (measured: 2 of 320 real photos).
    """
    reference = np.asarray(reference, dtype=np.float64)
    exported = np.asarray(exported, dtype=np.float64)
    if reference.shape != exported.shape:
        raise UserError(f"the export returned shape {exported.shape}, the Keras model {reference.shape}")
    difference = np.abs(reference - exported)
    finite = bool(np.isfinite(exported).all())
    same = reference.argmax(axis=1) == exported.argmax(axis=1)
    ordered = np.sort(reference, axis=1)
    margin = ordered[:, -1] - (ordered[:, -2] if reference.shape[1] > 1 else 0.0)
    near_tie_flips = int(np.sum(~same & (margin <= 2 * tolerance))) if allow_near_ties else 0
    max_difference = float(difference.max()) if finite and difference.size else float("inf")
    passed = finite and max_difference <= tolerance and int(np.sum(~same)) == near_tie_flips
    return Check(
        images=len(reference),
        split=split,
        top1_same=int(same.sum()),
        near_tie_flips=near_tie_flips,
        max_difference=max_difference,
        mean_difference=float(difference.mean()) if finite and difference.size else float("inf"),
        tolerance=tolerance,
        passed=passed,
    )


def input_contract(options: ExportOptions, run: RunFolder) -> dict:
    """The input and output of an exported model, as written to export.json and printed."""
    classes = len(run.labels)
    if options.format == "savedmodel":
        shape, note = (
            [None, None, None, 3],
            (
                "any size; the model resizes like training (--resize "
                f"{run.resize}, antialiased bilinear) to {run.image_size}x{run.image_size}"
            ),
        )
    else:
        shape, note = (
            [None, run.image_size, run.image_size, 3],
            (
                f"resize to {run.image_size}x{run.image_size} first, as predict.py does "
                f"(images.resize_square, --resize {run.resize}, bilinear)"
            ),
        )
    contract = {
        "input": {
            "name": "image",
            "dtype": "uint8",
            "shape": shape,
            "layout": "NHWC RGB 0..255",
            "note": note,
        },
        "output": {
            "name": "probabilities",
            "dtype": "float32",
            "shape": [None, classes],
            "labels": run.labels,
        },
    }
    check = run.metrics.get("open_set")
    if options.format == "savedmodel" and check and run.file("openset.npz").is_file():
        contract["known_score"] = {
            "name": "known_score",
            "dtype": "float32",
            "shape": [None],
            "method": check["method"],
            "threshold": check["threshold"],
            "note": 'at least the threshold: one of the categories; below it: "none of these"',
        }
    return contract


def _describe_contract(contract: dict) -> str:
    def shape(values) -> str:
        return (
            "["
            + ", ".join("N" if i == 0 else ("any" if v is None else str(v)) for i, v in enumerate(values))
            + "]"
        )

    given, result = contract["input"], contract["output"]
    text = (
        f"input '{given['name']}' {given['dtype']} {shape(given['shape'])} RGB 0..255 ({given['note']}); "
        f"output '{result['name']}' {result['dtype']} {shape(result['shape'])} in labels.json order"
    )
    if "known_score" in contract:
        known = contract["known_score"]
        text += f" and 'known_score' {known['dtype']} [N] (known when >= {known['threshold']:.4g})"
    return text


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
    return path.stat().st_size


def _megabytes_text(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def _test_images(run: RunFolder) -> tuple[np.ndarray, str]:
    """The run's test images as prepared for training (validation if a given test split is empty)."""
    try:
        dataset = run.dataset(unchanged=False)
    except UserError as error:
        raise UserError(
            f"{error}; the export is checked on its test images: run scripts/preprocess.py with the run's "
            "options again"
        ) from None
    for split in ("test", "validation"):
        images, _ = dataset.arrays(split)
        if len(images):
            return images, split
    raise UserError(
        f"the prepared dataset {dataset.path} has no test or validation images to check the export on"
    )


def _keras_probabilities(model, images: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [
            np.asarray(model.predict_on_batch(np.asarray(images[start : start + CHECK_BATCH], np.float32)))
            for start in range(0, len(images), CHECK_BATCH)
        ]
    )


def _with_embeddings(model):
    """The model with a second output: the embedding the "none of these" check compares (openset.Embedder)."""
    from .openset import embedding_width
    from .tf_env import import_keras

    keras = import_keras()
    width = embedding_width(model)
    if width:
        pooled = model.get_layer("pool").output
        return keras.Model(model.input, [model.output, pooled[:, -width:]])
    head = model.get_layer("head")
    both = keras.Model(head.input, [head.output, head.get_layer("predictions").input])
    return keras.Model(model.input, both(model.get_layer("flatten").output))


def _serving_function(model, image_size: int | None, check=None):
    """uint8 images -> {'probabilities'} in inference mode: the whole model for any size, or, for a fixed
    size, the model after its resize layer (an exact identity at that size). With an openset.OpenSet
    `check` (any size only) also {'known_score'}."""
    import tensorflow as tf

    from .tf_env import import_keras

    keras = import_keras()
    if image_size is not None:
        try:
            resized = model.get_layer("resize").output
        except ValueError:
            raise UserError(
                "this model has no 'resize' layer; it was not made by this project's training"
            ) from None
        model = keras.Model(resized, model.output)
    signature = [tf.TensorSpec((None, image_size, image_size, 3), tf.uint8, name="image")]
    if check is not None:
        model = _with_embeddings(model)

        @tf.function(input_signature=signature)
        def serve_known(image):
            probabilities, embeddings = model(tf.cast(image, tf.float32), training=False)
            return {
                "probabilities": probabilities,
                "known_score": check.score_tensor(embeddings, probabilities),
            }

        return model, serve_known, signature

    @tf.function(input_signature=signature)
    def serve(image):
        return {"probabilities": model(tf.cast(image, tf.float32), training=False)}

    return model, serve, signature


def _write_savedmodel(model, destination: Path, image_size: int | None = None, check=None) -> None:
    """A plain tf.Module SavedModel: Keras's ExportArchive stores every variable twice (twice the size)."""
    import tensorflow as tf

    model, serve, _ = _serving_function(model, image_size, check)
    module = tf.Module()
    module.weights = [variable.value for variable in model.variables]
    module.serve = serve
    tf.saved_model.save(
        module, str(destination), signatures={"serving_default": serve.get_concrete_function()}
    )


def _write_tflite(model, run: RunFolder, quantize: str, destination: Path, scratch: Path) -> None:
    import tensorflow as tf

    source = scratch / "tflite-source"
    _write_savedmodel(model, source, run.image_size)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(source))
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    destination.write_bytes(converter.convert())


def _write_onnx(model, run: RunFolder, destination: Path) -> None:
    import tf2onnx

    _, serve, signature = _serving_function(model, run.image_size)
    tf2onnx_log = logging.getLogger("tf2onnx")
    level = tf2onnx_log.level
    tf2onnx_log.setLevel(logging.ERROR)
    try:
        tf2onnx.convert.from_function(
            serve, input_signature=signature, opset=ONNX_OPSET, output_path=str(destination)
        )
    finally:
        tf2onnx_log.setLevel(level)


def load_exported(path: Path, format: str):
    """A function uint8 images -> probabilities, running the export with its own runtime (not Keras)."""
    if format == "savedmodel":
        import tensorflow as tf

        serving = tf.saved_model.load(str(path)).signatures["serving_default"]
        return lambda images: serving(image=tf.constant(images))["probabilities"].numpy()
    if format == "tflite":
        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's notice about the ai-edge-litert package
            interpreter = tf.lite.Interpreter(model_path=str(path))
        runner = interpreter.get_signature_runner("serving_default")
        return lambda images: runner(image=images)["probabilities"]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run(["probabilities"], {"image": images})[0]


def check_export(
    path: Path, options: ExportOptions, model, images: np.ndarray, split: str, check=None
) -> Check:
    """Run the export on `images` with its own runtime and compare with the Keras model (and, for a
    SavedModel with a "none of these" `check`, its known scores with the ones computed in numpy)."""
    predict = load_exported(path, options.format)
    exported = np.concatenate(
        [
            np.asarray(predict(np.ascontiguousarray(images[start : start + CHECK_BATCH], dtype=np.uint8)))
            for start in range(0, len(images), CHECK_BATCH)
        ]
    )
    found = compare(
        _keras_probabilities(model, images),
        exported,
        TOLERANCES[options.quantize],
        allow_near_ties=options.quantize != "none",
        split=split,
    )
    if check is None or options.format != "savedmodel":
        return found
    difference = _known_score_difference(path, model, check, images)
    passed = found.passed and difference <= TOLERANCES["none"]
    return replace(found, known_score_difference=difference, passed=passed)


def _known_score_difference(path: Path, model, check, images: np.ndarray) -> float:
    import tensorflow as tf

    serving = tf.saved_model.load(str(path)).signatures["serving_default"]
    both = _with_embeddings(model)
    largest = 0.0
    for start in range(0, len(images), CHECK_BATCH):
        batch = np.ascontiguousarray(images[start : start + CHECK_BATCH], dtype=np.uint8)
        exported = serving(image=tf.constant(batch))["known_score"].numpy()
        probabilities, embeddings = (
            np.asarray(part) for part in both.predict_on_batch(batch.astype(np.float32))
        )
        expected = check.scores(embeddings, probabilities)
        if not np.isfinite(exported).all():
            return float("inf")
        largest = max(largest, float(np.abs(exported - expected).max()))
    return largest


@contextmanager
def _locked(folder: Path):
    """One export at a time per run folder, so export.json never loses an entry."""
    handle = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _install(new: Path, final: Path, scratch: Path) -> None:
    """Move the checked export into place; a SavedModel folder is swapped with two renames."""
    if new.is_dir() and final.exists():
        os.replace(final, scratch / "replaced")
    os.replace(new, final)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    size: int
    check: Check
    contract: dict


def _write_checked(model, run, options, new: Path, scratch: Path, images, split: str, print_fn) -> Check:
    """Write the artefact into scratch and check it predicts like the Keras model; refuse it if not."""
    from .openset import OpenSet

    known_check = OpenSet.load(run) if options.format == "savedmodel" else None
    if options.format == "savedmodel":
        _write_savedmodel(model, new, check=known_check)
    elif options.format == "tflite":
        _write_tflite(model, run, options.quantize, new, scratch)
    else:
        _write_onnx(model, run, new)
    check = check_export(new, options, model, images, split, known_check)
    print_fn(check.describe())
    if not check.passed:
        found = check.describe()
        hint = {"int8": "; try --quantize float16 or none", "float16": "; try --quantize none"}
        raise UserError(
            f"the {options.title} export does not predict like the Keras model "
            f"({found[0].lower()}{found[1:]}); nothing was saved{hint.get(options.quantize, '')}"
        )
    return check


def _record(index_path: Path, options, size: int, contract: dict, check: Check) -> None:
    """The artefact's entry in export.json: format, size, input contract and the check it passed."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    index[options.artifact] = {
        "format": options.format,
        "quantize": options.quantize,
        "bytes": size,
        **contract,
        "check": asdict(check),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(index_path, index)


def export_run(options: ExportOptions, workspace: Workspace, print_fn=print) -> ExportResult:
    """The export stage: write, check, then install <run>/export/<artifact> and its export.json entry."""
    options.validate()
    run = RunFolder.find(workspace, options.run)
    images, split = _test_images(run)
    folder = run.path / EXPORT_DIR
    try:
        folder.mkdir(exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write the export into {folder}: {error.strerror or error}") from None
    from .models import load_model

    print_fn(f"Exporting run {run.path.name} as {options.title}")
    model = load_model(run.model_path)
    started = time.monotonic()
    with _locked(folder):
        scratch = Path(tempfile.mkdtemp(dir=folder, prefix=".partial-"))
        try:
            new = scratch / options.artifact
            check = _write_checked(model, run, options, new, scratch, images, split, print_fn)
            size = _size(new)
            final = folder / options.artifact
            _install(new, final, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        contract = input_contract(options, run)
        write_json(folder / "labels.json", run.labels)
        _record(folder / INDEX_NAME, options, size, contract, check)
    keras_size = run.model_path.stat().st_size
    print_fn(
        f"Saved {final} ({_megabytes_text(size)}; model.keras is {_megabytes_text(keras_size)}) in "
        f"{time.monotonic() - started:.0f}s"
    )
    print_fn(f"Contract: {_describe_contract(contract)}")
    return ExportResult(path=final, size=size, check=check, contract=contract)
