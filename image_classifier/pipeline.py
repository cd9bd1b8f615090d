"""tf.data input pipelines over memory-mapped arrays: only the current batches are ever in memory."""

from __future__ import annotations

import numpy as np

from .tf_env import import_keras


def make_augmenter(seed: int):
    """Random flip, rotation, zoom and contrast, as Keras preprocessing layers (training only)."""
    keras = import_keras()
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.1, seed=seed),
            keras.layers.RandomZoom(0.1, seed=seed),
            keras.layers.RandomContrast(0.1, seed=seed),
        ],
        name="augmentation",
    )


def image_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augmenter=None,
):
    """(float32 images 0..255, class ids) batches; reshuffled every epoch when `shuffle`."""
    import_keras()
    import tensorflow as tf

    count = len(y)
    height, width, channels = x.shape[1:]

    def fetch(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = np.sort(indices)  # sorted reads are sequential on disk; order inside a batch is free
        return np.asarray(x[indices]), np.asarray(y[indices], dtype=np.int32)

    def load(indices):
        images, labels = tf.numpy_function(fetch, [indices], (tf.uint8, tf.int32), stateful=False)
        images.set_shape((None, height, width, channels))
        labels.set_shape((None,))
        return tf.cast(images, tf.float32), labels

    indices = tf.data.Dataset.range(count)
    if shuffle:
        indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    batches = indices.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if augmenter is not None:
        batches = batches.map(
            lambda images, labels: (augmenter(images, training=True), labels),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return batches.prefetch(tf.data.AUTOTUNE)


def images_only(batches):
    return batches.map(lambda images, labels: images)
