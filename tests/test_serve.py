"""scripts/serve.py for real: the API against a trained run, every bad request refused with its reason while
the server goes on, no request forgery through image URLs, and the page in headless Chromium.

The servers run in this process on 127.0.0.1 (port 0: a free one), over a copy of the session's `cnn_run` workspace with a second run. Image URLs
point at a small HTTP server the tests start on 127.0.0.2, which the server under test is told to allow
(--allow-networks 127.0.0.2/32) the way an operator allows a LAN: 127.0.0.1 itself stays forbidden, so a
redirect from the allowed host back to 127.0.0.1 is exactly the forgery the guard must stop.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import ANIMALS, run_script, script_command, tree_digest
from PIL import Image

from image_classifier import serving
from image_classifier.config import Workspace
from image_classifier.predict import PredictOptions, run_predict
from image_classifier.serving import AddressGuard, BlockedAddress, ServeOptions, start_server

IMAGE_HOST = "127.0.0.2"


@dataclass(frozen=True)
class Served:
    """A copy of the session's cnn_run workspace holding a second finished run, for the run selector."""

    workspace: Workspace
    images: Path
    run: Path
    second: Path


@pytest.fixture(scope="module")
def served(cnn_run, tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("served") / "workspace"
    shutil.copytree(cnn_run.workspace.root, root, symlinks=True)
    workspace = Workspace(root)
    run = workspace.runs / cnn_run.run.name
    second = workspace.runs / f"{run.name}-second"
    shutil.copytree(run, second)
    return Served(workspace, cnn_run.images, run, second)


@pytest.fixture(scope="module")
def photos(served) -> list[Path]:
    return (
        sorted((served.images / "red").glob("*.jpg"))[:2] + sorted((served.images / "blue").glob("*.jpg"))[:1]
    )


def start(served, capsys=None, **options):
    server = start_server(ServeOptions(port=0, **options), served.workspace)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def stop(server) -> None:
    server.shutdown()
    server.server_close()
    server.models.close()


@pytest.fixture(scope="module")
def server(served):
    running = start(served, allow_networks=(f"{IMAGE_HOST}/32",), max_mb=1.0)
    yield running
    stop(running)


class ImageSite(BaseHTTPRequestHandler):
    """Photos, a page, and redirects: what an image URL can lead to."""

    files: dict[str, tuple[str, bytes]] = {}
    redirects: dict[str, str] = {}

    def do_GET(self):
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        content_type, body = self.files.get(self.path, ("text/plain", b"not found"))
        self.send_response(200 if self.path in self.files else 404)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_site(photos, server):
    site = ThreadingHTTPServer((IMAGE_HOST, 0), ImageSite)
    base = f"http://{IMAGE_HOST}:{site.server_address[1]}"
    target = f"http://127.0.0.1:{server.server_address[1]}"
    ImageSite.files = {
        "/photo.jpg": ("image/jpeg", photos[0].read_bytes()),
        "/page.html": ("text/html", b"<!doctype html><html><body>a gallery</body></html>"),
    }
    ImageSite.redirects = {
        "/to-loopback": f"{target}/health",
        "/to-localhost": f"http://localhost:{server.server_address[1]}/health",
        "/to-private": "http://10.20.30.40/photo.jpg",
        "/to-metadata": "http://169.254.169.254/latest/meta-data/",
        "/hop": f"{base}/photo.jpg",
    }
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield base
    site.shutdown()
    site.server_close()


def url(server, path: str = "") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/{path}"


def predict_files(server, *files, **keywords) -> requests.Response:
    parts = [("file", (name, data)) for name, data in files]
    return requests.post(url(server, "predict"), files=parts, timeout=60, **keywords)


def predict_url(server, image_url: str) -> requests.Response:
    return requests.post(url(server, "predict"), json={"url": image_url}, timeout=60)


def predict_json(served, paths: list[Path]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    options = PredictOptions(inputs=tuple(map(str, paths)), run=str(served.run), output="json")
    run_predict(options, served.workspace, out=out, err=err)
    return json.loads(out.getvalue())


def without_inputs(document: dict) -> dict:
    return {**document, "predictions": [{**p, "input": None} for p in document["predictions"]]}


def test_predictions_are_predict_json_for_the_same_photos(server, served, photos, image_site):
    expected = predict_json(served, photos)
    response = predict_files(server, *[(path.name, path.read_bytes()) for path in photos])
    assert response.status_code == 200, response.text
    document = response.json()
    assert without_inputs(document) == without_inputs(expected)
    assert [p["input"] for p in document["predictions"]] == [path.name for path in photos]
    assert all("known" in record for record in document["predictions"])

    by_url = predict_url(server, f"{image_site}/hop")  # a redirect within the allowed host is followed
    assert by_url.status_code == 200, by_url.text
    assert by_url.json()["predictions"][0]["top"] == expected["predictions"][0]["top"]
    raw = requests.post(
        url(server, "predict?name=raw.jpg"),
        data=photos[0].read_bytes(),
        headers={"Content-Type": "image/jpeg"},
    )
    assert raw.json()["predictions"][0] == {**expected["predictions"][0], "input": "raw.jpg"}
    named = predict_files(
        server, ("ねこ 1.jpg", photos[0].read_bytes())
    ).json()  # browsers send UTF-8 names raw
    assert named["predictions"][0] == {**expected["predictions"][0], "input": "ねこ 1.jpg"}


def test_heatmaps_are_grad_cam_over_the_photo(server, served, photos):
    from image_classifier import explain
    from image_classifier.images import load_array

    response = requests.post(
        url(server, "predict?heatmap=1"), files={"file": (photos[2].name, photos[2].read_bytes())}
    )
    (record,) = response.json()["predictions"]
    prefix = "data:image/png;base64,"
    assert record["heatmap"].startswith(prefix)
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(record["heatmap"][len(prefix) :]))))
    heatmap = explain.gradcam(serving.RunFolder(served.run), load_array(photos[2], 32, "squash")[None])[0]
    expected = explain.overlay(load_array(photos[2], 224, "squash"), heatmap)
    assert drawn.shape == (224, 224, 3)
    assert np.abs(drawn.astype(int) - expected.astype(int)).max() <= 2


