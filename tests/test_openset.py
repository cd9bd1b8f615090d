"""The "none of these" check and calibrated confidence: fitted by training, stored in the run, used by
predict.py in every output format; runs made before the check still predict and say once they cannot judge."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ANIMALS
from PIL import Image

from image_classifier.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability,
    scaled,
)
from image_classifier.config import Workspace
from image_classifier.models import load_model
from image_classifier.openset import METHODS, OpenSet
from image_classifier.predict import PredictOptions, run_predict
from image_classifier.runs import RunFolder

TRASHNET = ANIMALS.parent / "trashnet"


def clusters(rng, centres: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative embeddings (like ReLU features) around each centre, and their labels."""
    labels = np.repeat(np.arange(len(centres)), count)
    return np.abs(centres[labels] + rng.normal(0, 0.3, (len(labels), centres.shape[1]))), labels


@pytest.mark.parametrize("method", METHODS)
def test_each_method_keeps_the_known_rate_and_rejects_what_is_far(method, tmp_path):
    rng = np.random.default_rng(0)
    centres = np.zeros((3, 16))
    centres[np.arange(3), np.arange(3)] = 3.0
    train, labels = clusters(rng, centres, 60)
    validation, validation_labels = clusters(rng, centres, 40)
    far = np.abs(rng.normal(0, 0.3, (50, 16)))
    far[:, 8:] += 3.0

    def probabilities(rows):  # a softmax that is confident on the clusters only
        logits = rows[:, :3] * 3
        return scaled(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 1.0)

    check = OpenSet.fit(method, train, labels, 3)
    check = check.with_threshold(check.scores(validation, probabilities(validation)), 0.9)
    kept = check.known(check.scores(validation, probabilities(validation))).mean()
    assert kept == pytest.approx(0.9, abs=1 / len(validation))
    assert check.known(check.scores(far, probabilities(far))).mean() < 0.2

    run = RunFolder(tmp_path)
    check.save(run)
    loaded = OpenSet.load(run)
    assert (loaded.method, loaded.threshold, loaded.known_rate) == (method, check.threshold, 0.9)
    np.testing.assert_allclose(
        loaded.scores(far, probabilities(far)), check.scores(far, probabilities(far)), rtol=1e-6
    )


def test_temperature_scaling_undoes_overconfidence():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (4000, 5))
    truth = np.array([rng.choice(5, p=row) for row in scaled(np.exp(logits), 2.5)])
    overconfident = scaled(np.exp(logits), 1.0)
    temperature = fit_temperature(overconfident, truth)
    assert temperature == pytest.approx(2.5, rel=0.1)
    before = expected_calibration_error(overconfident, truth)
    after = expected_calibration_error(scaled(overconfident, temperature), truth)
    assert before > 0.1 and after < 0.03
    assert (scaled(overconfident, temperature).argmax(1) == overconfident.argmax(1)).all()


