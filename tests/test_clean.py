"""clean.py: the review ranks a planted wrong label and a duplicate, --apply auto and decisions record them
beside the photos (never on them), the page saves decisions in headless Chromium, and bad input is refused.

One review (MobileNetV2 at 64 px on generated photos, features on keras) is made once for the module with
--apply auto; the other tests record decisions on it and undo them, and reuse its cached features.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, make_image_folders, run_script, script_command, synthetic_photo, tree_digest
from test_tensorboard_browser import CHROMIUM_ARGS, chromium, free_port  # noqa: F401 (a fixture)

from image_classifier.cleaning import REVIEW_FIELDS
from image_classifier.config import Workspace
from image_classifier.decisions import EXCLUDE_FILE, RELABEL_FILE, read_decisions
from image_classifier.preprocess import PreprocessOptions, prepare_dataset

CATEGORIES = "red,blue,green"
PLANTED = "blue/img_900.jpg"
"""A red photo filed under blue."""
COPY = "green/img_901.jpg"
"""A byte-identical copy of green/img_004.jpg."""


@dataclass
class Reviewed:
    images: Path
    workspace: Path
    args: list[str]
    photos: dict
    output: str

    @property
    def review(self) -> Path:
        return self.workspace / "images" / "review"

    def rows(self) -> list[dict]:
        with open(self.review / "review.csv", newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    def undo(self) -> None:
        """Back to the decisions --apply auto recorded."""
        shutil.copy(self.review / "auto-exclude.txt", self.images / EXCLUDE_FILE)
        (self.images / RELABEL_FILE).unlink(missing_ok=True)


def photos_only(images: Path) -> dict:
    return {k: v for k, v in tree_digest(images).items() if k not in (EXCLUDE_FILE, RELABEL_FILE)}


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory, keras_home) -> Reviewed:
    from PIL import Image

    root = tmp_path_factory.mktemp("clean")
    images = make_image_folders(root / "images", {"red": 14, "blue": 14, "green": 14})
    Image.fromarray(synthetic_photo(0, 500)).save(images / PLANTED)
    shutil.copy(images / "green" / "img_004.jpg", images / COPY)
    photos = photos_only(images)
    args = ["--categories", CATEGORIES, "--images-dir", str(images), "--workspace", str(root / "ws")]
    args += ["--image-size", "64", "--engine", "keras", "--workers", "1"]
    done = run_script("clean.py", *args, "--apply", "auto", cwd=root)
    assert done.returncode == 0, done.stderr
    shutil.copy(images / EXCLUDE_FILE, root / "ws" / "images" / "review" / "auto-exclude.txt")
    return Reviewed(images, root / "ws", args, photos, done.stdout)


def test_review_ranks_the_wrong_label_and_the_copy_and_auto_excludes_the_flagged(reviewed):
    rows = reviewed.rows()
    with open(reviewed.review / "review.csv", encoding="utf-8") as handle:
        assert handle.readline().strip() == ",".join(REVIEW_FIELDS)
    planted = [row for row in rows if row["file"] == PLANTED]
    assert planted and planted[0]["issue"] == "label" and planted[0]["suggested"] == "red"
    assert [row["issue"] for row in rows if row["file"] == COPY] == ["duplicate"]
    for issue in ("label", "off-topic", "duplicate"):
        ranks = [int(row["rank"]) for row in rows if row["issue"] == issue]
        scores = [float(row["score"]) for row in rows if row["issue"] == issue]
        assert ranks == list(range(1, len(ranks) + 1)) and scores == sorted(scores, reverse=True)
    page = (reviewed.review / "review.html").read_text(encoding="utf-8")
    assert page.count('class="photo"') == len(rows) and page.count("data:image/jpeg;base64,") == len(rows)
    flagged = {row["file"] for row in rows if row["issue"] in ("label", "off-topic")}
    assert read_decisions(reviewed.images).excluded == flagged
    assert "--apply auto excluded" in reviewed.output
    options = PreprocessOptions(
        categories=tuple(CATEGORIES.split(",")), images_dir=reviewed.images, image_size=64
    )
    dataset = prepare_dataset(options, Workspace(reviewed.workspace), print_fn=lambda *_: None)
    used = {name for split in ("train", "validation", "test") for name in dataset.source_files(split)}
    assert used and not used & flagged, "preprocessing leaves the excluded photos out"
    assert photos_only(reviewed.images) == reviewed.photos


def test_a_decisions_file_is_recorded_beside_the_photos(reviewed, tmp_path):
    kept = sorted(read_decisions(reviewed.images).excluded - {PLANTED, COPY})[0]
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(f"file,decision,category\n{COPY},exclude,\n{PLANTED},move,red\n{kept},keep,\n")
    try:
        done = run_script("clean.py", *reviewed.args, "--decisions", str(decisions), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        recorded = read_decisions(reviewed.images)
        assert COPY in recorded.excluded and kept not in recorded.excluded
        assert recorded.relabeled == {PLANTED: "red"} and PLANTED not in recorded.excluded
        assert (reviewed.review / "decisions.csv").read_text() == decisions.read_text()
        assert photos_only(reviewed.images) == reviewed.photos
    finally:
        reviewed.undo()


@pytest.mark.parametrize(
    "line, expected",
    [
        ("red/img_999.jpg,exclude,", "no photo 'red/img_999.jpg'"),
        (f"{COPY},move,purple", "'purple' is not a category"),
    ],
)
def test_a_decisions_file_naming_an_unknown_photo_or_category_changes_nothing(
    reviewed, tmp_path, line, expected
):
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(f"file,decision,category\n{COPY},exclude,\n{line}\n")
    before = tree_digest(reviewed.images), tree_digest(reviewed.workspace)
    done = run_script("clean.py", *reviewed.args, "--decisions", str(decisions), cwd=tmp_path)
    assert done.returncode == 2 and expected in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert (tree_digest(reviewed.images), tree_digest(reviewed.workspace)) == before


def test_decisions_on_a_stale_review_or_too_few_photos_for_the_folds_are_refused(reviewed, tmp_path):
    from PIL import Image

    decisions = tmp_path / "decisions.csv"
    decisions.write_text(f"file,decision,category\n{COPY},exclude,\n")
    before = tree_digest(reviewed.workspace)
    added = reviewed.images / "red" / "img_800.jpg"
    Image.fromarray(synthetic_photo(0, 800)).save(added)
    try:
        done = run_script("clean.py", *reviewed.args, "--decisions", str(decisions), cwd=tmp_path)
        assert done.returncode == 2 and "changed since the review" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    finally:
        added.unlink()
    done = run_script("clean.py", *reviewed.args, "--folds", "20", cwd=tmp_path)
    assert done.returncode == 2 and "too few photos for 20 folds" in done.stderr.splitlines()[-1]
    assert tree_digest(reviewed.workspace) == before
    assert (reviewed.images / EXCLUDE_FILE).read_bytes() == (
        reviewed.review / "auto-exclude.txt"
    ).read_bytes()


def wait_for_page(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"clean.py --serve did not answer on {url}: {process.stderr.read()}")
            time.sleep(0.3)


@pytest.mark.skipif(
    os.environ.get("SKIP_BROWSER_TESTS") == "1", reason="SKIP_BROWSER_TESTS=1: no browser here"
)
def test_the_page_saves_marked_photos_through_the_local_server(reviewed, chromium, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    port = free_port()
    command = script_command("clean.py", *reviewed.args, "--serve", "--port", str(port))
    process = subprocess.Popen(command, cwd=tmp_path, env=dict(os.environ), stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_page(url, process)
        forged = urllib.request.Request(url + "decisions", data=f"file,decision,category\n{COPY},exclude,\n".encode(),
                                        headers={"Content-Type": "text/plain"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(forged, timeout=5)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(url)
                copy = page.locator(f'figure[data-file="{COPY}"]')
                copy.locator('input[value="exclude"]').check()
                planted = page.locator(f'figure[data-file="{PLANTED}"]')
                planted.locator('input[value="move"]').check()
                planted.locator("select").select_option("green")
                page.click("#save")
                page.locator("#status.saved").wait_for(timeout=30_000)
                assert "Recorded 1 excluded, 1 moved" in page.locator("#status").inner_text()
            finally:
                browser.close()
        recorded = read_decisions(reviewed.images)
        assert COPY in recorded.excluded and recorded.relabeled == {PLANTED: "green"}
        assert COPY in (reviewed.images / EXCLUDE_FILE).read_text().splitlines()
        assert photos_only(reviewed.images) == reviewed.photos
    finally:
        process.terminate()
        process.wait(timeout=10)
        reviewed.undo()


def test_the_notebook_section_shows_the_same_ranking(reviewed):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebook" / "history.ipynb", as_version=4)
    setup = [cell for cell in notebook.cells if "reports.find_workspace()" in cell.source]
    section = [cell for cell in notebook.cells if "cleaning.read_review" in cell.source]
    assert len(setup) == 1 and len(section) == 1
    notebook.cells = setup + section
    env = {**os.environ, "WORKSPACE": str(reviewed.workspace)}
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute(env=env)
    text = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    planted = next(row for row in reviewed.rows() if row["file"] == PLANTED)
    assert f"Review of {len(reviewed.photos) - 1} photos" in text, (
        "every photo but the copy preprocessing left out"
    )
    assert f"{planted['rank']:>4}  {PLANTED}" in text and "blue -> red" in text
