"""notebook/history.ipynb runs top to bottom, unedited, against a real run, the way Jupyter runs it."""

from __future__ import annotations

import os

import nbformat
from conftest import ROOT
from nbclient import NotebookClient

NOTEBOOK = ROOT / "notebook" / "history.ipynb"
ARTIFACTS = ROOT / "test-artifacts"


def execute(notebook, cwd):
    """Run every cell in a fresh kernel started in `cwd`, as Jupyter does for a notebook in that folder."""
    env = {key: value for key, value in os.environ.items() if key != "WORKSPACE"}
    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute(env=env)
    return notebook


def outputs(notebook, kind: str) -> list:
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if kind == "text" and output.get("name") == "stdout":
                found.append(output["text"])
            elif kind in output.get("data", {}):
                found.append(output["data"][kind])
    return found


def test_the_notebook_shows_the_latest_run_found_from_the_notebook_folder(trained_runs):
    """A checkout's layout: the kernel starts in notebook/, the runs are in ../workspace, no $WORKSPACE."""
    notebook_dir = trained_runs.base / "notebook"
    notebook_dir.mkdir(exist_ok=True)

    executed = execute(nbformat.read(NOTEBOOK, as_version=4), notebook_dir)

    ARTIFACTS.mkdir(exist_ok=True)
    nbformat.write(executed, ARTIFACTS / "history-executed.ipynb")
    text = "".join(outputs(executed, "text"))
    assert f"run folder:       {trained_runs.transfer.resolve()}" in text
    assert "fine-tuning from: epoch 3" in text
    assert "true red, predicted" in text, "the misclassified photos are listed"
    assert "test ECE:" in text and '"none of these":' in text
    # curves, confusion matrix, misclassified grid, reliability diagram, comparison of the last three runs
    assert len(outputs(executed, "image/png")) == 5


def test_one_cell_chooses_another_run(trained_runs):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    choose = [cell for cell in notebook.cells if cell.source.startswith('RUN = "latest"')]
    assert len(choose) == 1, "one cell holds the choice of run"
    choose[0].source = choose[0].source.replace('RUN = "latest"', f"RUN = {trained_runs.cnn.name!r}", 1)

    executed = execute(notebook, trained_runs.base)

    text = "".join(outputs(executed, "text"))
    assert f"run folder:       {trained_runs.cnn.resolve()}" in text
    assert "fine-tuning from" not in text
    assert len(outputs(executed, "image/png")) == 5


def test_the_notebook_is_checked_in_without_outputs():
    """Outputs would hold someone's photos and paths, and make every run a diff."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
