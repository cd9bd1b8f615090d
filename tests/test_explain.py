"""Grad-CAM: heatmaps for a backbone and for cnn, that follow the object; predict.py --explain DIR writes one
per photo; bad input ends in one line and exit 2."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import ANIMALS, run_script, synthetic_photo
from PIL import Image

from image_classifier.errors import UserError
from image_classifier.explain import gradcam, overlay
from image_classifier.models import build_model, get_spec
from image_classifier.predict import PredictOptions, run_predict
from image_classifier.runs import RunFolder


def test_heatmaps_of_a_cnn_are_unit_maps_of_the_photo(cnn_run):
    run = RunFolder.find(cnn_run.workspace, cnn_run.run)
    images = np.asarray(run.dataset().arrays("test")[0])
    heatmaps = gradcam(run, images)
    assert heatmaps.shape == images.shape[:3] and heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0 and np.allclose(heatmaps.reshape(len(images), -1).max(axis=1), 1)
    assert all(np.ptp(heatmap) > 0.1 for heatmap in heatmaps)
    shown = overlay(images[0], heatmaps[0])
    assert shown.dtype == np.uint8 and shown.shape == images[0].shape
    assert not np.array_equal(shown, images[0])


def unit(maps: np.ndarray) -> np.ndarray:
    return maps / np.maximum(maps.reshape(len(maps), -1).max(axis=1), 1e-12)[:, None, None]


def test_a_backbone_heatmap_is_the_class_activation_map_of_its_linear_head(animals_run):
    """With a linear head on averaged maps (Standardize and one Dense layer), Grad-CAM's channel weights are
    the head's weights over H x W, so each depth's heatmap is Zhou et al.'s CAM, relu(maps . W[:, class]):
    computed here without gradients, one per pooled depth, normalized and averaged as explain.py documents.
    (That the heat lands on the animal is measured at 224 px in docs/trust.md; at this test's 96 px the last
    map is 3 x 3.)"""
    import tensorflow as tf

    from image_classifier.models import load_model
    from image_classifier.tf_env import import_keras

    run = RunFolder.find(animals_run.workspace, animals_run.run)
    images = np.asarray(run.dataset().arrays("test")[0][:4])
    model = load_model(run.model_path)
    names = [layer.name for layer in model.layers]
    taps = sorted((name for name in names if name.startswith("pool_")), key=lambda n: int(n[5:])) or ["pool"]
    maps = import_keras().Model(model.input, [model.get_layer(name).input for name in taps])
    maps = maps.predict(images.astype(np.float32), verbose=0)
    maps = maps if isinstance(maps, list) else [maps]
    head = model.get_layer("head")
    kernel = np.asarray(head.get_layer("predictions").kernel)
    if "standardize" in [layer.name for layer in head.layers]:
        kernel = kernel * np.asarray(head.get_layer("standardize").inverse_std)[:, None]
    chosen = model.predict(images.astype(np.float32), verbose=0).argmax(axis=1)
    combined, start = np.zeros(images.shape[:3]), 0
    for depth in maps:
        weights = kernel[start : start + depth.shape[-1]][:, chosen]
        start += depth.shape[-1]
        cam = np.maximum(np.einsum("nhwk,kn->nhw", depth, weights), 0)[..., None]
        combined += unit(tf.image.resize(cam, images.shape[1:3], method="bilinear").numpy()[..., 0])
    assert start == kernel.shape[0]
    heatmaps = gradcam(model, images)
    assert heatmaps.shape == images.shape[:3]
    np.testing.assert_allclose(heatmaps, unit(combined / len(maps)), atol=1e-4)


def test_a_model_without_convolutions_cannot_be_explained():
    model = build_model(get_spec("mlp"), 3, 16).model
    with pytest.raises(UserError, match="no convolutional feature maps to explain"):
        gradcam(model, np.zeros((1, 16, 16, 3), np.uint8))


def test_predict_explain_writes_one_heatmap_per_photo(animals_run, tmp_path):
    photos = [sorted((ANIMALS / name).iterdir())[5] for name in ("cat", "dog")]
    (tmp_path / "notes.txt").write_text("not a photo")
    folder = tmp_path / "heatmaps"
    (folder).mkdir()
    (folder / f"{photos[0].stem}.gradcam.png").write_bytes(b"a file that was there before")
    out, err = io.StringIO(), io.StringIO()
    inputs = (*map(str, photos), str(tmp_path / "notes.txt"))
    run_predict(
        PredictOptions(inputs, run=str(animals_run.run), explain=str(folder)), animals_run.workspace, out, err
    )
    assert (folder / f"{photos[0].stem}.gradcam.png").read_bytes() == b"a file that was there before"
    written = sorted(path.name for path in folder.iterdir())
    assert written == sorted(
        [f"{photos[0].stem}.gradcam.png", f"{photos[0].stem}-2.gradcam.png", f"{photos[1].stem}.gradcam.png"]
    )
    with Image.open(folder / f"{photos[1].stem}.gradcam.png") as image:
        assert image.mode == "RGB" and image.size == (224, 224)
    assert f"2 Grad-CAM heatmaps in {folder}" in err.getvalue()


def test_explain_with_a_cnn_run_from_the_command_line(cnn_run, tmp_path):
    Image.fromarray(synthetic_photo(1, 3)).save(tmp_path / "photo.png")
    result = run_script(
        "predict.py", "photo.png", "--run", str(cnn_run.run), "--explain", "maps", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "maps" / "photo.gradcam.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (["photo.png", "--explain", "photo.png"], "error: --explain photo.png is a file; give a folder"),
        (["notes.txt", "--explain", "maps"], "error: none of the 1 inputs could be used as an image"),
    ],
)
def test_bad_explain_input_ends_in_one_line_and_exit_2(cnn_run, tmp_path, inputs, message):
    Image.fromarray(synthetic_photo(0, 1)).save(tmp_path / "photo.png")
    (tmp_path / "notes.txt").write_text("hello")
    before = (tmp_path / "photo.png").read_bytes()
    result = run_script("predict.py", *inputs, "--run", str(cnn_run.run), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert (tmp_path / "photo.png").read_bytes() == before
    assert not list(tmp_path.glob("maps/*.png"))


def test_the_misclassified_gallery_draws_each_mistake_with_its_heatmap(trained_runs):
    from image_classifier import reports

    run = RunFolder.find(trained_runs.workspace, trained_runs.cnn.name)
    mistakes, _ = reports.misclassified(run, limit=4)
    figure = reports.plot_misclassified(run, limit=4)
    shown = [ax for ax in figure.axes if ax.get_images()]
    expected = gradcam(run, np.stack([mistake.image for mistake in mistakes]))
    assert len(shown) == len(mistakes) > 0
    for ax, mistake, heatmap in zip(shown, mistakes, expected, strict=True):
        photo, heat = ax.get_images()
        np.testing.assert_array_equal(photo.get_array(), mistake.image)
        np.testing.assert_allclose(heat.get_array(), heatmap, atol=1e-5)
    assert "Grad-CAM: where the model looked" in figure.get_suptitle()
    plain = reports.plot_misclassified(run, limit=4, heatmaps=False)
    assert all(len(ax.get_images()) == 1 for ax in plain.axes if ax.get_images())
