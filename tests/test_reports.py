"""Training curves, run overlays and the misclassified grid, drawn from real (tiny) training runs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script, run_script

from image_classifier import reports
from image_classifier.config import Workspace
from image_classifier.dataset import load_dataset
from image_classifier.errors import UserError
from image_classifier.images import load_array
from image_classifier.runs import RunFolder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def labelled_lines(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def wrong_rows(run: Path) -> list[dict]:
    with open(run / "test_predictions.csv", newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row["correct"] == "0"]


def test_history_plot_marks_best_epoch_and_where_fine_tuning_began(trained_runs):
    record = RunFolder.find(trained_runs.workspace, "latest")
    assert record.path == trained_runs.transfer.resolve()
    metrics = json.loads((trained_runs.transfer / "metrics.json").read_text())
    assert record.fine_tune_start == metrics["training"]["fine_tune_start_epoch"] == 2
    assert record.epochs == 3
    # the kept weights are those of the lowest validation loss over both phases, as the run's history shows
    history = json.loads((trained_runs.transfer / "history.json").read_text())
    best = int(np.argmin(history["val_loss"]))
    assert metrics["training"]["best_epoch"] == best
    assert record.best_epoch == best

    figure = reports.plot_history(record)

    accuracy, loss = figure.axes[:2]
    assert (accuracy.get_title(), loss.get_title()) == ("Accuracy", "Loss")
    assert accuracy.get_xlabel() == loss.get_xlabel() == "epoch"
    assert trained_runs.transfer.name in figure.get_suptitle()
    assert f"{metrics['test_accuracy']:.1%}" in figure.get_suptitle()
    for ax, key in ((accuracy, "accuracy"), (loss, "loss")):
        lines = labelled_lines(ax)
        np.testing.assert_allclose(lines["training"].get_ydata(), record.history[key])
        np.testing.assert_allclose(lines["validation"].get_ydata(), record.history[f"val_{key}"])
        np.testing.assert_array_equal(lines["training"].get_xdata(), [1, 2, 3])
        assert list(lines[f"best epoch {best + 1} (kept)"].get_xdata()) == [best + 1, best + 1]
        assert list(lines["fine-tuning starts"].get_xdata()) == [2.5, 2.5], "between epochs 2 and 3"
        legend = [text.get_text() for text in ax.get_legend().get_texts()]
        assert {"training", "validation", "fine-tuning starts"} <= set(legend)
        star = next(line for line in ax.get_lines() if line.get_marker() == "*")
        assert star.get_xdata()[0] == best + 1
        assert star.get_ydata()[0] == pytest.approx(record.history[f"val_{key}"][best])


def test_one_phase_run_has_no_fine_tuning_marker(trained_runs):
    record = RunFolder.find(trained_runs.workspace, trained_runs.cnn.name)
    assert record.fine_tune_start is None
    figure = reports.plot_history(record)
    for ax in figure.axes:
        assert "fine-tuning starts" not in labelled_lines(ax)


def test_comparison_overlays_runs_and_names_what_differs(trained_runs):
    records = [
        RunFolder.find(trained_runs.workspace, path) for path in (trained_runs.cnn, trained_runs.cnn_faster)
    ]

    figure = reports.plot_comparison(records)

    legend_texts = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert any(trained_runs.cnn.name in text and "learning_rate=0.001" in text for text in legend_texts)
    assert any(
        trained_runs.cnn_faster.name in text and "learning_rate=0.003" in text for text in legend_texts
    )
    assert not any("image_size" in text for text in legend_texts), "only options that differ are named"
    accuracy = figure.axes[0]
    plotted = [list(line.get_ydata()) for line in accuracy.get_lines()]
    for record in records:
        assert record.history["val_accuracy"] in plotted and record.history["accuracy"] in plotted


def test_misclassified_images_are_what_the_model_saw_most_confident_first(trained_runs):
    record = RunFolder.find(trained_runs.workspace, trained_runs.cnn.name)
    rows = wrong_rows(trained_runs.cnn)
    assert rows, "the blue photos planted under test/red (training_runs.PLANTED) make every run misclassify"

    mistakes, total = reports.misclassified(record, limit=None)

    assert total == len(mistakes) == len(rows)
    confidences = [mistake.confidence for mistake in mistakes]
    assert confidences == sorted(confidences, reverse=True)
    x_test, y_test = load_dataset(Path(record.config["data"]["dataset"])).arrays("test")
    labels = json.loads((trained_runs.cnn / "labels.json").read_text())
    for mistake in mistakes:
        np.testing.assert_array_equal(mistake.image, x_test[mistake.index])
        assert mistake.true == labels[y_test[mistake.index]] != mistake.predicted
    assert {mistake.path: (mistake.true, mistake.predicted) for mistake in mistakes} == {
        row["path"]: (row["true"], row["predicted"]) for row in rows
    }, "the same mistakes as the run's own test_predictions.csv"

    figure = reports.plot_misclassified(record, limit=1)
    shown = [ax for ax in figure.axes if ax.get_images()]
    assert len(shown) == 1
    assert shown[0].get_title() == (
        f"true: {mistakes[0].true}\npredicted: {mistakes[0].predicted} ({mistakes[0].confidence:.0%})"
    )
    np.testing.assert_array_equal(shown[0].get_images()[0].get_array(), mistakes[0].image)
    assert f"\n{total} of {record.metrics['test_count']} test images misclassified" in figure.get_suptitle()
    assert ("the 1 most confident shown" in figure.get_suptitle()) == (total > 1)


def test_misclassified_images_come_from_the_source_files_when_the_dataset_is_gone(trained_runs, tmp_path):
    moved = Workspace(tmp_path / "elsewhere")
    copy = moved.runs / trained_runs.cnn.name
    shutil.copytree(trained_runs.cnn, copy)
    config = json.loads((copy / "config.json").read_text())
    config["data"]["dataset"] = str(tmp_path / "deleted-dataset")
    (copy / "config.json").write_text(json.dumps(config))
    record = RunFolder.find(moved, copy.name)

    mistakes, _ = reports.misclassified(record)

    first = mistakes[0]
    np.testing.assert_array_equal(
        first.image, load_array(trained_runs.images / first.path, 32, record.options["resize"])
    )

    config["options"]["images_dir"] = str(tmp_path / "no-images-either")
    (copy / "config.json").write_text(json.dumps(config))
    record = RunFolder.find(moved, copy.name)
    assert all(mistake.image is None for mistake in reports.misclassified(record)[0])
    figure = reports.plot_misclassified(record)
    assert any(text.get_text() == "image not found" for ax in figure.axes for text in ax.texts)


def test_plot_history_script_writes_each_run_and_an_overlay(trained_runs, tmp_path):
    workspace = str(trained_runs.workspace.root)
    overlay = tmp_path / "compare.png"

    done = run_script(
        "plot_history.py",
        "--workspace",
        workspace,
        trained_runs.cnn.name,
        str(trained_runs.cnn_faster),
        "--output",
        str(overlay),
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    for path in (trained_runs.cnn / "history.png", trained_runs.cnn_faster / "history.png", overlay):
        assert path.read_bytes().startswith(PNG_MAGIC)
        assert f"Wrote {path}" in done.stdout

    missing = run_script("plot_history.py", "--workspace", workspace, "no-such-run", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: no run folder no-such-run (looked for config.json in no-such-run and in "
        f"{trained_runs.workspace.runs / 'no-such-run'})"
    ]


def test_the_script_plots_the_latest_run_by_default(trained_runs, capsys):
    script = load_script("plot_history.py")

    script.main(["--workspace", str(trained_runs.workspace.root)])

    written = trained_runs.transfer.resolve() / "history.png"
    assert capsys.readouterr().out.splitlines() == [f"Wrote {written}"], "one run: no overlay"
    assert written.read_bytes().startswith(PNG_MAGIC)


def test_default_overlay_goes_to_the_comparisons_folder(trained_runs):
    cnn, transfer = trained_runs.cnn, trained_runs.transfer
    written = reports.plot_runs(trained_runs.workspace, [cnn.name, "latest", transfer.name])

    assert written[:2] == [cnn.resolve() / "history.png", transfer.resolve() / "history.png"]
    assert written[2] == trained_runs.workspace.root / "comparisons" / f"{cnn.name}_vs_{transfer.name}.png"
    assert written[2].read_bytes().startswith(PNG_MAGIC)


def test_workspace_is_found_from_a_checkout_root_notebook_folder_or_env(tmp_path, monkeypatch):
    (tmp_path / "workspace").mkdir()
    (tmp_path / "notebook").mkdir()
    assert reports.find_workspace(tmp_path).root == tmp_path / "workspace"
    assert reports.find_workspace(tmp_path / "notebook").root == tmp_path / "workspace"
    monkeypatch.setenv("WORKSPACE", str(tmp_path / "mine"))
    assert reports.find_workspace(tmp_path / "notebook").root == tmp_path / "mine"


def test_a_run_without_history_is_a_clear_error(tmp_path):
    workspace = Workspace(tmp_path)
    with pytest.raises(UserError, match="no training run in"):
        RunFolder.find(workspace)
    broken = workspace.runs / "20250101-000000-cnn"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text('{"options": {"image_size": 32}}')
    with pytest.raises(UserError, match="has not finished training; continue it with"):
        RunFolder.find(workspace, broken.name)
    (broken / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match="is incomplete"):
        RunFolder.find(workspace, broken.name)
    (broken / "labels.json").write_text('["a", "b"]')
    (broken / "model.keras").write_bytes(b"")
    with pytest.raises(UserError, match="has no history.pickle"):
        reports.plot_history(RunFolder.find(workspace, broken.name))
