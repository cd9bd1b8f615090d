"""Backbone features (features.py): computed once on the fast engine, cached per split, reused by later runs."""

from __future__ import annotations

import json

import numpy as np
from conftest import make_image_folders, synthetic_photo
from PIL import Image
from training_runs import quiet

from image_classifier.config import Workspace
from image_classifier.features import BackboneFeatures, split_model
from image_classifier.models import build_model, get_spec, load_model
from image_classifier.pipeline import image_batches, images_only
from image_classifier.preprocess import PreprocessOptions, prepare_dataset
from image_classifier.runs import RunFolder
from image_classifier.training.config import TrainConfig
from image_classifier.training.loop import train

SIZE = 96
CATEGORIES = ("red", "blue", "green")


def test_head_on_engine_features_is_the_whole_model_and_a_second_run_reuses_them(tmp_path, keras_home):
    images = make_image_folders(tmp_path / "images", dict.fromkeys(CATEGORIES, 10))
    workspace = Workspace(tmp_path / "ws")
    layers = (
        "block_13_expand_relu",
        "final",
    )  # two depths, standardized in the head; two views of each photo
    common = {"categories": CATEGORIES, "images_dir": images, "image_size": SIZE, "epochs": 2, "workers": 1}
    common |= {"feature_layers": layers, "feature_views": 2}
    first = RunFolder(train(TrainConfig(**common), workspace, print_fn=quiet))
    used, counts = first.metrics["features"], first.config["data"]["counts"]
    assert (
        used["computed"]
        == 2 * counts["train"]["total"] + counts["validation"]["total"] + counts["test"]["total"]
    )
    # each photo's features computed once; the "none of these" check and calibration read them back from the cache

    model = load_model(first.model_path)
    dataset = first.dataset()
    x_test = dataset.arrays("test")[0]
    whole = model.predict(images_only(image_batches(x_test, np.zeros(len(x_test), np.int32), 8)), verbose=0)
    features_model, head = split_model(model)
    assert features_model.output.shape[-1] == 576 + 1280
    standardize = head.get_layer("standardize").get_weights()
    assert standardize[0].any() and not np.allclose(standardize[1], 1), "measured on the training features"
    features = BackboneFeatures(
        features_model, "mobilenet_v2", SIZE, workspace, print_fn=quiet, layers=layers
    )
    on_engine = head.predict(features.of_split(dataset, "test"), verbose=0)
    np.testing.assert_allclose(on_engine, whole, atol=1e-4, rtol=0)
    assert features.computed == 0 and features.reused == len(x_test), "the test features come from the cache"

    second = RunFolder(train(TrainConfig(**common, dropout=0.4), workspace, print_fn=quiet))
    assert second.metrics["features"]["computed"] == 0
    assert second.metrics["features"]["reused"] == used["computed"] + used["reused"]


def test_a_changed_photo_recomputes_its_row_and_a_damaged_cache_is_recomputed(tmp_path, keras_home):
    images = make_image_folders(tmp_path / "images", dict.fromkeys(CATEGORIES[:2], 8))
    workspace = Workspace(tmp_path / "ws")
    options = PreprocessOptions(categories=CATEGORIES[:2], images_dir=images, image_size=SIZE, workers=1)
    built = build_model(get_spec("mobilenet_v2"), 2, SIZE, weights="imagenet")

    def features(messages=None) -> BackboneFeatures:
        say = messages.append if messages is not None else quiet
        return BackboneFeatures(built.features, "mobilenet_v2", SIZE, workspace, print_fn=say)

    dataset = prepare_dataset(options, workspace, print_fn=quiet)
    features().of_split(dataset, "train")
    before = {row.tobytes() for row in np.array(dataset.arrays("train")[0])}

    Image.fromarray(synthetic_photo(0, 500)).save(
        images / dataset.source_files("train")[0]
    )  # one photo replaced
    dataset = prepare_dataset(options, workspace, print_fn=quiet)
    new_rows = sum(row.tobytes() not in before for row in dataset.arrays("train")[0])
    assert new_rows >= 1, "the replaced photo (or the one the split moved in for it) is new to train"
    again = features()
    changed = np.array(again.of_split(dataset, "train"))
    assert again.computed == new_rows and again.reused == len(changed) - new_rows
    fresh = built.features.predict(dataset.arrays("train")[0], verbose=0)
    np.testing.assert_allclose(changed, fresh, atol=1e-4, rtol=1e-4)  # engines differ by ~1e-5 relative

    (cache,) = (workspace.features / dataset.path.name).glob("*/train.npy")
    data = bytearray(cache.read_bytes())
    data[-1] ^= 0xFF
    cache.write_bytes(bytes(data))
    messages: list[str] = []
    repaired = features(messages)
    np.testing.assert_allclose(repaired.of_split(dataset, "train"), fresh, atol=1e-4, rtol=1e-4)
    assert repaired.computed == len(fresh)
    assert messages == [f"Features: the cache {cache} is damaged; computing it again"]
    record = json.loads(cache.with_suffix(".json").read_text())
    assert record["sha256"] and record["engine"] == repaired.engine_name


def test_feature_options_that_cannot_apply_are_one_clear_error(tmp_path):
    import pytest

    from image_classifier.errors import UserError

    common = {"categories": CATEGORIES, "images_dir": tmp_path}
    with pytest.raises(
        UserError, match="--feature-views trains the head on cached features .* cnn does not use"
    ):
        TrainConfig(**common, model="cnn", feature_views=2).resolve()
    with pytest.raises(UserError, match="--feature-views .* --augment does not use"):
        TrainConfig(**common, augment=True, feature_views=2).resolve()
    with pytest.raises(
        UserError, match="--feature-layers pools layers of a pretrained backbone; mlp has none"
    ):
        TrainConfig(**common, model="mlp", feature_layers=("final",) * 2).resolve()
    with pytest.raises(UserError, match="has no layer block_99; --feature-layers takes layer names such as"):
        build_model(get_spec("mobilenet_v2"), 2, SIZE, weights="none", feature_layers=("block_99", "final"))
