"""Pictures of a finished run: training curves, several runs overlaid, the misclassified test images.

The history notebook, scripts/plot_history.py and the TensorBoard image summaries all draw through here,
so each picture is made one way. Figures are plain `matplotlib.figure.Figure` objects, not pyplot ones:
they work the same under Jupyter's inline backend and on a machine without a display, and nothing is kept
alive in pyplot's global list of open figures.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from .atomic import write_atomic
from .config import Workspace, default_workspace
from .errors import UserError
from .fonts import use_fonts_for
from .runs import RunFolder

TRAINING_COLOUR = "tab:blue"
VALIDATION_COLOUR = "tab:orange"
BEST_COLOUR = "tab:green"
FINE_TUNE_COLOUR = "tab:purple"
UNCOMPARED_OPTIONS = frozenset({"workers"})
"""Options that never change what a run learns, so they do not tell two runs apart."""
LABEL_OPTIONS = 5
LABEL_PRIORITY = (
    "model",
    "learning_rate",
    "optimizer",
    "image_size",
    "batch_size",
    "epochs",
    "augment",
    "dropout",
    "dense_units",
    "l2",
    "fine_tune_epochs",
    "fine_tune_layers",
)
"""Which differing options a comparison legend names first: the ones people vary most on purpose."""


@dataclass(frozen=True)
class Mistake:
    """One misclassified test image; `image` is what the model saw (None when it cannot be found)."""

    index: int
    path: str
    true: str
    predicted: str
    confidence: float
    image: np.ndarray | None


def find_workspace(start: Path | None = None) -> Workspace:
    """$WORKSPACE when set; else ./workspace or ../workspace, whichever exists (a checkout's root or notebook/).

    The notebook's working folder is notebook/ under Jupyter but the checkout's root for the scripts, so
    both places are tried; in the container $WORKSPACE is always set.
    """
    if os.environ.get("WORKSPACE"):
        return Workspace(Path(os.environ["WORKSPACE"]))
    here = Path(start or Path.cwd())
    for candidate in (here / "workspace", here.parent / "workspace"):
        if candidate.is_dir():
            return Workspace(candidate)
    return Workspace(default_workspace())


def plot_history(run: RunFolder) -> Figure:
    """Accuracy and loss per epoch for training and validation, the kept epoch and phase 2 marked."""
    panels = [key for key in ("accuracy", "loss", "learning_rate") if key in run.history]
    figure = Figure(figsize=(5.4 * len(panels), 4.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(panels)))
    epochs = np.arange(1, run.epochs + 1)
    best = run.best_epoch
    for ax, key in zip(axes, panels, strict=True):
        ax.plot(epochs, run.history[key], "o-", ms=4, color=TRAINING_COLOUR, label="training")
        validation = run.history.get(f"val_{key}")
        if validation is not None:
            ax.plot(epochs, validation, "o-", ms=4, color=VALIDATION_COLOUR, label="validation")
        if best is not None:
            ax.axvline(best + 1, color=BEST_COLOUR, ls="--", lw=1.2, label=f"best epoch {best + 1} (kept)")
            if validation is not None and best < len(validation):
                ax.plot(best + 1, validation[best], "*", ms=15, color=BEST_COLOUR, zorder=5)
        if run.fine_tune_start is not None:
            _mark_fine_tune(ax, run.fine_tune_start, run.epochs, FINE_TUNE_COLOUR, label="fine-tuning")
        _style_axes(ax, key)
        ax.legend(fontsize="small")
    figure.suptitle(run.title)
    return use_fonts_for(figure)


def plot_comparison(runs: Sequence[RunFolder]) -> Figure:
    """Several runs' curves on shared axes: one colour per run, solid validation, dashed training."""
    if not runs:
        raise ValueError("no runs to compare")
    figure = Figure(figsize=(12, 5.2 + 0.25 * len(runs)), layout="constrained")
    axes = figure.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes, ("accuracy", "loss"), strict=True):
        for run, colour in zip(runs, colours, strict=True):
            epochs = np.arange(1, run.epochs + 1)
            if key in run.history:
                ax.plot(epochs, run.history[key], "--", color=colour, alpha=0.6)
            validation = run.history.get(f"val_{key}")
            if validation is not None:
                ax.plot(epochs, validation, "o-", ms=3, color=colour)
                best = run.best_epoch
                if best is not None and best < len(validation):
                    ax.plot(best + 1, validation[best], "*", ms=14, color=colour, mec="black", zorder=5)
            if run.fine_tune_start is not None:
                ax.axvline(run.fine_tune_start + 0.5, color=colour, ls=":", lw=1.5)
        _style_axes(ax, key)
    run_handles = [
        Line2D([], [], color=colour, lw=3, label=label)
        for colour, label in zip(colours, comparison_labels(runs), strict=True)
    ]
    key_handles = [
        Line2D([], [], color="grey", ls="-", marker="o", ms=3, label="validation"),
        Line2D([], [], color="grey", ls="--", label="training"),
        Line2D([], [], color="grey", ls="", marker="*", ms=12, mec="black", label="best epoch (kept)"),
        Line2D([], [], color="grey", ls=":", lw=1.5, label="fine-tuning starts"),
    ]
    axes[1].legend(handles=key_handles, loc="best", fontsize="small")
    figure.legend(handles=run_handles, loc="outside lower center", fontsize="small")
    figure.suptitle(f"{len(runs)} runs compared")
    return use_fonts_for(figure)


