"""Exports: each format loads in its own runtime and predicts like the Keras model; a failed check keeps the
previous export; bad command lines end in one line."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script, synthetic_photo, tree_digest
from PIL import Image

from image_classifier import export
from image_classifier.errors import UserError
from image_classifier.export import ExportOptions, compare, export_run
from image_classifier.images import load_array
from image_classifier.models import load_model
from image_classifier.runs import RunFolder

VARIANTS = [
    ("savedmodel", "none", "savedmodel"),
    ("tflite", "none", "model.tflite"),
    ("tflite", "float16", "model_float16.tflite"),
    ("tflite", "int8", "model_int8.tflite"),
    ("onnx", "none", "model.onnx"),
]


def fresh_images(image_size: int, resize: str) -> np.ndarray:
    """Photos the model never saw, decoded for the fixed-size formats the way predict.py decodes them."""
    arrays = []
    for index in range(5):
        buffer = io.BytesIO()
        Image.fromarray(synthetic_photo(index % 3, 500 + index)).save(buffer, "PNG")
        arrays.append(load_array(buffer.getvalue(), image_size, resize))
    return np.stack(arrays)


def run_in_own_runtime(path: Path, format: str, images: np.ndarray) -> np.ndarray:
    """The exported file loaded the way a deployment would load it, without any of the project's code."""
    if format == "savedmodel":
        import tensorflow as tf

        serving = tf.saved_model.load(str(path)).signatures["serving_default"]
        return serving(image=tf.constant(images))["probabilities"].numpy()
    if format == "tflite":
        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interpreter = tf.lite.Interpreter(model_path=str(path))
        given = interpreter.get_input_details()[0]
        assert given["dtype"] == np.uint8 and list(given["shape_signature"][1:]) == list(images.shape[1:])
        interpreter.resize_tensor_input(given["index"], images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(given["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    return session.run(["probabilities"], {"image": images})[0]


@pytest.mark.parametrize(("format", "quantize", "artifact"), VARIANTS, ids=[v[2] for v in VARIANTS])
def test_each_format_round_trips_and_passes_its_check(cnn_run, format, quantize, artifact):
    lines: list[str] = []
    result = export_run(
        ExportOptions(format, run=str(cnn_run.run), quantize=quantize), cnn_run.workspace, lines.append
    )
    folder = cnn_run.run / "export"
    assert result.path == folder / artifact and result.path.exists()
    assert result.check.passed and result.check.images == 6 and result.check.split == "test"
    assert any(line.startswith("Check on 6 test images") and line.endswith(": passed") for line in lines)
    assert any(line.startswith(f"Saved {result.path} (") and " MB; model.keras is " in line for line in lines)
    assert not [path for path in folder.iterdir() if path.name.startswith(".partial-")]
    entry = json.loads((folder / "export.json").read_text())[artifact]
    assert entry["input"]["dtype"] == "uint8" and entry["output"]["labels"] == json.loads(
        (cnn_run.run / "labels.json").read_text()
    )
    assert entry["bytes"] == result.size and entry["check"]["passed"]

    run = RunFolder.find(cnn_run.workspace, cnn_run.run)
    model = load_model(run.model_path)
    images = fresh_images(run.image_size, run.resize)
    expected = model.predict(images.astype(np.float32), verbose=0)
    got = run_in_own_runtime(result.path, format, images)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert np.abs(got - expected).max() <= export.TOLERANCES[quantize]
    if format == "savedmodel":
        assert entry["input"]["shape"] == [None, None, None, 3]
        import tensorflow as tf

        from image_classifier.predict import Predictor

        serving = tf.saved_model.load(str(result.path)).signatures["serving_default"]
        known = serving(image=tf.constant(images))["known_score"].numpy()
        np.testing.assert_allclose(known, Predictor(run).outputs(images)[1], atol=1e-5)
        assert entry["known_score"]["threshold"] == pytest.approx(run.metrics["open_set"]["threshold"])
        assert result.check.known_score_difference <= export.TOLERANCES["none"]
        photo = synthetic_photo(2, 600, size=(130, 70))[None]
        np.testing.assert_allclose(
            run_in_own_runtime(result.path, format, photo),
            model.predict(photo.astype(np.float32), verbose=0),
            atol=1e-5,
        )
    else:
        assert entry["input"]["shape"] == [None, run.image_size, run.image_size, 3]


def test_a_failed_check_keeps_the_previous_export(cnn_run, monkeypatch):
    options = ExportOptions("onnx", run=str(cnn_run.run))
    export_run(options, cnn_run.workspace, lambda *_: None)
    folder = cnn_run.run / "export"
    before = tree_digest(folder)
    monkeypatch.setitem(export.TOLERANCES, "none", -1.0)
    with pytest.raises(
        UserError, match=r"the onnx export does not predict like the Keras model .*nothing was saved"
    ):
        export_run(options, cnn_run.workspace, lambda *_: None)
    assert tree_digest(folder) == before
    monkeypatch.undo()
    export_run(options, cnn_run.workspace, lambda *_: None)
    after = tree_digest(folder)
    assert after["model.onnx"][1] > before["model.onnx"][1]
    assert {name for name in after if not name.startswith(".")} == {
        name for name in before if not name.startswith(".")
    }


def test_a_savedmodel_export_is_replaced_whole(cnn_run):
    options = ExportOptions("savedmodel", run=str(cnn_run.run))
    first = export_run(options, cnn_run.workspace, lambda *_: None)
    (first.path / "stale.txt").write_text("left by the earlier export")
    second = export_run(options, cnn_run.workspace, lambda *_: None)
    assert second.path == first.path and not (second.path / "stale.txt").exists()
    assert second.check.passed


def test_compare_accepts_near_ties_only_for_quantized_exports():
    reference = np.array([[0.50, 0.45, 0.05], [0.90, 0.05, 0.05]])
    near_tie_flipped = np.array([[0.46, 0.49, 0.05], [0.88, 0.07, 0.05]])
    assert compare(reference, reference, 1e-4, allow_near_ties=False).passed
    quantized = compare(reference, near_tie_flipped, 0.1, allow_near_ties=True)
    assert quantized.passed and quantized.near_tie_flips == 1 and quantized.top1_same == 1
    assert not compare(reference, near_tie_flipped, 0.1, allow_near_ties=False).passed
    clear_flip = np.array([[0.50, 0.45, 0.05], [0.40, 0.55, 0.05]])
    assert not compare(reference, clear_flip, 0.1, allow_near_ties=True).passed
    assert not compare(reference, reference + 0.02, 0.01, allow_near_ties=True).passed
    assert not compare(reference, np.full_like(reference, np.nan), 0.1, allow_near_ties=True).passed


def test_the_script_prints_the_check_the_size_and_the_input_contract(cnn_run, tmp_path):
    result = run_script(
        "export.py", "--run", str(cnn_run.run), "--format", "tflite", "--quantize", "float16", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "Check on 6 test images: top-1 the same on 6/6" in result.stdout
    assert f"Saved {cnn_run.run / 'export' / 'model_float16.tflite'} (" in result.stdout
    assert "Contract: input 'image' uint8 [N, 32, 32, 3] RGB 0..255" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--format", "tflite"], "error: no training run in "),
        (["--format", "pytorch"], "argument --format: invalid choice: 'pytorch'"),
        (
            ["--run", "RUN", "--format", "onnx", "--quantize", "int8"],
            "error: --quantize applies to --format tflite",
        ),
        (["--run", "no-such-run", "--format", "onnx"], "error: no run folder no-such-run"),
        (["--run", "RUN"], "the following arguments are required: --format"),
    ],
)
def test_bad_command_lines_end_in_one_line_and_exit_2(cnn_run, tmp_path, arguments, message):
    arguments = [str(cnn_run.run) if argument == "RUN" else argument for argument in arguments]
    result = run_script("export.py", *arguments, "--workspace", "empty-workspace", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_quantized_and_onnx_exports_of_a_mobilenet_run_pass_their_checks(animals_run):
    """A real network: depthwise convolutions, ReLU6 and folded BatchNorm through tf2onnx, and quantization
    error at its real size (the float32 SavedModel and TFLite paths are the same code as for the cnn)."""
    sizes = {}
    for format, quantize, artifact in VARIANTS[2:]:
        result = export_run(
            ExportOptions(format, run=str(animals_run.run), quantize=quantize), animals_run.workspace, print
        )
        assert result.check.passed, result.check.describe()
        sizes[artifact] = result.size
    keras_size = (animals_run.run / "model.keras").stat().st_size
    assert sizes["model_int8.tflite"] < sizes["model_float16.tflite"] < sizes["model.onnx"] < keras_size
