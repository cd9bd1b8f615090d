"""What TensorBoard shows of a run beyond Keras's own per-epoch scalars.

Keras's TensorBoard callback already writes loss, accuracy and the learning rate per epoch to
logs/train and logs/validation (`epoch_loss`, `epoch_accuracy`, `epoch_learning_rate`). After the test
evaluation this module adds:

logs/            the run's options as hyperparameters (HParams dashboard: sort and compare runs)
logs/test/       the test loss and accuracy of the kept model, at its epoch, on the same charts as the
                 training curves; the misclassified test images with their Grad-CAM heatmaps (where the
                 model looked) and the confusion matrix (Images tab)
"""

from __future__ import annotations

from datetime import datetime

from .reports import UNCOMPARED_OPTIONS, figure_png, plot_misclassified
from .runs import RunFolder


def hparams_of(options: dict) -> dict[str, bool | int | float | str]:
    """Training options as HParams values: lists become "a,b,c" text, None becomes "none"."""
    values: dict[str, bool | int | float | str] = {}
    for key, value in sorted(options.items()):
        if key in UNCOMPARED_OPTIONS:
            continue
        if isinstance(value, list | tuple):
            values[key] = ",".join(map(str, value)) or "none"
        elif value is None:
            values[key] = "none"
        elif isinstance(value, bool | int | float | str):
            values[key] = value
        else:
            values[key] = str(value)
    return values


def log_run_summaries(run: RunFolder) -> None:
    """Write the hyperparameters, test scores and misclassified images of a finished, evaluated run."""
    from tensorboard.plugins.hparams import api as hp

    from .tf_env import import_keras

    import_keras()
    import tensorflow as tf

    logs = run.logs
    created = run.config.get("created")
    started = _timestamp(created) if created else None
    writer = tf.summary.create_file_writer(str(logs))
    with writer.as_default():
        hp.hparams(hparams_of(run.options), trial_id=run.name, start_time_secs=started)
    writer.close()

    step = run.best_epoch if run.best_epoch is not None else max(run.epochs - 1, 0)
    writer = tf.summary.create_file_writer(str(logs / "test"))
    with writer.as_default():
        if "test_loss" in run.metrics:
            tf.summary.scalar("epoch_loss", run.metrics["test_loss"], step=step)
            tf.summary.scalar("epoch_accuracy", run.metrics["test_accuracy"], step=step)
        figure = plot_misclassified(run, limit=24)
        if figure is not None:
            tf.summary.image(
                "misclassified_test_images",
                _decode_png(tf, figure_png(figure)),
                step=step,
                description="Test images the kept model got wrong, most confident first: "
                "true class, predicted class and the model's confidence, with a Grad-CAM heatmap of "
                "where it looked.",
            )
        matrix = run.path / "confusion_matrix.png"
        if matrix.is_file():
            tf.summary.image(
                "confusion_matrix",
                _decode_png(tf, matrix.read_bytes()),
                step=step,
                description="Test set: rows are the true class, columns the predicted class.",
            )
    writer.close()


def _decode_png(tf, data: bytes):
    image = tf.image.decode_png(data, channels=3)
    return tf.expand_dims(image, 0)


def _timestamp(text: str) -> float | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None