def comparison_labels(runs: Sequence[RunFolder]) -> list[str]:
    """Each run's name plus the options in which the runs differ, so the legend says what changed."""
    keys = sorted({key for run in runs for key in run.options} - UNCOMPARED_OPTIONS, key=_label_order)
    differing = [key for key in keys if len({json.dumps(run.options.get(key)) for run in runs}) > 1]
    labels = []
    for run in runs:
        parts = [f"{key}={_short(run.options.get(key))}" for key in differing[:LABEL_OPTIONS]]
        if len(differing) > LABEL_OPTIONS:
            parts.append("...")
        accuracy = run.metrics.get("test_accuracy")
        score = f", test {accuracy:.1%}" if accuracy is not None else ""
        labels.append(f"{run.name}{score}" + (f": {', '.join(parts)}" if parts else ""))
    return labels


def _label_order(key: str) -> tuple[int, str]:
    return (LABEL_PRIORITY.index(key) if key in LABEL_PRIORITY else len(LABEL_PRIORITY), key)


def _short(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _mark_fine_tune(ax, start: int, epochs: int, colour: str, label: str) -> None:
    ax.axvline(start + 0.5, color=colour, lw=1.5, label=f"{label} starts")
    ax.axvspan(start + 0.5, epochs + 0.5, color=colour, alpha=0.07)


def _style_axes(ax, key: str) -> None:
    names = {"accuracy": "Accuracy", "loss": "Loss", "learning_rate": "Learning rate"}
    ax.set_title(names[key])
    ax.set_xlabel("epoch")
    ax.set_ylabel(names[key].lower())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if key == "accuracy":
        ax.set_ylim(-0.02, 1.02)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    elif key == "loss":
        ax.set_ylim(bottom=0)
    else:
        ax.set_yscale("log")


def misclassified(run: RunFolder, limit: int | None = 24) -> tuple[list[Mistake], int]:
    """The test images the model got wrong, most confident first, and how many there are in all.

    Images come from the prepared test arrays (what the model saw); when that dataset is gone or was
    prepared again since, from the source files.
    """
    path = run.path / "test_predictions.csv"
    if not path.is_file():
        raise UserError(f"{run.path} has no test_predictions.csv: the run did not finish its evaluation")
    with open(path, newline="", encoding="utf-8") as handle:
        wrong = [row for row in csv.DictReader(handle) if row["correct"] == "0"]
    wrong.sort(key=lambda row: -float(row["confidence"]))
    shown = wrong if limit is None else wrong[:limit]
    images = _test_images(run)
    mistakes = [
        Mistake(
            index=int(row["index"]),
            path=row["path"],
            true=row["true"],
            predicted=row["predicted"],
            confidence=float(row["confidence"]),
            image=_image_of(run, images, int(row["index"]), row["path"]),
        )
        for row in shown
    ]
    return mistakes, len(wrong)


def _test_images(run: RunFolder) -> np.ndarray | None:
    try:
        return run.dataset().arrays("test")[0]
    except UserError:
        return None


def _image_of(run: RunFolder, images: np.ndarray | None, index: int, source: str) -> np.ndarray | None:
    if images is not None and index < len(images):
        return np.asarray(images[index])
    if not source:
        return None
    from .images import ImageError, load_array

    stored = Path(run.options.get("images_dir", ""))
    for folder in (stored, run.workspace.images):
        try:
            return load_array(folder / source, run.image_size, run.resize)
        except (ImageError, OSError, KeyError, ValueError):
            continue
    return None


def mistake_heatmaps(run: RunFolder, mistakes: Sequence[Mistake]) -> list[np.ndarray | None]:
    """Grad-CAM heatmaps (explain.py) of the mistakes' images: where the model looked when it went wrong.
    None for an image that is not found, and for all of them when the model has no feature maps (mlp)."""
    shown = [mistake.image for mistake in mistakes if mistake.image is not None]
    if not shown:
        return [None] * len(mistakes)
    from .explain import gradcam

    try:
        heatmaps = iter(gradcam(run, np.stack(shown)))
    except UserError:
        return [None] * len(mistakes)
    return [None if mistake.image is None else next(heatmaps) for mistake in mistakes]


def plot_misclassified(
    run: RunFolder, limit: int = 24, max_columns: int = 6, heatmaps: bool = True
) -> Figure | None:
    """A grid of wrongly classified test images titled with true and predicted class; None if there are none.

    With `heatmaps`, each image has its Grad-CAM heatmap drawn over it (the photo stays the first image of
    its axes)."""
    mistakes, total = misclassified(run, limit)
    if not mistakes:
        return None
    maps = mistake_heatmaps(run, mistakes) if heatmaps else [None] * len(mistakes)
    columns = min(max_columns, math.ceil(math.sqrt(len(mistakes))))
    rows = math.ceil(len(mistakes) / columns)
    figure = Figure(figsize=(max(2.3 * columns, 6.0), 2.6 * rows + 0.8), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for ax, mistake, heatmap in zip(axes, mistakes, maps, strict=False):
        if mistake.image is not None:
            ax.imshow(mistake.image)
        if heatmap is not None:
            ax.imshow(heatmap, cmap="jet", alpha=0.4, vmin=0, vmax=1, interpolation="bilinear")
        else:
            ax.text(0.5, 0.5, "image not found", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(
            f"true: {mistake.true}\npredicted: {mistake.predicted} ({mistake.confidence:.0%})",
            fontsize="small",
            color="firebrick",
        )
    for ax in axes:
        ax.set_axis_off()
    test_count = run.metrics.get("test_count")
    text = f"{total} of {test_count} test images misclassified" if test_count else f"{total} misclassified"
    if total > len(mistakes):
        text += f", the {len(mistakes)} most confident shown"
    if any(heatmap is not None for heatmap in maps):
        text += "; Grad-CAM: where the model looked"
    figure.suptitle(f"{run.name}\n{text}")
    return use_fonts_for(figure)


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_figure(figure: Figure, path: Path, dpi: int = 100) -> Path:
    """Write a figure as PNG atomically (a plot open in a viewer is never seen half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, figure_png(figure, dpi))
    return path


def plot_runs(workspace: Workspace, names: Sequence[str | Path], output: Path | None = None) -> list[Path]:
    """history.png into each run folder; for several runs also their overlay (default WORKSPACE/comparisons/)."""
    runs: list[RunFolder] = []
    for name in names:
        run = RunFolder.find(workspace, name)
        if run not in runs:
            runs.append(run)
    written = [_save(plot_history(run), run.path / "history.png") for run in runs]
    if len(runs) > 1:
        stem = "_vs_".join(run.name for run in runs[:3])
        if len(runs) > 3:
            stem += f"_and_{len(runs) - 3}_more"
        written.append(_save(plot_comparison(runs), output or workspace.root / "comparisons" / f"{stem}.png"))
    return written


def _save(figure: Figure, path: Path) -> Path:
    try:
        return save_figure(figure, path)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
