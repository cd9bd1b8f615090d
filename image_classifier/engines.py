"""Run a frozen Keras feature extractor fast: LiteRT (XNNPACK) or ONNX Runtime on a CPU, TensorFlow on a GPU.

    engine = FeatureEngine(built.features, cache_dir=workspace / "engines", key=cache_key(...), image_size=160)
    features = engine.run(images, batch_size=64, progress=bar.update)   # (N, D) float32
    engine.name              # the engine that actually runs: "keras", "litert" or "onnx"
    engine.fallback_reason   # one line when a requested engine fell back to keras, else None

The model is converted once, written atomically to <cache_dir>/<key>.tflite or .onnx with a sha256 beside it
(<key>.<ext>.json), and reused by later runs; a cached file that does not match its sha256 or does not load is
converted again. A fresh conversion is checked against the Keras model on a few generated images before use.
Anything that goes wrong (the runtime not installed, an op the converter or the runtime lacks, a failed check)
falls back to the Keras model with one printed line saying why: never fatal, never silently different numbers.
A failed conversion is remembered in <key>.<ext>.json with the versions of TensorFlow and the engine, so it is not
tried again every run; upgrading either tries again.

The converted graph takes images of one fixed size. A project model that starts with its any-size resize
layer ("resize", layers.SquareResize) is cut after that layer: at its own size the resize is an exact identity
(export.py relies on the same fact), and neither engine has TensorFlow's antialiased ScaleAndTranslate.

TensorFlow is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .atomic import write_atomic

ENGINES = ("keras", "litert", "onnx")
CPU_PREFERENCE = ("litert", "onnx")
"""Fastest first, measured on this project's 2-core machine with bench/feature_engines.py (MobileNetV2 pooled
features, 256 real photos, three runs on a shared machine): at 224 px LiteRT with XNNPACK 3.2-5.6x Keras predict,
ONNX Runtime 2.1-2.4x, a tf.function 1.5-2.3x; at 160 px 3.2-4.3x, 1.3-2.4x and 1.1-2.1x."""
EXTENSIONS = {"litert": "tflite", "onnx": "onnx"}
CHECK_IMAGES = 4
TOLERANCE = 1e-3
"""Largest allowed |feature difference| from Keras, relative to the largest |feature| (at least 1). Measured on
MobileNetV2 (features up to 5-6): LiteRT differs from Keras by at most 6.4e-5, ONNX Runtime by 5.0e-5."""
ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "features"

Progress = Callable[[int], object]


def cpu_threads() -> int:
    """The cores this process may use (the affinity mask, which os.cpu_count() ignores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available(engine: str) -> bool:
    """Whether the engine's runtime can be imported here (keras always can)."""
    try:
        if engine == "litert":
            import ai_edge_litert.interpreter  # noqa: F401
        elif engine == "onnx":
            import onnxruntime  # noqa: F401
            import tf2onnx  # noqa: F401
        elif engine != "keras":
            return False
    except ImportError:
        return False
    return True


def default_engine() -> str:
    """keras when TensorFlow sees a GPU, else the fastest CPU engine that is installed (keras if none is)."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "keras"
    return next((engine for engine in CPU_PREFERENCE if available(engine)), "keras")


def model_digest(model) -> str:
    """sha256 of a Keras model's architecture (its JSON) and every weight value: two models with the same digest
    compute the same function, whatever file the weights came from."""
    digest = hashlib.sha256(model.to_json().encode())
    for weight in model.weights:
        value = np.ascontiguousarray(np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight))
        digest.update(f"{weight.path}:{value.dtype}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def cache_key(backbone: str, image_size: int, weights: str, layers: str = "pooled") -> str:
    """A file-name-safe cache key, e.g. cache_key("mobilenet_v2", 160, weights_sha256[:16]).

    `weights` is anything that identifies the weights (a file's hash, or model_digest(model)); `layers` names the
    part of the network converted. Both are hashed into the key when they are not already short and safe."""

    def safe(text: str) -> str:
        text = str(text)
        if len(text) <= 24 and all(c.isalnum() or c in "-_." for c in text):
            return text
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return f"{safe(backbone)}-{int(image_size)}px-{safe(layers)}-{safe(weights)}"


def fixed_size_model(model, image_size: int | None = None):
    """The model for inputs of one size (S, S, 3): a model with a fixed input as it is; a project model with an
    any-size input cut after its "resize" layer (an identity at its own size)."""
    from .tf_env import import_keras

    keras = import_keras()
    shape = tuple(model.input.shape[1:])
    if None not in shape:
        return model
    try:
        resize = model.get_layer("resize")
    except ValueError:
        raise ValueError(
            f"the model takes any image size {shape} and has no 'resize' layer; give it a fixed input size"
        ) from None
    size = getattr(resize, "size", None)
    if image_size is not None and size is not None and size != image_size:
        raise ValueError(f"the model resizes to {size}x{size}, not {image_size}x{image_size}")
    return keras.Model(resize.output, model.output, name=f"{model.name}_fixed")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    """One conversion of a key at a time, across processes."""
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


class _Remembered(Exception):
    """A conversion that failed before with the same versions; its text is the one line recorded then."""


def _one_line(error: BaseException) -> str:
    if isinstance(error, _Remembered):
        return str(error)
    text = str(error).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), "")
    if "error: " in first:  # the TFLite converter's MLIR location chain, then the reason
        first = first.rsplit("error: ", 1)[-1]
    return f"{type(error).__name__}: {first[:160]}" if first else type(error).__name__


def _versions(engine: str) -> dict[str, str]:
    """The versions a converted file or a failed conversion depends on."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["tensorflow", "tensorflow-cpu", "keras"]
    names += ["ai-edge-litert"] if engine == "litert" else ["tf2onnx", "onnxruntime"]
    found = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the converters' C++ diagnostics); the failure is reported in one line instead."""
    import sys

    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _check_images(shape: tuple[int, ...]) -> np.ndarray:
    """A few photo-like generated images (smooth colour fields, edges, noise) in 0..255."""
    rng = np.random.default_rng(0)
    height, width, channels = shape
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    images = []
    for index in range(CHECK_IMAGES):
        base = rng.uniform(30, 220, channels)
        slope = rng.uniform(-120, 120, (2, channels))
        image = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
        image[(yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.04 + 0.02 * index] = 255 - base
        images.append(image + rng.normal(0, 12, image.shape))
    return np.clip(np.stack(images), 0, 255).round().astype(np.float32)


class FeatureEngine:
    """Images (N, S, S, 3) uint8 or float32 in 0..255 -> features (N, D) float32, on the engine asked for.

    model: a Keras model from images of one fixed size, or a project model with a "resize" layer (see
    fixed_size_model). engine: one of ENGINES, or None for default_engine(). cache_dir and key: where the converted
    file lives (<cache_dir>/<key>.<ext>); the key must change whenever the model's function does (cache_key).
    print_fn gets the one line of a fallback. After construction, `converted` says whether this construction
    converted (False: the cached file was reused, or keras runs) and `check_difference` holds the measured
    max |difference| from Keras after a conversion.
    """

    def __init__(
        self,
        model,
        cache_dir: Path | str,
        key: str,
        engine: str | None = None,
        *,
        image_size: int | None = None,
        print_fn: Callable[[str], object] = print,
    ):
        self.model = fixed_size_model(model, image_size)
        self.input_shape = tuple(int(d) for d in self.model.input.shape[1:])
        self.cache_dir = Path(cache_dir)
        self.key = key
        self.requested = engine or default_engine()
        self.name = "keras"
        self.fallback_reason: str | None = None
        self.converted = False
        self.check_difference: float | None = None
        self.path: Path | None = None
        self._keras_function = None
        self._runner = None
        if self.requested == "keras":
            return
        try:
            if self.requested not in ENGINES:
                raise ValueError(f"unknown engine {self.requested!r}; choose from {', '.join(ENGINES)}")
            self._start(self.requested)
            self.name = self.requested
        except Exception as error:  # any failure of an optional engine: Keras computes the same features
            self.fallback_reason = f"{self.requested} engine unavailable ({_one_line(error)}); using keras"
            self._runner = None
            print_fn(f"Features: {self.fallback_reason}")

    # -- conversion and loading ------------------------------------------------------------------------------

    def _start(self, engine: str) -> None:
        if not available(engine):
            missing = "ai-edge-litert" if engine == "litert" else "onnxruntime / tf2onnx"
            raise ImportError(f"{missing} is not installed")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.cache_dir / f"{self.key}.{EXTENSIONS[engine]}"
        self.path = path
        record_path = path.with_name(path.name + ".json")
        versions = _versions(engine)
        with _locked(self.cache_dir / f".{self.key}.{EXTENSIONS[engine]}.lock"):
            try:
                record = json.loads(record_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                record = {}
            if record.get("failed") and record.get("versions") == versions:
                # An unconvertible model stays unconvertible with the same converter: do not try every run.
                raise _Remembered(f"{record['failed']}; remembered in {record_path}")
            if record.get("sha256") and path.is_file():
                try:
                    if record["sha256"] != _sha256(path):
                        raise ValueError("sha256 mismatch")
                    self._runner = self._load(engine, path)
                    return
                except Exception:  # truncated, corrupt or from an incompatible runtime: convert again
                    self._runner = None
            self.converted = True
            try:
                data = self._convert(engine)
                write_atomic(path, data)
                self._runner = self._load(engine, path)
                self._verify()
            except Exception as error:
                with contextlib.suppress(OSError):
                    path.unlink()
                if not isinstance(error, (OSError, MemoryError)):  # not a passing condition of this machine
                    failed = {"failed": _one_line(error), "versions": versions}
                    write_atomic(record_path, json.dumps(failed, indent=2).encode())
                raise
            info = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "engine": engine,
                "versions": versions,
                "input_shape": list(self.input_shape),
                "check_difference": self.check_difference,
            }
            write_atomic(record_path, json.dumps(info, indent=2).encode())

    def _serving(self):
        import tensorflow as tf

        model = self.model
        spec = tf.TensorSpec((None, *self.input_shape), tf.float32, name=INPUT_NAME)

        @tf.function(input_signature=[spec], autograph=False)
        def serve(image):
            return {OUTPUT_NAME: model(image, training=False)}

        return serve, spec

    def _convert(self, engine: str) -> bytes:
        serve, spec = self._serving()
        if engine == "litert":
            import tensorflow as tf

            # The converter freezes the variables it can reach from the trackable object; a Keras 3 model is not
            # one it follows (measured: a 205 KB file of garbage), so hold them in a plain tf.Module.
            holder = tf.Module()
            holder.weights = [variable.value for variable in self.model.variables]
            holder.serve = serve
            concrete = serve.get_concrete_function()
            converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
            with warnings.catch_warnings(), _quiet_stderr():
                warnings.simplefilter("ignore")
                return converter.convert()
        import tf2onnx

        class Unsupported(logging.Handler):
            def __init__(self):
                super().__init__()
                self.ops: list[str] = []

            def emit(self, record):
                message = record.getMessage()
                if message.startswith(
                    "Unsupported ops"
                ):  # "Unsupported ops: Counter({'ScaleAndTranslate': 1})"
                    self.ops += re.findall(r"'(\w+)'", message) or [message]

        tf2onnx_log = logging.getLogger("tf2onnx")
        level, handler = tf2onnx_log.level, Unsupported()
        tf2onnx_log.setLevel(logging.ERROR)
        tf2onnx_log.addHandler(handler)
        propagate, tf2onnx_log.propagate = tf2onnx_log.propagate, False  # its ERROR lines: we say it in one
        try:
            with _quiet_stderr():
                proto, _ = tf2onnx.convert.from_function(serve, input_signature=[spec], opset=ONNX_OPSET)
        finally:
            tf2onnx_log.setLevel(level)
            tf2onnx_log.removeHandler(handler)
            tf2onnx_log.propagate = propagate
        if handler.ops:
            raise ValueError(f"tf2onnx cannot convert the op(s) {', '.join(handler.ops)}")
        return proto.SerializeToString()

    def _load(self, engine: str, path: Path):
        """A function float32 (n, S, S, 3) -> (n, D) running the file with its own runtime."""
        if engine == "litert":
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_path=str(path), num_threads=cpu_threads())
            interpreter.allocate_tensors()
            input_index = interpreter.get_input_details()[0]["index"]
            output_index = interpreter.get_output_details()[0]["index"]
            state = {"batch": None}

            def litert(batch: np.ndarray) -> np.ndarray:
                if state["batch"] != len(batch):
                    interpreter.resize_tensor_input(input_index, list(batch.shape), strict=False)
                    interpreter.allocate_tensors()
                    state["batch"] = len(batch)
                interpreter.set_tensor(input_index, batch)
                interpreter.invoke()
                return interpreter.get_tensor(output_index).copy()

            return litert
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = cpu_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {input_name: batch})[0]

    def _verify(self) -> None:
        """The converted engine against Keras on a few generated images; raises when they differ."""
        images = _check_images(self.input_shape)
        reference = self._keras(images)
        got = np.asarray(self._runner(images), dtype=np.float32)
        if got.shape != reference.shape:
            raise ValueError(f"the converted model returns shape {got.shape}, Keras {reference.shape}")
        scale = max(1.0, float(np.abs(reference).max()))
        difference = float(np.abs(got - reference).max()) if np.isfinite(got).all() else float("inf")
        self.check_difference = difference
        if not difference <= TOLERANCE * scale:
            raise ValueError(
                f"its features differ from Keras by {difference:.3g} (tolerance {TOLERANCE * scale:.3g})"
            )

    # -- running ------------------------------------------------------------------------------------------

    def _keras(self, batch: np.ndarray) -> np.ndarray:
        if self._keras_function is None:
            import tensorflow as tf

            model = self.model
            spec = tf.TensorSpec((None, *self.input_shape), tf.float32)
            self._keras_function = tf.function(
                lambda x: model(x, training=False), input_signature=[spec], jit_compile=False
            )
        return np.asarray(self._keras_function(batch), dtype=np.float32)

    def run(self, images: np.ndarray, batch_size: int = 64, progress: Progress | None = None) -> np.ndarray:
        """Features of every image, `batch_size` at a time; progress(n) after each batch of n images."""
        if tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"images of shape {images.shape[1:]}; this engine takes {self.input_shape}")
        step = self._runner if self._runner is not None else self._keras
        batch_size = max(1, int(batch_size))
        parts = []
        for start in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
            parts.append(np.asarray(step(batch), dtype=np.float32).reshape(len(batch), -1))
            if progress is not None:
                progress(len(batch))
        if not parts:
            return np.zeros((0, int(self.model.output.shape[-1])), np.float32)
        return np.concatenate(parts)
