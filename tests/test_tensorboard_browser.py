"""TensorBoard over real runs, opened in headless Chromium: what a person sees, not just what is on disk.

Needs Debian's chromium (`apt-get install -y chromium`); without it this test fails, because CI installs
it. SKIP_BROWSER_TESTS=1 skips it on a machine that cannot have a browser. Screenshots go to
test-artifacts/ and their paths are printed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
RENDER_TIMEOUT_MS = 60_000

pytestmark = pytest.mark.skipif(
    os.environ.get("SKIP_BROWSER_TESTS") == "1", reason="SKIP_BROWSER_TESTS=1: no browser on this machine"
)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Checked before any training, so a machine without Chromium fails in a second, not a minute."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail(
            f"Chromium not found (looked for {path}): install Debian's with `apt-get install -y chromium`, "
            "point $CHROMIUM at another build, or set SKIP_BROWSER_TESTS=1 to skip the browser checks",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def tensorboard(trained_runs, tmp_path):
    """A TensorBoard on 127.0.0.1 over the runs folder, as `docker compose up tensorboard` serves it."""
    port = free_port()
    log = open(tmp_path / "tensorboard.log", "w+")  # noqa: SIM115  (closed below, after the process)
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(trained_runs.workspace.runs)]
        + ["--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"TensorBoard did not answer on {url}:\n{log.read()}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def screenshot(page, name: str, capsys) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\n  screenshot: {path}")
    return path


def wait_for_texts(page, texts: list[str], name: str, capsys) -> None:
    """Wait until every text is rendered (TensorBoard loads runs and tags over XHR); on failure, keep a screenshot."""
    for text in texts:
        try:
            page.get_by_text(text, exact=True).first.wait_for(state="visible", timeout=RENDER_TIMEOUT_MS)
        except Exception as error:
            shot = screenshot(page, f"{name}-failed", capsys)
            pytest.fail(f"{text!r} never appeared on the {name} page (see {shot}): {error}", pytrace=False)


def test_tensorboard_shows_the_runs_their_scalars_hparams_and_images(
    chromium, trained_runs, tensorboard, capsys
):
    from playwright.sync_api import sync_playwright

    transfer, cnn = trained_runs.transfer.name, trained_runs.cnn.name
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            page.goto(tensorboard + "#timeseries")
            wait_for_texts(
                page,
                [
                    f"{transfer}/logs/train",
                    f"{transfer}/logs/validation",
                    f"{cnn}/logs/test",
                    "epoch_accuracy",
                    "epoch_loss",
                    "epoch_learning_rate",
                    "misclassified_test_images",
                ],
                "tensorboard-timeseries",
                capsys,
            )
            tag_filter = page.get_by_role("combobox", name="Filter tags (regex)")
            for pattern, hidden, name in (
                ("epoch_", "confusion_matrix", "tensorboard-scalars"),
                ("misclassified", "epoch_loss", "tensorboard-images"),
            ):
                tag_filter.fill(pattern)
                tag_filter.press("Escape")
                page.get_by_text(hidden, exact=True).first.wait_for(state="hidden", timeout=RENDER_TIMEOUT_MS)
                page.wait_for_timeout(2000)  # charts animate in; the picture is for people
                screenshot(page, name, capsys)

            page.goto(tensorboard + "#hparams")
            wait_for_texts(
                page, [transfer, cnn, "learning_rate", "fine_tune_epochs"], "tensorboard-hparams", capsys
            )
            screenshot(page, "tensorboard-hparams", capsys)
        finally:
            browser.close()
