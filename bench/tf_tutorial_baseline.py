"""The baseline of bench/cats_dogs.py: the TensorFlow transfer-learning tutorial, in plain Keras.

    python bench/tf_tutorial_baseline.py --images-dir ../shared/datasets/cats_and_dogs_small [--json OUT]

Follows https://www.tensorflow.org/tutorials/images/transfer_learning step by step, using none of the
project's code: image_dataset_from_directory (160x160, batch 32, every photo decoded again each epoch),
RandomFlip("horizontal") + RandomRotation(0.2), mobilenet_v2.preprocess_input, MobileNetV2 (imagenet,
no top) frozen and called with training=False, GlobalAveragePooling2D, Dropout(0.2), Dense(1) logits,
BinaryCrossentropy(from_logits=True), Adam(1e-4) for 10 epochs after one evaluation of the untrained
model; then base_model.trainable = True with layers[:100] frozen again, RMSprop(1e-5) for 10 more epochs.
The only change: the dataset has a real test/ folder, so the test accuracy is measured there (the
tutorial carves its test set out of validation/). A photo counts as a dog when its logit is above 0,
as in the tutorial's prediction step.

The pretrained weights come from keras.applications.MobileNetV2(weights="imagenet"), i.e. from
KERAS_HOME/models/ (bench/cats_dogs.py seeds a temporary KERAS_HOME from ../shared/weights).
Prints one JSON line at the end (and writes it to --json): test accuracy, epochs, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BATCH_SIZE = 32
IMG_SIZE = (160, 160)
INITIAL_EPOCHS = 10
FINE_TUNE_EPOCHS = 10
FINE_TUNE_AT = 100
BASE_LEARNING_RATE = 0.0001


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--images-dir", type=Path, required=True, help="with train/, validation/, test/")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--initial-epochs", type=int, default=INITIAL_EPOCHS)
    parser.add_argument("--fine-tune-epochs", type=int, default=FINE_TUNE_EPOCHS)
    args = parser.parse_args()
    started = time.monotonic()

    import numpy as np
    import tensorflow as tf

    train_dir = args.images_dir / "train"
    validation_dir = args.images_dir / "validation"
    test_dir = args.images_dir / "test"

    train_dataset = tf.keras.utils.image_dataset_from_directory(
        train_dir, shuffle=True, batch_size=BATCH_SIZE, image_size=IMG_SIZE
    )
    validation_dataset = tf.keras.utils.image_dataset_from_directory(
        validation_dir, shuffle=True, batch_size=BATCH_SIZE, image_size=IMG_SIZE
    )
    test_dataset = tf.keras.utils.image_dataset_from_directory(
        test_dir, shuffle=False, batch_size=BATCH_SIZE, image_size=IMG_SIZE
    )

    autotune = tf.data.AUTOTUNE
    train_dataset = train_dataset.prefetch(buffer_size=autotune)
    validation_dataset = validation_dataset.prefetch(buffer_size=autotune)
    test_dataset = test_dataset.prefetch(buffer_size=autotune)

    data_augmentation = tf.keras.Sequential(
        [tf.keras.layers.RandomFlip("horizontal"), tf.keras.layers.RandomRotation(0.2)]
    )
    preprocess_input = tf.keras.applications.mobilenet_v2.preprocess_input

    img_shape = IMG_SIZE + (3,)
    base_model = tf.keras.applications.MobileNetV2(
        input_shape=img_shape, include_top=False, weights="imagenet"
    )
    base_model.trainable = False

    global_average_layer = tf.keras.layers.GlobalAveragePooling2D()
    prediction_layer = tf.keras.layers.Dense(1)

    inputs = tf.keras.Input(shape=img_shape)
    x = data_augmentation(inputs)
    x = preprocess_input(x)
    x = base_model(x, training=False)
    x = global_average_layer(x)
    x = tf.keras.layers.Dropout(0.2)(x)
    outputs = prediction_layer(x)
    model = tf.keras.Model(inputs, outputs)

    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate=BASE_LEARNING_RATE),
        loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[tf.keras.metrics.BinaryAccuracy(threshold=0.5, name="accuracy")],
    )
    loss0, accuracy0 = model.evaluate(validation_dataset, verbose=2)
    print(f"initial loss: {loss0:.2f}, initial accuracy: {accuracy0:.2f}", flush=True)

    history = model.fit(
        train_dataset, epochs=args.initial_epochs, validation_data=validation_dataset, verbose=2
    )

    base_model.trainable = True
    print("Number of layers in the base model: ", len(base_model.layers), flush=True)
    for layer in base_model.layers[:FINE_TUNE_AT]:
        layer.trainable = False

    model.compile(
        loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
        optimizer=tf.keras.optimizers.RMSprop(learning_rate=BASE_LEARNING_RATE / 10),
        metrics=[tf.keras.metrics.BinaryAccuracy(threshold=0.5, name="accuracy")],
    )
    total_epochs = args.initial_epochs + args.fine_tune_epochs
    history_fine = model.fit(
        train_dataset,
        epochs=total_epochs,
        initial_epoch=len(history.epoch),
        validation_data=validation_dataset,
        verbose=2,
    )
    train_seconds = time.monotonic() - started

    logits = []
    labels = []
    for images, batch_labels in test_dataset:
        logits.append(model.predict_on_batch(images).flatten())
        labels.append(batch_labels.numpy())
    predictions = (np.concatenate(logits) > 0).astype(int)
    truth = np.concatenate(labels)
    test_accuracy = float((predictions == truth).mean())
    result = {
        "test_accuracy": test_accuracy,
        "test_images": int(len(truth)),
        "epochs": len(history.epoch) + len(history_fine.epoch),
        "epochs_frozen": len(history.epoch),
        "epochs_fine_tune": len(history_fine.epoch),
        "seconds": round(time.monotonic() - started, 1),
        "train_seconds": round(train_seconds, 1),
    }
    print(f"Test accuracy: {test_accuracy:.4f}")
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
