"""What a run writes for TensorBoard, read back from its event files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cosine_rates, logged_learning_rates
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

from image_classifier.tensorboard_logging import hparams_of


def read_events(folder: Path) -> dict[str, dict[int, object]]:
    """tag -> {step: summary value} from the event files directly in `folder`."""
    found: dict[str, dict[int, object]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                found.setdefault(value.tag, {})[event.step] = value
    return found


def scalar(value) -> float:
    return float(tensor_util.make_ndarray(value.tensor))


def test_keras_logs_loss_accuracy_and_learning_rate_per_epoch_for_both_phases(trained_runs):
    """Keras's own TensorBoard callback covers the per-epoch scalars, learning rate included."""
    config = json.loads((trained_runs.transfer / "config.json").read_text())["options"]
    history = json.loads((trained_runs.transfer / "history.json").read_text())
    train = read_events(trained_runs.transfer / "logs" / "train")
    validation = read_events(trained_runs.transfer / "logs" / "validation")

    for tag, key in (("epoch_loss", "loss"), ("epoch_accuracy", "accuracy")):
        assert sorted(train[tag]) == sorted(validation[tag]) == [0, 1, 2]
        logged = [scalar(train[tag][step]) for step in range(3)]
        np.testing.assert_allclose(logged, history[key], rtol=1e-5)
        logged = [scalar(validation[tag][step]) for step in range(3)]
        np.testing.assert_allclose(logged, history[f"val_{key}"], rtol=1e-5)
    # backbones keep a constant rate by default (a tenth of it for fine-tuning); cnn follows a cosine
    assert config["lr_schedule"] == "constant"
    expected = [config["learning_rate"]] * 2 + [config["fine_tune_learning_rate"]]
    np.testing.assert_allclose(logged_learning_rates(trained_runs.transfer), expected, rtol=1e-6)
    np.testing.assert_allclose(
        logged_learning_rates(trained_runs.cnn), cosine_rates(0.001, 3), rtol=1e-6, atol=1e-9
    )


def test_options_are_logged_as_hyperparameters(trained_runs):
    options = json.loads((trained_runs.cnn_faster / "config.json").read_text())["options"]
    events = read_events(trained_runs.cnn_faster / "logs")
    value = events[hparams_metadata.SESSION_START_INFO_TAG][0]
    assert value.metadata.plugin_data.plugin_name == hparams_metadata.PLUGIN_NAME

    info = hparams_metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)

    assert set(info.hparams) == set(options) - {"workers"}
    assert info.group_name == trained_runs.cnn_faster.name
    assert info.hparams["learning_rate"].number_value == pytest.approx(0.003)
    assert info.hparams["model"].string_value == "cnn"
    assert info.hparams["augment"].bool_value is False
    assert info.hparams["categories"].string_value == "red,blue,green"
    assert info.hparams["dense_units"].string_value == "512"


def test_test_scores_and_misclassified_images_are_logged_at_the_kept_epoch(trained_runs):
    metrics = json.loads((trained_runs.cnn / "metrics.json").read_text())
    best = metrics["training"]["best_epoch"]
    test = read_events(trained_runs.cnn / "logs" / "test")

    assert scalar(test["epoch_accuracy"][best]) == pytest.approx(metrics["test_accuracy"])
    assert scalar(test["epoch_loss"][best]) == pytest.approx(metrics["test_loss"], rel=1e-5)
    for tag in ("misclassified_test_images", "confusion_matrix"):
        value = test[tag][best]
        assert value.metadata.plugin_data.plugin_name == "images"
        width, height, png = tensor_util.make_ndarray(value.tensor)
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size == (int(width), int(height))
        assert min(image.size) > 200


def test_hparams_values_are_types_tensorboard_accepts():
    assert hparams_of(
        {"dense_units": [512, 256], "split": [0.8, 0.1, 0.1], "weights": None, "augment": True, "workers": 2}
    ) == {"dense_units": "512,256", "split": "0.8,0.1,0.1", "weights": "none", "augment": True}
    assert hparams_of({"dense_units": []}) == {"dense_units": "none"}
