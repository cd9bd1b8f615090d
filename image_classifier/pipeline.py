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


def batch_source(
    x: np.ndarray,
    y: np.ndarray,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augmenter=None,
    class_weight: dict[int, float] | None = None,
    passes: int = 1,
):
    """`build(batch_size, num_shards=1, shard_index=0)` -> batches of one shard of (x, y).

    x may be memory-mapped images (uint8, cast to float32 0..255 per batch) or in-memory features.
    The indices are sharded before anything is read, so each worker of a multi-worker run reads only
    its own rows; a shard of several repeats forever, and `fit` is given the steps per epoch, because
    workers whose shards differ by one row must still take the same number of steps. With
    `class_weight`, batches carry per-sample weights (which work under every tf.distribute strategy,
    where fit's own class_weight does not). `passes` makes one epoch several reshuffled passes over the rows.
    """
    import_keras()
    import tensorflow as tf

    count = len(y)
    sample_shape = x.shape[1:]
    dtype = tf.as_dtype(x.dtype)
    weights = None
    if class_weight:
        weights = np.array([class_weight[i] for i in range(max(class_weight) + 1)], dtype=np.float32)

    def fetch(indices: np.ndarray):
        indices = np.sort(indices)  # sorted reads are sequential on disk; order inside a batch is free
        labels = np.asarray(y[indices], dtype=np.int32)
        if weights is None:
            return np.asarray(x[indices]), labels
        return np.asarray(x[indices]), labels, weights[labels]

    def load(indices):
        types = (dtype, tf.int32) if weights is None else (dtype, tf.int32, tf.float32)
        batch = tf.numpy_function(fetch, [indices], types, stateful=False)
        batch[0].set_shape((None, *sample_shape))
        for part in batch[1:]:
            part.set_shape((None,))
        return (tf.cast(batch[0], tf.float32), *batch[1:])

    def build(batch_size: int, num_shards: int = 1, shard_index: int = 0):
        indices = tf.data.Dataset.range(count).shard(num_shards, shard_index)
        if shuffle:
            indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
        if num_shards > 1:
            indices = indices.repeat()
        elif passes > 1:
            indices = indices.repeat(passes)
        batches = indices.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE)
        if augmenter is not None:
            batches = batches.map(
                lambda images, *rest: (augmenter(images, training=True), *rest),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        return batches.prefetch(tf.data.AUTOTUNE)

    return build


def image_batches(x: np.ndarray, y: np.ndarray, batch_size: int, **options):
    """(float32 images 0..255, class ids) batches of all rows; reshuffled every epoch with shuffle=True."""
    return batch_source(x, y, **options)(batch_size)


def images_only(batches):
    return batches.map(lambda images, *_: images)