def test_health_names_the_run_and_its_labels_and_other_runs_answer(server, served, photos):
    health = requests.get(url(server, "health"), timeout=10).json()
    assert health["run"] == served.run.name
    assert health["labels"] == json.loads((served.run / "labels.json").read_text())
    assert health["runs"] == [served.run.name, served.second.name]
    assert health["image_size"] == 32
    other = requests.get(url(server, f"health?run={served.second.name}"), timeout=10).json()
    assert other["run"] == served.second.name and other["labels"] == health["labels"]
    photo = photos[0]
    answer = predict_files(
        server, (photo.name, photo.read_bytes()), params={"run": served.second.name}
    ).json()
    assert answer["run"] == str(served.second.resolve())
    (expected,) = predict_json(served, [photo])["predictions"]
    assert answer["predictions"] == [{**expected, "input": photo.name}]
    unknown = requests.get(url(server, "health?run=../../etc"), timeout=10)
    assert unknown.status_code == 404 and "no finished run" in unknown.json()["error"]


def bomb() -> bytes:
    """A real decompression bomb: 90 million pixels (over Pillow's limit) compressed into a few kilobytes."""
    buffer = io.BytesIO()
    Image.new("1", (10_000, 9_000)).save(buffer, "PNG")
    return buffer.getvalue()


