"""The model registry: every name builds and trains a step; preprocessing matches keras.applications."""

from __future__ import annotations

import numpy as np
import pytest

from image_classifier.errors import UserError
from image_classifier.models import REGISTRY, build_model, get_spec, load_model, unfreeze_top
from image_classifier.tf_env import import_keras

keras = import_keras()


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_model_builds_and_trains_one_step(name):
    spec = get_spec(name)
    size = max(spec.min_image_size, 32)
    built = build_model(spec, 3, size, weights="none", dense_units=(8,))
    # Eager: tracing a large backbone's graph for a single step costs far more than the step itself.
    built.model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=True)
    images = np.random.default_rng(0).uniform(0, 255, (2, size + 7, size - 3, 3)).astype("float32")
    before = [w.copy() for w in built.head.get_weights()]
    built.model.fit(images, np.array([0, 2]), epochs=1, batch_size=2, verbose=0)
    probabilities = keras.ops.convert_to_numpy(built.model(images, training=False))
    assert probabilities.shape == (2, 3)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    assert any(not np.allclose(a, b) for a, b in zip(before, built.head.get_weights(), strict=True))
    if spec.pretrained:
        assert not built.backbone.trainable
    keras.backend.clear_session()


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("mobilenet_v2", keras.applications.mobilenet_v2),
        ("resnet50", keras.applications.resnet50),
        ("densenet121", keras.applications.densenet),
        ("xception", keras.applications.xception),
        ("efficientnet_b0", keras.applications.efficientnet),
    ],
)
def test_input_preprocessing_matches_keras_applications(name, module):
    from image_classifier.layers import InputPreprocessing

    pixels = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = keras.ops.convert_to_numpy(InputPreprocessing(get_spec(name).preprocessing)(pixels))
    np.testing.assert_allclose(ours, module.preprocess_input(pixels.copy()), rtol=1e-5, atol=1e-4)


def test_fine_tuning_unfreezes_the_top_and_keeps_batchnorm_statistics(keras_home):
    built = build_model(get_spec("mobilenet_v2"), 2, 96, weights="imagenet")
    trainable = unfreeze_top(built, 20)
    layers = built.backbone.layers
    assert trainable > 0
    assert not any(layer.trainable for layer in layers[:-20])
    batch_norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert batch_norms and not any(layer.trainable for layer in batch_norms)
    moving = [keras.ops.convert_to_numpy(layer.moving_mean).copy() for layer in batch_norms]
    top_kernel = next(layer for layer in reversed(layers) if isinstance(layer, keras.layers.Conv2D)).kernel
    kernel_before = keras.ops.convert_to_numpy(top_kernel).copy()
    built.model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    images = np.random.default_rng(0).uniform(0, 255, (4, 96, 96, 3)).astype("float32")
    built.model.fit(images, np.array([0, 1, 0, 1]), epochs=2, batch_size=4, verbose=0)
    for layer, before in zip(batch_norms, moving, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.moving_mean), before)
    assert not np.allclose(keras.ops.convert_to_numpy(top_kernel), kernel_before)


def test_saved_model_loads_and_takes_any_image_size(tmp_path):
    built = build_model(get_spec("cnn"), 2, 40, weights="none")
    path = tmp_path / "model.keras"
    built.model.save(path)
    loaded = load_model(path)
    images = np.random.default_rng(0).uniform(0, 255, (1, 90, 60, 3)).astype("float32")
    np.testing.assert_allclose(
        loaded.predict(images, verbose=0), built.model.predict(images, verbose=0), atol=1e-6
    )


def test_cnn_has_batch_norm_by_default_and_the_books_network_without():
    with_norm = build_model(get_spec("cnn"), 2, 32).model
    norms = [layer for layer in with_norm.layers if isinstance(layer, keras.layers.BatchNormalization)]
    convs = [layer for layer in with_norm.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(norms) == len(convs) == 4 and not any(conv.use_bias for conv in convs)
    before = keras.ops.convert_to_numpy(norms[0].moving_mean).copy()
    with_norm.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    batch = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    with_norm.fit(batch, np.array([0, 1, 0, 1]), epochs=1, verbose=0)
    assert not np.allclose(keras.ops.convert_to_numpy(norms[0].moving_mean), before), (
        "fit() updates statistics"
    )

    book = build_model(get_spec("cnn"), 2, 32, batch_norm=False).model
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in book.layers)
    assert all(layer.use_bias for layer in book.layers if isinstance(layer, keras.layers.Conv2D))


def test_batch_norm_statistics_for_prediction_catch_up_within_tens_of_steps():
    """A 4-epoch run of 63 steps each once predicted one class for every photo: the averages lagged."""
    model = build_model(get_spec("cnn"), 2, 32).model
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="sparse_categorical_crossentropy")
    batch = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    model.fit(batch, np.array([0, 1, 0, 1]), epochs=30, batch_size=4, verbose=0)
    conv = keras.Model(model.input, model.get_layer("conv_1").output)
    batch_mean = keras.ops.convert_to_numpy(conv(batch)).mean(axis=(0, 1, 2))
    moving_mean = keras.ops.convert_to_numpy(model.get_layer("batch_norm_1").moving_mean)
    np.testing.assert_allclose(moving_mean, batch_mean, rtol=0.1, atol=1e-3)


def test_calling_the_model_is_deterministic():
    """Dropout runs only in fit(): a plain model(x) call must give the same answer every time."""
    built = build_model(get_spec("cnn"), 3, 32, dropout=0.5)
    images = np.random.default_rng(0).uniform(0, 255, (4, 50, 40, 3)).astype("float32")
    first = keras.ops.convert_to_numpy(built.model(images))
    np.testing.assert_array_equal(first, keras.ops.convert_to_numpy(built.model(images)))
    np.testing.assert_allclose(first, built.model.predict(images, verbose=0), atol=1e-6)


def test_resize_layer_matches_keras_resizing():
    from image_classifier.layers import SquareResize

    images = np.random.default_rng(1).uniform(0, 255, (2, 50, 80, 3)).astype("float32")
    for mode in ("squash", "crop", "pad"):
        expected = keras.layers.Resizing(
            20, 20, crop_to_aspect_ratio=mode == "crop", pad_to_aspect_ratio=mode == "pad", antialias=True
        )(images)
        np.testing.assert_allclose(SquareResize(20, mode)(images), expected, atol=1e-4)


def test_shared_imagenet_weights_load_through_keras_cache(keras_home, monkeypatch):
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # a closed port: any download would fail at once
    built = build_model(get_spec("mobilenet_v2"), 2, 96, weights="imagenet")
    random = build_model(get_spec("mobilenet_v2"), 2, 96, weights="none")
    first = built.backbone.get_weights()[0]
    assert not np.allclose(first, random.backbone.get_weights()[0])
    # the very numbers of the file seeded into KERAS_HOME
    import h5py

    cached = keras_home / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    with h5py.File(cached, "r") as weights:
        conv1 = weights["Conv1"]
        np.testing.assert_array_equal(first, conv1[conv1.attrs["weight_names"][0]][()])


def test_unknown_model_and_too_small_image():
    with pytest.raises(UserError, match="unknown model 'alexnet'"):
        get_spec("alexnet")
    with pytest.raises(UserError, match="inception_v3 cannot take 64x64"):
        build_model(get_spec("inception_v3"), 2, 64)
