"""Use a trained run: image files, folders and URLs in, the top-k labels with probabilities out.

Each image is decoded and resized exactly as preprocessing made the training arrays (images.load_array:
EXIF orientation, any mode to RGB, JPEG draft decoding, the run's --image-size and --resize). The saved
model would accept the photo at any size, but its own TensorFlow resize is not the Pillow resize the
training arrays were made with; resizing here first keeps predictions identical to the test-set
evaluation, lets a folder go through the model in equal-sized batches, and makes the model's resize
layer an exact no-op. A file that cannot be used is reported with its reason and the rest go on.

A run with a "none of these" check (openset.py) also judges whether each photo belongs to any category:
`known` False marks it unknown while `top` still names the closest categories; a run trained before the check
says so once and gives `known` None. `--explain DIR` writes a Grad-CAM heatmap per photo (explain.py).
"""

from __future__ import annotations

import csv
import io
import json
import sys
import tempfile
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from .config import Workspace
from .errors import UserError
from .gathering.download import Cancelled, FetchError, FetchPolicy, HttpClient
from .images import ImageError, list_image_files, load_array
from .runs import RunFolder

OUTPUTS = ("table", "json", "csv")
DEFAULT_TOP_K = 3
DEFAULT_BATCH_SIZE = 32
READ_THREADS = 2
"""Decoding and downloading run beside the model, one batch ahead (Pillow and sockets release the GIL)."""
URL_PREFIXES = ("http://", "https://")


@dataclass(frozen=True)
class PredictInput:
    """One thing to predict: a file, or a URL to download first. `name` is how the user wrote it."""

    name: str
    path: Path | None = None
    url: str | None = None


@dataclass(frozen=True)
class Prediction:
    source: str
    top: list[tuple[str, float]] = field(default_factory=list)
    """(label, probability), most likely first; empty when the input could not be used."""
    error: str | None = None
    uncertain: bool = False
    known: bool | None = None
    """False: "none of these" (the photo is unlike every category; top[0] is only the closest); None: the run
    has no check (trained before it existed)."""
    known_score: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def collect_sources(arguments: Sequence[str]) -> list[PredictInput]:
    """Files as given, folders expanded to their files (recursively), URLs kept for later download.

    A path that does not exist is a mistake in the command, not a bad image: it stops before any work.
    """
    sources: list[PredictInput] = []
    for argument in arguments:
        if argument.lower().startswith(URL_PREFIXES):
            sources.append(PredictInput(name=argument, url=argument))
            continue
        path = Path(argument)
        if path.is_dir():
            files = list_image_files(path)
            if not files:
                raise UserError(f"folder {path} has no files to predict")
            sources.extend(PredictInput(name=str(file), path=file) for file in files)
        elif path.exists():
            sources.append(PredictInput(name=argument, path=path))
        else:
            raise UserError(f"no such file or folder: {argument}")
    if not sources:
        raise UserError("nothing to predict; give image files, folders or http(s) URLs")
    return sources


