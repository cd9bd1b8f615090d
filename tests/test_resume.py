"""Resumable runs: a run killed (SIGKILL) or stopped (Ctrl-C) mid-training continues with --resume."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ANIMALS, cosine_rates, load_script, logged_learning_rates, run_script, script_command
from training_runs import RUN_FILES

from image_classifier.config import Workspace
from image_classifier.errors import UserError
from image_classifier.runs import RunFolder
from image_classifier.training.backup import TrainingState, training_log_csv

ANIMAL_OPTIONS = ["--images-dir", str(ANIMALS), "--categories", "cat,dog,horse", "--early-stopping", "0"]


def start_training(workspace: Path, *args: str, log: Path) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 (closed by the process's end)
    return subprocess.Popen(
        script_command("machine_learning.py", "--workspace", str(workspace), *args),
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "training ended before the test could interrupt it"
        assert time.monotonic() < deadline, "training never reached the point to interrupt"
        time.sleep(0.1)


def saved_state(workspace: Path) -> dict:
    states = list((workspace / "runs").glob("*/backup/state.json"))
    if not states:
        return {}
    try:
        return json.loads(states[0].read_text())
    except ValueError:
        return {}


def tensorboard_epochs(run: Path, folder: str, tag: str = "epoch_loss") -> list[int]:
    """The steps at which `tag` was logged, over every event file of logs/<folder>."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted((run / "logs" / folder).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags().get("tensors", []):
            steps += [event.step for event in accumulator.Tensors(tag)]
        elif tag in accumulator.Tags().get("scalars", []):
            steps += [event.step for event in accumulator.Scalars(tag)]
    return sorted(steps)


