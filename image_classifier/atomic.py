"""Writing files so that a reader (or a process killed half-way) never sees half a file."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the permissions open() would
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, value) -> None:
    write_atomic(path, (json.dumps(value, indent=1, ensure_ascii=False, default=str) + "\n").encode("utf-8"))


def write_pickle(path: Path, value) -> None:
    write_atomic(path, pickle.dumps(value))


def save_model_atomic(model, path: Path) -> None:
    """model.save() into a temporary name, then rename: Keras writes the .keras zip in place."""
    temporary = path.with_name(f".{path.stem}.partial.keras")
    model.save(temporary)
    os.replace(temporary, path)
