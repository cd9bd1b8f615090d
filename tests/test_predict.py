"""Prediction with trained runs: same numbers as the training's own test evaluation, bad inputs reported one by
one, URLs from a local server, real photos with a MobileNetV2 run."""

from __future__ import annotations

import csv
import functools
import http.server
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import ANIMALS, run_script, synthetic_photo
from PIL import Image
from training_runs import TrainedRun

from image_classifier.config import Workspace
from image_classifier.errors import UserError
from image_classifier.images import load_array
from image_classifier.models import load_model
from image_classifier.predict import PredictOptions, run_predict
from image_classifier.runs import RunFolder


def evaluation_rows(run: Path) -> list[dict]:
    """test_predictions.csv: what training itself predicted for each held-out test image."""
    with open(run / "test_predictions.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def predict(trained: TrainedRun, inputs, **options) -> tuple[list, str, str]:
    out, err = io.StringIO(), io.StringIO()
    predictions = run_predict(
        PredictOptions(inputs=tuple(map(str, inputs)), run=str(trained.run), **options),
        trained.workspace,
        out,
        err,
    )
    return predictions, out.getvalue(), err.getvalue()


def model_probabilities(trained: TrainedRun, paths) -> np.ndarray:
    """What the Keras model says about files decoded the way training decoded them, computed here directly."""
    run = RunFolder.find(trained.workspace, trained.run)
    arrays = np.stack([load_array(Path(path), run.image_size, run.resize) for path in paths])
    return load_model(run.model_path).predict(arrays.astype(np.float32), verbose=0)


def test_predictions_are_the_training_evaluation_numbers(cnn_run):
    rows = evaluation_rows(cnn_run.run)
    predictions, _, _ = predict(cnn_run, [cnn_run.images / row["path"] for row in rows], output="json")
    assert len(predictions) == len(rows) == 6
    for prediction, row in zip(predictions, rows, strict=True):
        label, probability = prediction.top[0]
        assert label == row["predicted"]
        assert probability == pytest.approx(float(row["confidence"]), abs=1e-4)


def make_messy_folder(root: Path) -> tuple[list[Path], dict[str, str]]:
    """Good images of several formats and sizes, in a subfolder too, beside files that are not images."""
    root.mkdir()
    (root / "sub").mkdir()
    good = [root / "a_wide.jpg", root / "b_alpha.png", root / "c_gray.jpg", root / "sub" / "d_big.webp"]
    Image.fromarray(synthetic_photo(0, 1, size=(150, 60))).save(good[0])
    Image.fromarray(synthetic_photo(1, 2)).convert("RGBA").save(good[1])
    Image.fromarray(synthetic_photo(2, 3)).convert("L").save(good[2])
    Image.fromarray(synthetic_photo(0, 4, size=(900, 700))).save(good[3], "WEBP")
    (root / "a_notes.txt").write_text("shopping list\n")
    (root / "b_empty.jpg").write_bytes(b"")
    (root / "c_page.jpg").write_text("<!doctype html><html><body>404</body></html>")
    (root / "sub" / "e_cut.jpg").write_bytes(good[0].read_bytes()[:300])
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    bad = {
        "a_notes.txt": "not an image: unrecognised file format",
        "b_empty.jpg": "empty file (0 bytes)",
        "c_page.jpg": "not an image: an HTML page",
        "e_cut.jpg": "",
    }
    return good, bad


def test_a_folder_with_bad_files_reports_each_and_predicts_the_rest(cnn_run, tmp_path):
    good, bad = make_messy_folder(tmp_path / "photos")
    result = run_script(
        "predict.py",
        "photos",
        "--run",
        str(cnn_run.run),
        "--json",
        "--batch-size",
        "2",
        "--workspace",
        "ws",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    by_name = {Path(item["input"]).name: item for item in document["predictions"]}
    assert set(by_name) == {path.name for path in good} | set(bad)
    for name, reason in bad.items():
        assert reason in by_name[name]["error"]
    expected = model_probabilities(cnn_run, good)
    labels = document["labels"]
    for path, probabilities in zip(good, expected, strict=True):
        item = by_name[path.name]
        assert [entry["label"] for entry in item["top"]] == [labels[i] for i in np.argsort(-probabilities)]
        for entry in item["top"]:
            assert entry["probability"] == pytest.approx(
                probabilities[labels.index(entry["label"])], abs=2e-6
            )
    assert "Predicted 4 images" in result.stderr and "skipped 4 inputs" in result.stderr


def test_table_csv_and_threshold(cnn_run, tmp_path):
    good, _ = make_messy_folder(tmp_path / "photos")
    inputs = [*good, tmp_path / "photos" / "a_notes.txt"]
    first, _, _ = predict(cnn_run, inputs)
    tops = sorted(prediction.top[0][1] for prediction in first if prediction.ok)
    threshold = (tops[1] + tops[2]) / 2
    predictions, table, summary = predict(cnn_run, inputs, top_k=2, threshold=threshold)
    lines = table.splitlines()
    assert lines[0].split() == ["image", "top", "1", "top", "2", "note"]
    uncertain = {p.source for p in predictions if p.ok and p.top[0][1] < threshold}
    assert len(uncertain) == 2
    for prediction, line in zip(predictions, lines[1:], strict=True):
        assert line.startswith(prediction.source)
        if prediction.ok:
            label, probability = prediction.top[0]
            assert f"{label} {probability * 100:.1f}%" in line
            assert line.endswith("uncertain") == (prediction.source in uncertain)
        else:
            assert "skipped: not an image" in line
    assert "2 uncertain" in summary and "skipped 1 input " in summary

    _, text, _ = predict(cnn_run, inputs, output="csv", threshold=threshold)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == [
        "input",
        "label_1",
        "probability_1",
        "label_2",
        "probability_2",
        "label_3",
        "probability_3",
        "uncertain",
        "known",
        "known_score",
        "error",
    ]
    assert [row["uncertain"] for row in rows] == [
        "1" if p.source in uncertain else "0" for p in first[:4]
    ] + [""]
    assert rows[-1]["error"].startswith("not an image") and rows[-1]["label_1"] == ""
    probabilities = [float(rows[0][f"probability_{rank}"]) for rank in (1, 2, 3)]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(
        1, abs=1e-5
    )


@pytest.fixture
def local_server(tmp_path):
    """An http.server on 127.0.0.1 serving tmp_path/site; yields its base URL."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield site, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_urls_are_downloaded_checked_and_predicted(cnn_run, local_server):
    site, base = local_server
    Image.fromarray(synthetic_photo(1, 7, size=(120, 90))).save(site / "photo.png")
    (site / "page.html").write_text("<html><body>not a photo</body></html>")
    urls = [f"{base}/photo.png", f"{base}/page.html", f"{base}/missing.jpg"]
    predictions, _, _ = predict(cnn_run, urls, output="json")
    assert [p.source for p in predictions] == urls
    photo, page, missing = predictions
    expected = model_probabilities(cnn_run, [site / "photo.png"])[0]
    labels = RunFolder.find(cnn_run.workspace, cnn_run.run).labels
    assert photo.top[0][0] == labels[int(expected.argmax())]
    assert photo.top[0][1] == pytest.approx(float(expected.max()), abs=1e-6)
    assert page.error == "download failed: not an image (an HTML page)"
    assert missing.error == "download failed: HTTP 404"


def test_only_bad_inputs_are_listed_then_exit_2(cnn_run, tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "empty.png").write_bytes(b"")
    result = run_script("predict.py", "junk", "--run", str(cnn_run.run), cwd=tmp_path)
    assert result.returncode == 2
    assert "junk/empty.png  skipped: empty file (0 bytes)" in result.stdout
    assert "junk/notes.txt  skipped: not an image" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        "error: none of the 2 inputs could be used as an image (reasons above)"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["photo.jpg"], "error: no training run in "),
        (["nowhere.jpg", "--run", "RUN"], "error: no such file or folder: nowhere.jpg"),
        (["photo.jpg", "--run", "no-such-run"], "error: no run folder no-such-run"),
        (["photo.jpg", "--top-k", "0"], "argument --top-k: expected a whole number above 0, got 0"),
        (["photo.jpg", "--threshold", "1.5"], "argument --threshold: expected a number from 0 up to"),
        (["photo.jpg", "--json", "--csv"], "not allowed with argument"),
    ],
)
def test_bad_command_lines_end_in_one_line_and_exit_2(cnn_run, tmp_path, arguments, message):
    Image.fromarray(synthetic_photo(0, 0)).save(tmp_path / "photo.jpg")
    arguments = [str(cnn_run.run) if argument == "RUN" else argument for argument in arguments]
    result = run_script("predict.py", *arguments, "--workspace", "empty-workspace", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


def test_missing_run_message_names_the_training_script(tmp_path):
    with pytest.raises(
        UserError, match="no training run in .* yet; train one with scripts/machine_learning.py"
    ):
        run_predict(PredictOptions(inputs=("x.jpg",)), Workspace(tmp_path / "workspace"))


def upright_and_rotated(photo: Path, folder: Path) -> tuple[Path, Path]:
    """The same picture twice, losslessly: upright, and stored sideways with an EXIF tag saying so."""
    image = Image.open(photo).convert("RGB")
    upright, rotated = folder / "upright.png", folder / "sideways.png"
    image.save(upright)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.transpose(Image.Transpose.ROTATE_90).save(rotated, exif=exif)
    return upright, rotated


def test_real_photos_with_a_mobilenet_run(animals_run, tmp_path):
    rows = evaluation_rows(animals_run.run)
    photos = [ANIMALS / row["path"] for row in rows]
    upright, rotated = upright_and_rotated(photos[0], tmp_path)
    predictions, table, _ = predict(animals_run, [*photos, upright, rotated], top_k=2)
    held_out = predictions[: len(rows)]
    for prediction, row in zip(held_out, rows, strict=True):
        assert prediction.top[0][0] == row["predicted"]
        assert prediction.top[0][1] == pytest.approx(float(row["confidence"]), abs=1e-4)
        assert len(prediction.top) == 2 and prediction.top[0][1] >= prediction.top[1][1]
    correct = sum(prediction.top[0][0] == row["true"] for prediction, row in zip(held_out, rows, strict=True))
    assert correct >= len(rows) * 2 / 3, f"{correct} of {len(rows)} held-out photos right"
    upright_top, sideways_top = predictions[-2].top, predictions[-1].top
    assert [label for label, _ in sideways_top] == [label for label, _ in upright_top]
    assert [p for _, p in sideways_top] == pytest.approx([p for _, p in upright_top], abs=1e-6)
    assert all(label in ("cat", "dog", "horse") for label, _ in predictions[0].top)
    assert "top 2" in table.splitlines()[0]