class Predictor:
    """A run's model, loaded on first use: inputs that are all unreadable never wait for TensorFlow."""

    def __init__(self, run: RunFolder) -> None:
        from .openset import OpenSet

        self.run = run
        self.check = OpenSet.load(run)
        """The run's "none of these" check, None for a run trained before it existed."""
        self._model = None
        self._backbone = None
        self._embedder = None

    @property
    def model(self):
        if self._model is None:
            from .models import load_model

            model = load_model(self.run.model_path)
            classes = model.output_shape[-1]
            if classes != len(self.run.labels):
                raise UserError(
                    f"{self.run.model_path} predicts {classes} classes but labels.json names "
                    f"{len(self.run.labels)}; the run folder is inconsistent, train again"
                )
            self._model = model
        return self._model

    @property
    def cannot_judge(self) -> str | None:
        """The one line to show when the run cannot tell "none of these", else None."""
        if self.check is not None:
            return None
        return (
            f'run {self.run.name} cannot judge "none of these" (trained before the check existed): every photo '
            "gets its closest category; train again to have it"
        )

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 images, N x size x size x 3 (as load_array makes them) -> N x classes.

        A backbone's features come from features.py (the fast engine) and go through the model's own head:
        the same function as the whole model, which runs as it is for models trained from scratch.
        """
        return self.outputs(images)[0]

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 images -> (probabilities N x classes, known scores N or None when the run has no check)."""
        if self.check is not None:
            if self._embedder is None:
                from .openset import Embedder

                self._embedder = Embedder(self.model, self._backbone_features())
            probabilities, embeddings = self._embedder.of_images(images)
            return probabilities, self.check.scores(embeddings, probabilities)
        if self.run.config.get("model", {}).get("family") != "backbone":
            return np.asarray(self.model.predict_on_batch(images.astype(np.float32))), None
        features = self._backbone_features()
        return np.asarray(self._backbone[1].predict_on_batch(features.of_images(images))), None

    def _backbone_features(self):
        """The backbone's BackboneFeatures (None for a model trained from scratch), made once."""
        if self.run.config.get("model", {}).get("family") != "backbone":
            return None
        if self._backbone is None:
            from .features import BackboneFeatures, split_model

            features_model, head = split_model(self.model)
            features = BackboneFeatures(
                features_model, self.run.options["model"], self.run.image_size, self.run.workspace,
                self.run.options.get("engine"), print_fn=lambda line: print(line, file=sys.stderr),
                layers=tuple(self.run.options.get("feature_layers") or ("final",)),
            )  # fmt: skip
            self._backbone = (features, head)
        return self._backbone[0]

    def predictions(
        self, names: Sequence[str], images: np.ndarray, top_k: int = DEFAULT_TOP_K, threshold: float = 0.0
    ) -> list[Prediction]:
        """One Prediction per image (uint8, as load_array makes them), `names` naming them."""
        probabilities, scores = self.outputs(images) if len(images) else (np.zeros((0, 0)), None)
        labels, top_k = self.run.labels, min(top_k, len(self.run.labels))
        predictions = []
        for index, (name, row) in enumerate(zip(names, probabilities, strict=True)):
            order = np.argsort(-row, kind="stable")[:top_k]
            top = [(labels[i], float(row[i])) for i in order]
            score = None if scores is None else float(scores[index])
            known = None if score is None else bool(self.check.known(np.array([score]))[0])
            predictions.append(
                Prediction(name, top, uncertain=top[0][1] < threshold, known=known, known_score=score)
            )
        return predictions

    def read(self, source: PredictInput, client: HttpClient, downloads: Path) -> np.ndarray | str:
        """The image as the model's input array, or the reason it cannot be used."""
        path = source.path
        try:
            if source.url is not None:
                path = downloads / f"{uuid.uuid4().hex}.download"
                client.download(source.url, path)
            return load_array(path, self.run.image_size, self.run.resize)  # type: ignore[arg-type]
        except FetchError as error:
            return f"download failed: {error}"
        except ImageError as error:
            return str(error)
        except Cancelled:
            raise
        except Exception as error:  # one odd file must not stop a folder
            return f"cannot decode: {type(error).__name__}: {error}"
        finally:
            if source.url is not None and path is not None:
                path.unlink(missing_ok=True)


