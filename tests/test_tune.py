"""scripts/tune.py: a KerasTuner search on cached features of generated photos, stopped by --max-minutes and
resumed, whose best.json trains again with --config; and the bad input it refuses before writing anything."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import make_image_folders, run_script, tree_digest

from image_classifier.tuning import Progress, TuneOptions

SEARCH = ("--categories", "red,blue,green", "--image-size", "32", "--epochs", "3", "--feature-layers", "final",
          "--engine", "keras")  # fmt: skip
"""Generated photos at 32 px, the backbone run by TensorFlow itself (no LiteRT conversion in a fresh workspace)."""


def trial_records(folder: Path) -> dict[str, dict]:
    return {
        path.parent.name: json.loads(path.read_text())
        for path in sorted((folder / "trials").glob("trial_*/trial.json"))
    }


def hparams_trials(logs: Path) -> set[str]:
    """The trials whose TensorBoard logs hold an HParams session start (their hyperparameters)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found = set()
    for path in logs.glob("*/execution0/events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            if any(value.tag == "_hparams_/session_start_info" for value in event.summary.value):
                found.add(path.parent.parent.name)
    return found


def test_a_stopped_search_resumes_and_its_best_json_trains_again(tmp_path):
    images = make_image_folders(tmp_path / "images", {"red": 12, "blue": 12, "green": 12})
    workspace = tmp_path / "ws"
    common = ("--workspace", str(workspace), "--images-dir", str(images))
    first = run_script("tune.py", *common, *SEARCH, "--trials", "3", "--max-minutes", "0.01", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (folder,) = (workspace / "tuning").iterdir()
    assert "Trial 0 (1/3 done)" in first.stdout and "left of --max-minutes" in first.stdout
    assert "Stopped after 1 of 3 trials" in first.stdout and f"--resume {folder.name}" in first.stdout
    before = trial_records(folder)
    assert list(before) == ["trial_0"] and before["trial_0"]["status"] == "COMPLETED"
    assert json.loads((folder / "best.json").read_text())["search"]["trials"] == 1

    again = run_script("tune.py", *common, "--resume", "--max-minutes", "20", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"Resuming search {folder}" in again.stdout
    after = trial_records(folder)
    assert list(after) == ["trial_0", "trial_1", "trial_2"], again.stdout
    assert after["trial_0"] == before["trial_0"]  # continued, not started over
    assert all(record["status"] == "COMPLETED" for record in after.values())
    assert hparams_trials(folder / "logs") == {"0", "1", "2"}
    assert "Best 3 trials" in again.stdout and "3/3 done" in again.stdout

    best = json.loads((folder / "best.json").read_text())
    scores = {record["trial_id"]: record["score"] for record in after.values()}
    assert best["search"]["validation_loss"] == min(scores.values()) == scores[best["search"]["best_trial"]]
    assert best["search"]["trials"] == 3
    tuned_run = workspace / "runs" / best["run"]["name"]
    assert json.loads((tuned_run / "config.json").read_text())["options"] == best["options"]
    metrics = json.loads((tuned_run / "metrics.json").read_text())
    assert best["run"]["test_accuracy"] == metrics["test_accuracy"]
    values = after[f"trial_{best['search']['best_trial']}"]["hyperparameters"]["values"]
    options = best["options"]
    assert options["learning_rate"] == pytest.approx(values["learning_rate"])
    assert (options["optimizer"], options["batch_size"]) == (values["optimizer"], values["batch_size"])
    assert ",".join(options["feature_layers"]) == values["feature_layers"]
    assert options["feature_views"] == values["feature_views"] and options["epochs"] == 3

    trained = run_script("machine_learning.py", "--workspace", str(workspace), "--config",
                         str(folder / "best.json"), "--epochs", "2", cwd=tmp_path)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    latest = json.loads((workspace / "runs" / "latest" / "config.json").read_text())["options"]
    assert latest == {**options, "epochs": 2}

    refuse_bad_config_files(tmp_path, workspace, folder)
    done = run_script("tune.py", *common, "--resume", folder.name, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: search {folder.name} has run its 3 trials already; give --trials N (more than 3) to continue "
        f"it, or train its best with scripts/machine_learning.py --config {folder / 'best.json'}"
    ]


def refuse_bad_config_files(tmp_path: Path, workspace: Path, folder: Path) -> None:
    """--config with a file of the search that is not best.json, or with an option this version lacks."""
    trial = folder / "trials" / "trial_0" / "trial.json"
    old = tmp_path / "old-best.json"
    best = json.loads((folder / "best.json").read_text())
    old.write_text(json.dumps({**best, "options": {**best["options"], "head_layers": 2}}))
    expected = {
        trial: f"error: --config {trial} is not a run's config.json or a tuning best.json (none of its keys is "
        "an option, such as best_step, hyperparameters, message); give one of those",
        old: f"error: --config {old} has options this version does not know: head_layers; remove them",
        folder / "trials" / "trial_0" / "checkpoint.weights.h5": None,
    }
    digest = tree_digest(workspace)
    for path, message in expected.items():
        result = run_script(
            "machine_learning.py", "--workspace", str(workspace), "--config", str(path), cwd=tmp_path
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"--config {path}" in lines[0], lines
        assert message is None or lines == [message]
    assert tree_digest(workspace) == digest


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--trials", "0"), "argument --trials: expected a whole number above 0, got 0"),
        (
            ("--image-size", "160,16"),
            "error: mobilenet_v2 cannot take 16x16 images; use --image-size 32 or more",
        ),
        (("--feature-views", "0"), "argument --feature-views: expected view counts of 1 or more"),
        (("--resume", "nowhere"), "error: no search folder nowhere"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, arguments, message):
    images = make_image_folders(tmp_path / "images", {"red": 3, "blue": 3})
    workspace = tmp_path / "ws"
    result = run_script("tune.py", "--workspace", str(workspace), "--images-dir", str(images),
                        "--categories", "red,blue", *arguments, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not workspace.exists()


class Trial:
    def __init__(self, trial_id: str, score: float):
        self.trial_id, self.score, self.status = trial_id, score, "COMPLETED"


class Oracle:
    """What Progress reads of KerasTuner's oracle: its trials and the best of them."""

    def __init__(self, trials: list[Trial]):
        self.trials = {trial.trial_id: trial for trial in trials}

    def get_best_trials(self, count: int) -> list[Trial]:
        return sorted(self.trials.values(), key=lambda trial: trial.score)[:count]


def test_max_minutes_stops_before_a_trial_that_would_end_too_late():
    lines = []
    options = TuneOptions(categories=("a", "b"), images_dir=Path("x"), trials=30, max_minutes=1)
    progress = Progress(options, time.monotonic() - 35, lines.append)
    progress.trial_started = time.monotonic() - 10
    assert not progress.end(
        Trial("00", 0.5), Oracle([Trial("00", 0.5)])
    )  # 35 s + a 10 s trial + the final run fit in 60 s
    progress.started -= 15  # 50 s after the start
    progress.trial_started = time.monotonic() - 10
    trials = [Trial("00", 0.5), Trial("01", 0.4)]
    assert progress.end(trials[1], Oracle(trials)) and progress.stopped_early  # 50 s + 20 s would not
    assert lines[-1].startswith(
        "Trial 01 (2/30 done) in 10.0s: val_loss 0.4000; best 0.4000 (trial 01); 28 to go"
    )
    assert lines[-1].endswith("left of --max-minutes")
    progress.trials = 2
    assert not progress.end(trials[1], Oracle(trials))  # none left to start
