"""image_classifier.engines: LiteRT and ONNX Runtime give Keras's features, convert once, recover and fall back.

Real conversions of MobileNetV2 at 96 px with the shared ImageNet weights (KERAS_HOME seeded by conftest).
Tolerance 1e-4 absolute: measured 2.6e-5 (LiteRT) and 1.6e-5 (ONNX Runtime) on features up to about 6.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
from conftest import synthetic_photo

SIZE = 96
TOLERANCE = 1e-4


def _installed(engine: str) -> bool:
    from image_classifier.engines import available

    return available(engine)


def _needs(name: str):
    return pytest.mark.skipif(not _installed(name), reason=f"{name} runtime not installed")


CONVERTED = [pytest.param(name, marks=_needs(name)) for name in ("litert", "onnx")]
DAMAGES = [  # each costs a conversion (5-10 s), so each engine gets one kind of damage
    pytest.param("litert", "truncated", marks=_needs("litert")),
    pytest.param("onnx", "flipped", marks=_needs("onnx")),
]


@pytest.fixture(scope="module")
def features():
    from image_classifier.models import build_model, get_spec

    return build_model(get_spec("mobilenet_v2"), 2, SIZE, weights="imagenet").features


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return np.stack([synthetic_photo(i % 4, i, (SIZE, SIZE)) for i in range(5)])


@pytest.fixture(scope="module")
def reference(features, photos) -> np.ndarray:
    return features.predict(photos, batch_size=5, verbose=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def key(features) -> str:
    from image_classifier.engines import cache_key, model_digest

    return cache_key("mobilenet_v2", SIZE, model_digest(features))


def engine(features, cache, key, name, lines=None):
    from image_classifier.engines import FeatureEngine

    lines = [] if lines is None else lines
    return FeatureEngine(features, cache, key, name, image_size=SIZE, print_fn=lines.append)


@pytest.mark.parametrize("name", CONVERTED)
def test_converted_engine_gives_keras_features_and_is_cached(features, photos, reference, cache, key, name):
    lines: list[str] = []
    first = engine(features, cache, key, name, lines)
    assert (first.name, first.fallback_reason, lines) == (name, None, [])
    assert first.converted and first.path.is_file()
    assert first.check_difference is not None and first.check_difference < TOLERANCE
    seen: list[int] = []
    got = first.run(photos, batch_size=2, progress=seen.append)  # batches 2, 2 and a last one of 1
    assert seen == [2, 2, 1]
    assert got.dtype == np.float32 and got.shape == reference.shape == (
        5,
        192 + 576 + 960 + 1280,
    )  # the default four depths
    assert np.abs(got - reference).max() < TOLERANCE

    stamp = first.path.stat().st_mtime_ns
    second = engine(features, cache, key, name)
    assert second.name == name and not second.converted
    assert first.path.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(second.run(photos, batch_size=5), first.run(photos, batch_size=5))


@pytest.mark.parametrize("name, damage", DAMAGES)
def test_damaged_cached_file_is_converted_again(
    features, photos, reference, cache, key, tmp_path, name, damage
):
    first = engine(features, cache, key, name)  # converted by the test above, or now
    own = tmp_path / "cache"
    own.mkdir()
    for path in cache.glob(f"{key}.*"):
        shutil.copy(path, own / path.name)
    cached = own / first.path.name
    data = cached.read_bytes()
    if damage == "truncated":
        cached.write_bytes(data[: len(data) // 2])
    else:  # same length, one weight byte different: only the recorded sha256 can tell
        middle = len(data) // 2
        cached.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])

    again = engine(features, own, key, name)
    assert again.name == name and again.converted
    record = json.loads((own / f"{cached.name}.json").read_text())
    assert record["sha256"] == hashlib.sha256(cached.read_bytes()).hexdigest()  # a whole new file
    assert cached.stat().st_size > len(data) * 0.9  # (ONNX files differ by a few bytes of names per trace)
    assert np.abs(again.run(photos, batch_size=5) - reference).max() < TOLERANCE
    assert not engine(features, own, key, name).converted


def test_unknown_engine_falls_back_to_keras_with_one_line(features, photos, reference, cache, key):
    lines: list[str] = []
    fallen = engine(features, cache, key, "tensorrt", lines)
    assert fallen.name == "keras" and fallen.path is None
    assert len(lines) == 1 and "tensorrt" in lines[0] and "using keras" in lines[0]
    assert fallen.fallback_reason in lines[0] and "\n" not in lines[0]
    np.testing.assert_allclose(fallen.run(photos, batch_size=2), reference, atol=1e-6, rtol=0)


def test_missing_runtime_falls_back_to_keras(features, photos, reference, cache, key, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # `import ai_edge_litert` now raises ImportError
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    lines: list[str] = []
    fallen = engine(features, cache, key, "litert", lines)
    assert fallen.name == "keras"
    assert lines == [f"Features: {fallen.fallback_reason}"] and "ai-edge-litert is not installed" in lines[0]
    np.testing.assert_allclose(fallen.run(photos), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", CONVERTED)
def test_unconvertible_model_falls_back_once_and_is_remembered(tmp_path, name, capfd):
    """TensorFlow's antialiased resize (ScaleAndTranslate) exists in neither engine."""
    from image_classifier.layers import SquareResize
    from image_classifier.tf_env import import_keras

    keras = import_keras()
    inputs = keras.Input((48, 48, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(SquareResize(32, name="shrink")(inputs))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    images = np.stack([synthetic_photo(i, i, (48, 48)) for i in range(3)])
    expected = model.predict(images, verbose=0)

    from image_classifier.engines import FeatureEngine

    capfd.readouterr()
    lines: list[str] = []
    fallen = FeatureEngine(model, tmp_path, "tiny", name, print_fn=lines.append)
    captured = capfd.readouterr()
    assert fallen.name == "keras" and len(lines) == 1 and "ScaleAndTranslate" in lines[0]
    assert (
        "ScaleAndTranslate" not in captured.out + captured.err
    )  # the converters' own diagnostics are silenced
    np.testing.assert_allclose(fallen.run(images), expected, atol=1e-6, rtol=0)
    assert not list(tmp_path.glob("tiny.tflite")) and not list(tmp_path.glob("tiny.onnx"))

    again: list[str] = []
    remembered = FeatureEngine(model, tmp_path, "tiny", name, print_fn=again.append)
    assert remembered.name == "keras" and not remembered.converted
    assert len(again) == 1 and "remembered" in again[0] and "ScaleAndTranslate" in again[0]


def test_default_engine_is_the_fastest_installed_on_a_cpu():
    import tensorflow as tf

    from image_classifier.engines import CPU_PREFERENCE, available, default_engine

    if tf.config.list_physical_devices("GPU"):
        assert default_engine() == "keras"
    else:
        assert default_engine() == next((e for e in CPU_PREFERENCE if available(e)), "keras")


def test_importing_engines_does_not_import_tensorflow():
    import subprocess

    code = "import sys, image_classifier.engines; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