def bad_uploads(photos: list[Path]) -> list[tuple[str, bytes, int, str]]:
    jpeg = photos[0].read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, 1_200_000, dtype=np.uint8).tobytes()
    return [
        ("notes.jpg", b"plain text, not a photo at all\n" * 10, 415, "not an image"),
        ("page.jpg", b"<!DOCTYPE html><html><head><title>x</title></head></html>", 415, "an HTML page"),
        ("cut.jpg", jpeg[: len(jpeg) // 2], 422, "truncated"),
        ("bomb.png", bomb(), 422, "decompression bomb"),
        ("huge.jpg", jpeg + noise, 413, "--max-mb 1 MB"),  # the body: refused before it is read
        ("big.jpg", jpeg + noise[: 1024 * 1024], 413, "big.jpg: 1.0 MB is over the server's --max-mb 1 MB"),
        ("empty.jpg", b"", 400, "empty file"),
        ("../../etc/passwd", jpeg, 400, "path parts"),
        ("..\\..\\boot.ini", jpeg, 400, "path parts"),
        ("/tmp/absolute.jpg", jpeg, 400, "path parts"),
        ("C:evil.jpg", jpeg, 400, "path parts"),
        ("..", jpeg, 400, "path parts"),
    ]


def assert_refused(response: requests.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    reason = response.json()["error"]
    assert words in reason and "\n" not in reason, reason


def test_bad_uploads_are_refused_with_a_reason_and_the_server_goes_on(server, served, photos):
    before = tree_digest(served.workspace.root)
    refused = requests.get(url(server, "health"), timeout=10).json()["refused"]
    cases = bad_uploads(photos)
    for name, data, status, words in cases:
        assert_refused(predict_files(server, (name, data)), status, words)
    empty = requests.post(url(server, "predict"), data=b"", headers={"Content-Type": "image/jpeg"})
    assert_refused(empty, 400, "empty body")
    assert_refused(
        requests.post(url(server, "predict"), data=b"{", headers={"Content-Type": "application/json"}),
        400,
        "not JSON",
    )
    assert_refused(
        requests.post(url(server, "predict"), data=b"x", headers={"Content-Type": "text/plain"}),
        415,
        "multipart",
    )
    assert_refused(requests.post(url(server, "predict?run=nope"), data=b"x"), 404, "no finished run")
    assert_refused(requests.get(url(server, "nothing-here"), timeout=10), 404, "no page")
    rebound = requests.get(url(server, "health"), headers={"Host": "attacker.example:8501"}, timeout=10)
    assert_refused(rebound, 403, "is not this server")  # DNS rebinding: another site's name for 127.0.0.1
    other_site = predict_files(
        server, (photos[0].name, photos[0].read_bytes()), headers={"Origin": "https://attacker.example"}
    )
    assert_refused(other_site, 403, "cross-site request")

    good = predict_files(server, (photos[0].name, photos[0].read_bytes()))
    assert good.status_code == 200, good.text
    health = requests.get(url(server, "health"), timeout=10).json()
    assert health["refused"] - refused == len(cases) + 7
    assert tree_digest(served.workspace.root) == before  # nothing uploaded was kept


def test_image_urls_cannot_reach_private_addresses(server, image_site, photos):
    port = server.server_address[1]
    for bad, status, words in [
        ("file:///etc/passwd", 400, "not an http(s) URL"),
        ("ftp://example.org/cat.jpg", 400, "not an http(s) URL"),
        ("javascript:alert(1)", 400, "not an http(s) URL"),
        (f"http://127.0.0.1:{port}/health", 403, "loopback"),
        (f"http://[::1]:{port}/health", 403, "loopback"),
        (f"https://127.0.0.1:{port}/photo.jpg", 403, "loopback"),  # refused before any TLS handshake
        (f"http://0x7f000001:{port}/health", 403, "127.0.0.1"),
        (f"{image_site}/to-loopback", 403, "127.0.0.1, a loopback address"),
        (f"{image_site}/to-localhost", 403, "localhost is at"),
        (f"{image_site}/to-private", 403, "10.20.30.40, a private or reserved address"),
        (f"{image_site}/to-metadata", 403, "169.254.169.254"),
        (f"{image_site}/page.html", 415, "an HTML page"),
        (f"{image_site}/missing.jpg", 502, "HTTP 404"),
    ]:
        assert_refused(predict_url(server, bad), status, words)
    assert predict_url(server, f"{image_site}/photo.jpg").status_code == 200


def test_the_guard_checks_each_address():
    guard = AddressGuard.of(("192.168.7.0/24",))
    for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "10.0.0.1", "172.16.0.1", "169.254.169.254",
                    "100.64.0.1", "0.0.0.0", "fe80::1", "fd00::1", "224.0.0.1", "192.168.8.1"):  # fmt: skip
        with pytest.raises(BlockedAddress):
            guard.check(address, "host")
    for address in ("93.184.216.34", "2606:2800:220:1::", "192.168.7.20"):
        guard.check(address, "host")


def test_token_keep_uploads_and_listening_on_every_address(served, photos, capsys):
    server = start(served, host="0.0.0.0", token="s3cret-token", keep_uploads=True)
    try:
        warning = capsys.readouterr().err
        assert "warning: listening on 0.0.0.0" in warning and "--token" not in warning
        photo = (photos[0].name, photos[0].read_bytes())
        assert_refused(requests.get(url(server, "health"), timeout=10), 401, "Bearer")
        wrong = predict_files(server, photo, headers={"Authorization": "Bearer guess"})
        assert_refused(wrong, 401, "needs a token")
        assert requests.get(url(server), timeout=10).status_code == 200  # the page itself holds no secret
        trick = predict_files(
            server, ("../../outside.jpg", photo[1]), headers={"Authorization": "Bearer s3cret-token"}
        )
        assert_refused(trick, 400, "path parts")
        answer = predict_files(
            server,
            photo,
            ("..evil name;.jpg", photos[1].read_bytes()),
            headers={"Authorization": "Bearer s3cret-token"},
        )
        assert answer.status_code == 200, answer.text
        kept = sorted(served.workspace.uploads.iterdir())
        assert [path.read_bytes() for path in kept] in (
            [photo[1], photos[1].read_bytes()],
            [photos[1].read_bytes(), photo[1]],
        )
        assert all(path.parent == served.workspace.uploads and ";" not in path.name for path in kept)
    finally:
        stop(server)
        for path in served.workspace.uploads.glob("*"):
            path.unlink()
        served.workspace.uploads.rmdir()
    capsys.readouterr()
    lonely = start(served, host="0.0.0.0")
    stop(lonely)
    assert "give --token" in capsys.readouterr().err


def test_requests_that_arrive_together_share_one_batch(served, photos, monkeypatch):
    """While the model is busy with one request, four more arrive; they go through it as one batch."""
    run = serving.RunFolder.find(served.workspace, str(served.run))
    batcher = serving.Batcher(run, top_k=3, threshold=0.0)
    calls: list[int] = []
    busy, release = threading.Event(), threading.Event()
    original = batcher.predictor.predictions

    def held(names, images, *arguments):
        calls.append(len(names))
        if len(calls) == 1:
            busy.set()
            release.wait(30)
        return original(names, images, *arguments)

    monkeypatch.setattr(batcher.predictor, "predictions", held)
    arrays = [serving.load_array(path.read_bytes(), 32, run.resize) for path in photos]
    first = batcher.submit(["first"], arrays[:1])
    assert busy.wait(60)
    waiting = [batcher.submit([f"next{i}"], [arrays[i % len(arrays)]]) for i in range(4)]
    release.set()
    results = [future.result(60)[0] for future in (first, *waiting)]
    batcher.close()
    assert calls == [1, 4] and (batcher.batches, batcher.photos) == (2, 5)
    assert [predictions[0].source for predictions in results] == ["first", "next0", "next1", "next2", "next3"]


def test_the_script_serves_until_ctrl_c_then_says_what_it_served(served, photos):
    process = subprocess.Popen(
        script_command("serve.py", "--workspace", str(served.workspace.root), "--port", "0"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in process.stderr:
            found = re.search(r"Serving run (\S+) on (http://127\.0\.0\.1:\d+/)", line)
            if found:
                break
        assert found and found.group(1) == served.run.name
        answer = requests.post(
            found.group(2) + "predict", files={"file": (photos[0].name, photos[0].read_bytes())}
        )
        assert answer.status_code == 200, answer.text
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=30)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert rest.strip().splitlines()[-1] == "Served 1 photo in 1 request; refused 0"


def test_the_script_without_a_run_says_so_in_one_line(tmp_path):
    result = run_script("serve.py", "--workspace", str(tmp_path / "empty"), "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no training run in {tmp_path / 'empty' / 'runs'} yet; train one with scripts/machine_learning.py"
    ]


# The page, in headless Chromium.

pytestmark_browser = pytest.mark.skipif(
    os.environ.get("SKIP_BROWSER_TESTS") == "1", reason="SKIP_BROWSER_TESTS=1"
)


DROP_FILE = """(zone, file) => {
    const bytes = Uint8Array.from(atob(file.data), (char) => char.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], file.name, { type: "image/jpeg" }));
    zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
}"""
"""A photo dropped on the page, as a file dragged from the desktop arrives (a drop event with its File)."""


@pytestmark_browser
def test_the_page_shows_labels_heatmaps_and_unknown_photos(server, served, photos, image_site, capsys):
    from playwright.sync_api import sync_playwright
    from test_tensorboard_browser import CHROMIUM_ARGS, screenshot

    known = predict_json(served, photos)["predictions"]
    assert known[0]["known"] is True
    outsider = next(iter(sorted(ANIMALS.rglob("*.jp*g"))))
    (stranger,) = predict_json(served, [outsider])["predictions"]
    assert stranger["known"] is False, "the run should find a real photo of an animal unlike its colour blobs"
    path = os.environ.get("CHROMIUM") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url(server))
            page.get_by_text("Ready.").wait_for(timeout=30_000)
            assert page.locator("#run").input_value() == served.run.name
            page.locator("#files").set_input_files([str(photos[0]), str(outsider)])
            page.locator(".card .label").nth(1).wait_for(timeout=60_000)
            page.locator(".card img.heatmap").nth(1).wait_for(timeout=60_000)
            cards = {card.locator(".name").inner_text(): card for card in page.locator(".card").all()}
            first = cards[photos[0].name]
            assert first.locator(".label").inner_text().startswith(known[0]["label"] + " ")
            assert first.locator("img.heatmap").evaluate("image => image.naturalWidth") == 224
            assert "unknown" not in (first.get_attribute("class") or "")
            other = cards[outsider.name]
            assert "unknown" in other.get_attribute("class")
            assert "None of these" in other.locator(".verdict").inner_text()
            assert first.locator(".run").inner_text() == f"run {served.run.name}"
            screenshot(page, "serve-page", capsys)

            page.locator("#url").fill(f"{image_site}/photo.jpg")
            page.get_by_role("button", name="Predict").click()
            by_url = page.locator(".card").first
            by_url.locator(".run").wait_for(timeout=60_000)
            assert by_url.locator(".name").inner_text() == f"{image_site}/photo.jpg"
            assert (
                by_url.locator(".label").inner_text().startswith(known[0]["label"] + " ")
            )  # photos[0] again

            dropped = base64.b64encode(photos[2].read_bytes()).decode("ascii")
            page.locator("#drop").evaluate(DROP_FILE, {"name": "dropped.jpg", "data": dropped})
            page.locator(".card .run").nth(3).wait_for(timeout=60_000)
            assert page.locator(".card .name").first.inner_text() == "dropped.jpg"
            assert page.locator(".card .label").first.inner_text().startswith(known[2]["label"] + " ")

            page.locator("#run").select_option(served.second.name)
            page.get_by_text(f"Categories of {served.second.name}: ").wait_for(timeout=30_000)
            page.locator("#files").set_input_files([str(photos[1])])
            page.locator(".card .run").nth(4).wait_for(timeout=60_000)
            assert page.locator(".card .run").first.inner_text() == f"run {served.second.name}"
        finally:
            browser.close()