def _batches(items: list[PredictInput], size: int) -> Iterator[list[PredictInput]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_sources(
    predictor: Predictor,
    sources: list[PredictInput],
    *,
    top_k: int = DEFAULT_TOP_K,
    threshold: float = 0.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    policy: FetchPolicy | None = None,
    progress: bool = False,
    explain=None,
) -> list[Prediction]:
    """Predictions in the order of `sources`; the next batch is read while the model runs on this one.

    `explain` (an explain.HeatmapWriter) is given each batch's names and images to draw Grad-CAM over them.
    """
    from tqdm import tqdm

    labels = predictor.run.labels
    top_k = min(top_k, len(labels))
    client = HttpClient(policy or FetchPolicy(timeout=15.0, max_time=60.0, retries=1))
    results: list[Prediction] = []
    bar = tqdm(
        total=len(sources),
        desc="Predicting",
        unit="img",
        file=sys.stderr,
        mininterval=0.5,
        disable=not progress,
    )
    with (
        tempfile.TemporaryDirectory(prefix="predict-") as downloads,
        ThreadPoolExecutor(READ_THREADS) as pool,
    ):
        pending: deque[list[tuple[PredictInput, Future]]] = deque()

        def submit(batch: list[PredictInput]) -> None:
            pending.append(
                [(source, pool.submit(predictor.read, source, client, Path(downloads))) for source in batch]
            )

        try:
            for batch in _batches(sources, batch_size):
                submit(batch)
                if len(pending) > 1:
                    results.extend(
                        _predict_batch(predictor, pending.popleft(), top_k, threshold, bar, explain)
                    )
            while pending:
                results.extend(_predict_batch(predictor, pending.popleft(), top_k, threshold, bar, explain))
        except BaseException:
            client.abort()
            for batch in pending:
                for _, future in batch:
                    future.cancel()
            raise
        finally:
            bar.close()
    return results


def _predict_batch(
    predictor: Predictor,
    batch: list[tuple[PredictInput, Future]],
    top_k: int,
    threshold: float,
    bar,
    explain=None,
) -> list[Prediction]:
    read = [(source, future.result()) for source, future in batch]
    good = [(source.name, array) for source, array in read if isinstance(array, np.ndarray)]
    images = np.stack([array for _, array in good]) if good else np.zeros((0, 1, 1, 3), np.uint8)
    made = iter(predictor.predictions([name for name, _ in good], images, top_k, threshold))
    if explain is not None and good:
        explain([name for name, _ in good], images)
    predictions = [
        Prediction(source=source.name, error=array) if isinstance(array, str) else next(made)
        for source, array in read
    ]
    bar.update(len(batch))
    return predictions


def _percent(probability: float) -> str:
    return f"{probability * 100:.1f}%"


def _note(prediction: Prediction) -> str:
    notes = [f"none of these (known score {prediction.known_score:.3f})"] if prediction.known is False else []
    if prediction.uncertain:
        notes.append("uncertain")
    return ", ".join(notes)


def format_table(predictions: Sequence[Prediction], top_k: int) -> str:
    """Aligned columns for people: image, then the top-k labels with percentages, then a note."""
    ranks = max((len(p.top) for p in predictions), default=top_k) or top_k
    header = ["image", *(f"top {rank}" for rank in range(1, ranks + 1)), "note"]
    rows = []
    for prediction in predictions:
        if prediction.ok:
            cells = [f"{label} {_percent(p)}" for label, p in prediction.top]
            if prediction.known is False:
                cells[0] = f"unknown (closest: {cells[0]})"
            cells += [""] * (ranks - len(cells))
            rows.append([prediction.source, *cells, _note(prediction)])
        else:
            rows.append([prediction.source, f"skipped: {prediction.error}"])
    from .text import column_width, display_width, pad

    widths = [display_width(text) for text in header]
    for row in rows:
        if len(row) == len(header):
            widths = [max(width, display_width(text)) for width, text in zip(widths, row, strict=True)]
    widths[0] = column_width(header[0], *(row[0] for row in rows))
    lines = []
    for row in [header, *rows]:
        padded = [pad(text, width) for text, width in zip(row, widths, strict=False)]
        lines.append("  ".join(padded[: len(row)]).rstrip())
    return "\n".join(lines)


def prediction_record(prediction: Prediction) -> dict:
    """One prediction as `--json` gives it; the server answers with the same records."""
    if not prediction.ok:
        return {"input": prediction.source, "error": prediction.error}
    label, probability = prediction.top[0]
    return {
        "input": prediction.source,
        "label": label,
        "probability": round(probability, 6),
        "uncertain": prediction.uncertain,
        "known": prediction.known,
        "known_score": None if prediction.known_score is None else round(prediction.known_score, 6),
        "top": [{"label": name, "probability": round(p, 6)} for name, p in prediction.top],
    }


def predictions_document(predictions: Sequence[Prediction], run: RunFolder, threshold: float) -> dict:
    """The --json document; "known_check" describes the run's "none of these" check (null: it has none)."""
    items = [prediction_record(prediction) for prediction in predictions]
    return {
        "run": str(run.path),
        "labels": run.labels,
        "threshold": threshold,
        "known_check": run.metrics.get("open_set"),
        "predictions": items,
    }


def format_json(predictions: Sequence[Prediction], run: RunFolder, threshold: float) -> str:
    return json.dumps(predictions_document(predictions, run, threshold), indent=1, ensure_ascii=False)


def format_csv(predictions: Sequence[Prediction], top_k: int) -> str:
    """One row per input: label_1, probability_1 ... label_k, probability_k, uncertain, known, known_score,
    error (known is 1, 0 for "none of these", or empty when the run cannot judge)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    ranks = range(1, top_k + 1)
    writer.writerow(
        [
            "input",
            *(f"{what}_{rank}" for rank in ranks for what in ("label", "probability")),
            "uncertain",
            "known",
            "known_score",
            "error",
        ]
    )
    for prediction in predictions:
        cells: list[str] = []
        for rank in ranks:
            if rank <= len(prediction.top):
                label, probability = prediction.top[rank - 1]
                cells += [label, f"{probability:.6f}"]
            else:
                cells += ["", ""]
        uncertain = "" if not prediction.ok else str(int(prediction.uncertain))
        known = "" if prediction.known is None else str(int(prediction.known))
        score = "" if prediction.known_score is None else f"{prediction.known_score:.6f}"
        writer.writerow([prediction.source, *cells, uncertain, known, score, prediction.error or ""])
    return buffer.getvalue()


@dataclass(frozen=True)
class PredictOptions:
    inputs: tuple[str, ...]
    run: str = "latest"
    top_k: int = DEFAULT_TOP_K
    threshold: float = 0.0
    output: str = "table"
    batch_size: int = DEFAULT_BATCH_SIZE
    explain: str | None = None
    """A folder for Grad-CAM heatmaps of each photo (explain.py)."""


def run_predict(
    options: PredictOptions, workspace: Workspace, out: TextIO | None = None, err: TextIO | None = None
) -> list[Prediction]:
    """The predict stage: everything the script does, printing to `out` (results) and `err` (summary).

    Exit status is 0 when at least one image got a prediction; when none did, the per-input reasons are
    still printed and a UserError (exit 2) says so.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if options.output not in OUTPUTS:
        raise UserError(f"unknown output {options.output!r}; choose from {', '.join(OUTPUTS)}")
    run = RunFolder.find(workspace, options.run)
    sources = collect_sources(options.inputs)
    explain = None
    if options.explain is not None:
        from .explain import HeatmapWriter, explanation_folder

        folder = explanation_folder(options.explain)
    predictor = Predictor(run)
    if options.explain is not None:
        explain = HeatmapWriter(lambda: predictor.model, folder)
    if predictor.cannot_judge:
        print(f"note: {predictor.cannot_judge}", file=err)
    predictions = predict_sources(
        predictor,
        sources,
        top_k=options.top_k,
        threshold=options.threshold,
        batch_size=options.batch_size,
        progress=len(sources) > options.batch_size,
        explain=explain,
    )
    top_k = min(options.top_k, len(run.labels))
    if options.output == "json":
        print(format_json(predictions, run, options.threshold), file=out)
    elif options.output == "csv":
        out.write(format_csv(predictions, top_k))
    else:
        print(format_table(predictions, top_k), file=out)
    print(_summary(predictions, options, predictor, explain), file=err)
    return predictions


def _summary(
    predictions: Sequence[Prediction], options: PredictOptions, predictor: Predictor, explain
) -> str:
    """The stage's last line on stderr; a UserError when no input could be used."""
    predicted = sum(p.ok for p in predictions)
    uncertain = sum(p.ok and p.uncertain for p in predictions)
    unknown = sum(p.ok and p.known is False for p in predictions)
    skipped = len(predictions) - predicted
    if not predicted:
        raise UserError(f"none of the {skipped} inputs could be used as an image (reasons above)")
    summary = f"Predicted {predicted} image{'s' if predicted != 1 else ''} with run {predictor.run.path.name}"
    if options.threshold:
        summary += f"; {uncertain} uncertain (top probability below {_percent(options.threshold)})"
    if predictor.check is not None:
        summary += f'; {unknown} unknown ("none of these")'
    if skipped:
        summary += f"; skipped {skipped} input{'s' if skipped != 1 else ''} that could not be used"
    if explain is not None:
        summary += f"; {len(explain.written)} Grad-CAM heatmaps in {explain.folder}"
    return summary