def assert_complete(run: Path, epochs: int) -> dict:
    assert {path.name for path in run.iterdir()} == RUN_FILES, "backup/ must go once the run is complete"
    history = pickle.loads((run / "history.pickle").read_bytes())
    assert {len(values) for values in history.values()} == {epochs}
    assert json.loads((run / "history.json").read_text()) == history
    log_lines = (run / "training_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log_lines[1:]] == [str(epoch) for epoch in range(epochs)]
    assert tensorboard_epochs(run, "train") == list(range(epochs))
    assert tensorboard_epochs(run, "validation") == list(range(epochs))
    return history


@pytest.mark.slow
def test_killed_mid_epoch_resumes_to_a_complete_run(tmp_path):
    workspace = tmp_path / "ws"
    # batches of 8: ten steps an epoch, so the kill lands inside one even on a fast machine
    options = [*ANIMAL_OPTIONS, "--model", "cnn", "--image-size", "96", "--epochs", "5", "--batch-size", "8"]
    process = start_training(workspace, *options, log=tmp_path / "first.log")
    wait_for(lambda: saved_state(workspace).get("epochs_done") == 2, process)
    wait_for(lambda: "Epoch 3/5" in (tmp_path / "first.log").read_text(), process)
    time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    saved = saved_state(workspace)
    assert saved["epochs_done"] == 2, "the kill must land in the middle of epoch 3"
    (run,) = [path for path in (workspace / "runs").iterdir() if not path.is_symlink()]
    assert not (run / "metrics.json").exists()

    resumed = run_script(
        "machine_learning.py", "--workspace", str(workspace), "--resume", "latest", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming {run} after epoch 2 (phase 1)" in resumed.stdout
    assert "Epoch 3/5" in resumed.stdout and "Epoch 1/5" not in resumed.stdout
    history = assert_complete(run, 5)
    assert {key: values[:2] for key, values in history.items()} == saved["history"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"]["epochs_run"] == 5 and metrics["test_count"] == 9
    assert (workspace / "runs" / "latest").resolve() == run
    assert all(math.isfinite(value) for value in history["val_loss"])
    # the optimizer's restored step count keeps the learning rate on the same cosine curve
    np.testing.assert_allclose(logged_learning_rates(run), cosine_rates(0.001, 5), rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_ctrl_c_in_fine_tuning_stops_after_saving_and_resumes(tmp_path):
    workspace = tmp_path / "ws"
    options = [
        *ANIMAL_OPTIONS, "--model", "mobilenet_v2", "--image-size", "96",
        "--epochs", "2", "--fine-tune-epochs", "3", "--fine-tune-layers", "20",
    ]  # fmt: skip
    log = tmp_path / "first.log"
    process = start_training(workspace, *options, log=log)
    wait_for(lambda: saved_state(workspace).get("epochs_done") == 3, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    output = log.read_text()
    assert "Stopping after this epoch" in output
    (run,) = [path for path in (workspace / "runs").iterdir() if not path.is_symlink()]
    state = saved_state(workspace)
    assert state["phase"] == "fine_tune" and state["fine_tune_start"] == 2 and state["has_optimizer"]
    stopped_after = state["epochs_done"]
    assert stopped_after in (3, 4)
    assert f"interrupted: stopped after epoch {stopped_after}, which is saved; continue with: " in output
    assert f"--resume {run.name}" in output

    resumed = run_script(
        "machine_learning.py", "--workspace", str(workspace), "--resume", run.name, cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {stopped_after} (phase 2)" in resumed.stdout
    assert "Phase 1" not in resumed.stdout and "Phase 2: fine-tuning" in resumed.stdout
    assert_complete(run, 5)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"]["fine_tune_start_epoch"] == 2


def test_resume_refuses_other_options_and_finished_runs(tmp_path):
    workspace = tmp_path / "ws"
    trained = run_script(
        "machine_learning.py", "--workspace", str(workspace), *ANIMAL_OPTIONS,
        "--model", "mlp", "--image-size", "16", "--epochs", "2", cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    run = (workspace / "runs" / "latest").resolve()

    finished = run_script(
        "machine_learning.py", "--workspace", str(workspace), "--resume", run.name, cwd=tmp_path
    )
    assert finished.returncode == 2
    assert (
        finished.stderr.strip()
        == f"error: run {workspace / 'runs' / run.name} finished already; there is nothing to resume"
    )

    (run / "metrics.json").unlink()  # as if it had been killed before the end
    before = (run / "config.json").read_bytes()
    other = run_script(
        "machine_learning.py", "--workspace", str(workspace), "--resume", "latest", "--epochs", "9",
        "--model", "mlp", cwd=tmp_path,
    )  # fmt: skip
    assert other.returncode == 2
    assert "--epochs 9 (the run has 2)" in other.stderr and "--model" not in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert (run / "config.json").read_bytes() == before

    missing = run_script(
        "machine_learning.py", "--workspace", str(workspace), "--resume", "nope", cwd=tmp_path
    )
    assert missing.returncode == 2 and "no run folder nope to resume" in missing.stderr

    neither = run_script("machine_learning.py", "--workspace", str(workspace), cwd=tmp_path)
    assert neither.returncode == 2 and "--categories (or --resume RUN)" in neither.stderr


def test_latest_is_the_newest_unfinished_run(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    with pytest.raises(UserError, match="no unfinished run"):
        RunFolder.find_resumable(workspace, "latest")
    for name, finished in (
        ("20260101-000000-cnn", False),
        ("20260102-000000-cnn", False),
        ("20260103-000000-cnn", True),
    ):
        run = workspace.runs / name
        run.mkdir(parents=True)
        (run / "config.json").write_text("{}")
        if finished:
            (run / "metrics.json").write_text("{}")
    assert RunFolder.find_resumable(workspace, "latest").name == "20260102-000000-cnn"
    assert RunFolder.find_resumable(workspace, "20260101-000000-cnn").name == "20260101-000000-cnn"


def test_history_pads_metrics_that_appear_later():
    state = TrainingState()
    state.record(0, {"loss": 1.0})
    state.record(1, {"loss": 0.5, "val_loss": 0.7})
    assert state.epochs_done == 2
    assert state.history["loss"] == [1.0, 0.5]
    assert math.isnan(state.history["val_loss"][0]) and state.history["val_loss"][1] == 0.7
    assert training_log_csv(state.history).decode().splitlines() == [
        "epoch,loss,val_loss",
        "0,1.0,nan",
        "1,0.5,0.7",
    ]


def test_given_options_are_only_those_typed():
    parser = load_script("machine_learning.py").build_parser()
    given = vars(
        parser.parse_args(["--resume", "latest", "--epochs", "4", "--augment", "--dense-units", "8,4"])
    )
    given.pop("workspace")
    assert given == {"resume": "latest", "epochs": 4, "augment": True, "dense_units": [8, 4]}
