"""Import TensorFlow and Keras quietly, once, with the project's settings."""

from __future__ import annotations

import os


def import_keras():
    """Keras on the TensorFlow backend, without TensorFlow's start-up log chatter."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow  # noqa: F401  (the backend must be loaded before building models)

    return keras


def keras_home() -> str:
    """Where Keras caches downloads (`$KERAS_HOME`, else ~/.keras), by Keras's own rule."""
    try:
        from keras.src.backend.config import keras_home as private_keras_home

        return private_keras_home()
    except ImportError:
        return os.environ.get("KERAS_HOME") or os.path.expanduser("~/.keras")