def test_a_run_stores_its_check_and_returns_calibrated_probabilities(cnn_run):
    run = RunFolder.find(cnn_run.workspace, cnn_run.run)
    calibration, open_set = run.metrics["calibration"], run.metrics["open_set"]
    assert (run.path / "reliability.png").stat().st_size > 10_000
    assert open_set["known_rate"] == 0.95 and OpenSet.load(run).threshold == pytest.approx(
        open_set["threshold"]
    )
    with open(run.path / "test_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    confidence = np.array([float(row["confidence"]) for row in rows])
    correct = np.array([row["correct"] == "1" for row in rows])
    bins = reliability(np.c_[confidence, 1 - confidence], np.where(correct, 0, 1))
    assert calibration["test_ece_after"] == pytest.approx(bins.ece, abs=1e-3)

    model = load_model(run.model_path)
    head = model.get_layer("head")
    assert head.get_layer("temperature").temperature == pytest.approx(calibration["temperature"], rel=1e-3)
    images = run.dataset().arrays("test")[0].astype(np.float32)
    from image_classifier.tf_env import import_keras

    keras = import_keras()
    uncalibrated = keras.Model(head.input, head.get_layer("predictions").output)
    flatten = keras.Model(model.input, model.get_layer("flatten").output)
    raw = uncalibrated.predict(flatten.predict(images, verbose=0), verbose=0)
    np.testing.assert_allclose(
        model.predict(images, verbose=0), scaled(raw, calibration["temperature"]), atol=2e-5
    )


def known_and_unknown_photos() -> tuple[list[Path], list[Path]]:
    """Three of the run's own categories' photos (known) and twelve waste photos from trashnet (unknown)."""
    known = [ANIMALS / "cat" / sorted(p.name for p in (ANIMALS / "cat").iterdir())[0]]
    known += [sorted((ANIMALS / name).iterdir())[1] for name in ("dog", "horse")]
    unknown = [
        path
        for name in ("cardboard", "glass", "metal", "paper")
        for path in sorted((TRASHNET / name).iterdir())[:3]
    ]
    return known, unknown


def test_unknown_photos_are_marked_in_every_output_format(animals_run, tmp_path):
    known, unknown = known_and_unknown_photos()
    inputs = tuple(map(str, known + unknown))
    check = OpenSet.load(RunFolder.find(animals_run.workspace, animals_run.run))
    texts = {}
    for output in ("table", "json", "csv"):
        out, err = io.StringIO(), io.StringIO()
        predictions = run_predict(
            PredictOptions(inputs=inputs, run=str(animals_run.run), output=output),
            animals_run.workspace,
            out,
            err,
        )
        texts[output] = out.getvalue()
    marked = [p.known for p in predictions]
    # At this test's 96 px the check is weak (docs/trust.md has the numbers at 224): some of the waste passes.
    assert sum(marked[: len(known)]) >= 2 and marked[len(known) :].count(False) >= 3, marked
    for prediction in predictions:
        assert prediction.known == (prediction.known_score >= check.threshold)
    unknown_count = marked.count(False)
    assert f'{unknown_count} unknown ("none of these")' in err.getvalue()

    lines = texts["table"].splitlines()[1:]
    for prediction, line in zip(predictions, lines, strict=True):
        closest = f"unknown (closest: {prediction.top[0][0]} "
        assert (closest in line) == (prediction.known is False)
        assert ("none of these (known score" in line) == (prediction.known is False)
    document = json.loads(texts["json"])
    assert document["known_check"]["threshold"] == pytest.approx(check.threshold, abs=1e-5)
    for prediction, item in zip(predictions, document["predictions"], strict=True):
        assert item["known"] is prediction.known and item["label"] == prediction.top[0][0]
        assert item["known_score"] == pytest.approx(prediction.known_score, abs=1e-6)
    rows = list(csv.DictReader(io.StringIO(texts["csv"])))
    assert [row["known"] for row in rows] == [str(int(p.known)) for p in predictions]
    assert [float(row["known_score"]) for row in rows] == pytest.approx(
        [p.known_score for p in predictions], abs=1e-6
    )


def test_a_run_made_before_the_check_predicts_and_says_once_it_cannot_judge(cnn_run, tmp_path):
    workspace = Workspace(tmp_path / "workspace")
    old = workspace.runs / cnn_run.run.name
    shutil.copytree(cnn_run.run, old, ignore=shutil.ignore_patterns("export", "logs"))
    (old / "openset.npz").unlink()
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, colour in enumerate([(200, 40, 40), (40, 60, 200), (128, 128, 128)]):
        Image.new("RGB", (40, 30), colour).save(photos / f"photo_{index}.png")
    out, err = io.StringIO(), io.StringIO()
    run_predict(PredictOptions(inputs=(str(photos),), run=str(old), output="csv"), workspace, out, err)
    notes = [line for line in err.getvalue().splitlines() if "cannot judge" in line]
    assert notes == [
        f'note: run {old.name} cannot judge "none of these" (trained before the check existed): every photo '
        "gets its closest category; train again to have it"
    ]
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 3 and all(row["label_1"] and row["known"] == "" for row in rows)
    assert "unknown" not in err.getvalue().splitlines()[-1]
