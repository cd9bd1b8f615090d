"""The gather stage against a real HTTP server on 127.0.0.1 that misbehaves on purpose.

The server (tests/fake_services.py) answers in the documented formats of the Wikimedia Commons Action API
(formatversion=2), the Openverse v1 image search and DuckDuckGo's image search, serves real JPEGs, and
fails in the ways the web does: 404, 500 then success, 429 with Retry-After, answers slower than the
timeout, HTML instead of an image, oversized bodies, redirect loops and redirects to other schemes. The
services' own rules (rate limits, User-Agent, per-host limits) are tested in test_gather_services.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path

import fake_services
import pytest
from fake_services import (
    FAST,
    Handler,
    Listing,
    Web,
    endless,
    image,
    in_turn,
    jpeg,
    manifest,
    no_partial_files,
    redirect,
    respond,
    run_gather,
    slow,
    status,
    stored,
    trickle,
)
from PIL import Image

from image_classifier.config import Workspace
from image_classifier.errors import UserError
from image_classifier.gathering.download import (
    Cancelled,
    FetchError,
    FetchFailure,
    FetchPolicy,
    HttpClient,
    retry_after_seconds,
    sniff_image,
)
from image_classifier.gathering.run import image_reason
from image_classifier.gathering.store import IMAGES_MANIFEST_FIELDS, read_manifest
from image_classifier.images import inspect

only_this_machine = fake_services.only_this_machine
web = fake_services.web
workspace = fake_services.workspace
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gather_images.py"


# ----------------------------------------------------------------------------------------------------
# The HTTP client on its own


def test_download_streams_to_file_with_hash_and_user_agent(web: Web, tmp_path: Path) -> None:
    body = jpeg(1)
    url = web.add_image("a.jpg", body)
    fetched = HttpClient(FAST).download(url, tmp_path / "a.part")
    assert fetched.path.read_bytes() == body
    assert fetched.sha256 == hashlib.sha256(body).hexdigest()
    assert fetched.size == len(body)
    agent = web.requests[-1][2]["User-Agent"]
    assert agent.startswith("image-classifier/") and "python-requests" in agent


def test_user_agent_can_be_set_by_environment(
    web: Web, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATHER_USER_AGENT", "my-pets-classifier/1.0 (me@example.org)")
    url = web.add_image("a.jpg", jpeg(1))
    HttpClient(FetchPolicy(timeout=1, retries=0)).download(url, tmp_path / "a.part")
    assert web.requests[-1][2]["User-Agent"] == "my-pets-classifier/1.0 (me@example.org)"


def test_404_fails_at_once_without_retrying(web: Web, tmp_path: Path) -> None:
    with pytest.raises(FetchError) as caught:
        HttpClient(FAST).download(web.url("/missing.jpg"), tmp_path / "x.part")
    assert caught.value.reason == "HTTP 404"
    assert caught.value.failure is FetchFailure.HTTP_STATUS and caught.value.status == 404
    assert web.hits["/missing.jpg"] == 1
    assert not (tmp_path / "x.part").exists()


def test_500_then_success_is_retried(web: Web, tmp_path: Path) -> None:
    body = jpeg(2)
    web.routes["/flaky.jpg"] = in_turn(status(500), image(body))
    fetched = HttpClient(FAST).download(web.url("/flaky.jpg"), tmp_path / "x.part")
    assert fetched.path.read_bytes() == body
    assert web.hits["/flaky.jpg"] == 2


def test_persistent_503_gives_up_after_the_retries(web: Web, tmp_path: Path) -> None:
    web.routes["/down.jpg"] = status(503)
    policy = FetchPolicy(timeout=1, retries=2, backoff=0.01)
    with pytest.raises(FetchError) as caught:
        HttpClient(policy).download(web.url("/down.jpg"), tmp_path / "x.part")
    assert caught.value.reason == "HTTP 503"
    assert "3 tries" in str(caught.value)
    assert web.hits["/down.jpg"] == 3


def test_429_waits_as_long_as_retry_after_says(web: Web, tmp_path: Path) -> None:
    body = jpeg(3)
    web.routes["/busy.jpg"] = in_turn(status(429, {"Retry-After": "1"}), image(body))
    started = time.monotonic()
    fetched = HttpClient(FAST).download(web.url("/busy.jpg"), tmp_path / "x.part")
    assert time.monotonic() - started >= 0.95  # backoff alone would be 0.01 s
    assert fetched.path.read_bytes() == body
    assert web.hits["/busy.jpg"] == 2


def test_a_retry_after_beyond_reason_gives_up_instead_of_stalling(web: Web, tmp_path: Path) -> None:
    web.routes["/busy.jpg"] = status(429, {"Retry-After": "3600"})
    started = time.monotonic()
    with pytest.raises(FetchError) as caught:
        HttpClient(FAST).download(web.url("/busy.jpg"), tmp_path / "x.part")
    assert caught.value.reason == "rate limit reached"
    assert caught.value.failure is FetchFailure.LIMIT and caught.value.status == 429
    assert "3600" in str(caught.value)
    assert time.monotonic() - started < 1


def test_retry_after_as_http_date() -> None:
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10)
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds("soon") is None


def test_a_server_slower_than_the_timeout_fails_as_timeout(web: Web, tmp_path: Path) -> None:
    web.routes["/slow.jpg"] = slow(1.5, image(jpeg(4)))
    policy = FetchPolicy(timeout=0.2, retries=1, backoff=0.01)
    started = time.monotonic()
    with pytest.raises(FetchError) as caught:
        HttpClient(policy).download(web.url("/slow.jpg"), tmp_path / "x.part")
    assert caught.value.reason == "timeout"
    assert time.monotonic() - started < 1.2
    assert web.hits["/slow.jpg"] == 2
    assert not (tmp_path / "x.part").exists()


def test_a_trickling_body_is_cut_off_at_the_total_time_limit(web: Web, tmp_path: Path) -> None:
    web.routes["/drip.jpg"] = trickle(jpeg(5), pause=0.1)
    policy = FetchPolicy(timeout=1, max_time=0.5, retries=0)
    started = time.monotonic()
    with pytest.raises(FetchError) as caught:
        HttpClient(policy).download(web.url("/drip.jpg"), tmp_path / "x.part")
    assert caught.value.reason == "timeout"
    assert time.monotonic() - started < 1.5  # the whole body would take 4 s
    assert not (tmp_path / "x.part").exists()


def test_an_html_page_is_not_an_image(web: Web, tmp_path: Path) -> None:
    web.routes["/page"] = lambda h, q: respond(h, 200, b"<html><body>Sign in</body></html>", "text/html")
    with pytest.raises(FetchError) as caught:
        HttpClient(FAST).download(web.url("/page"), tmp_path / "x.part")
    assert caught.value.reason == "not an image (an HTML page)"
    assert caught.value.failure is FetchFailure.NOT_AN_IMAGE
    assert not (tmp_path / "x.part").exists()


def test_magic_bytes_catch_html_served_as_an_image(web: Web, tmp_path: Path) -> None:
    page = b"<!DOCTYPE html><html><head><title>Error</title></head><body>" + b"x" * 5000 + b"</body></html>"
    web.routes["/fake.jpg"] = lambda h, q: respond(h, 200, page, "image/jpeg")
    with pytest.raises(FetchError) as caught:
        HttpClient(FAST).download(web.url("/fake.jpg"), tmp_path / "x.part")
    assert caught.value.reason == "not an image (an HTML page)"
    assert caught.value.failure is FetchFailure.NOT_AN_IMAGE
    assert not (tmp_path / "x.part").exists()


def test_signatures_of_the_formats_we_download() -> None:
    assert sniff_image(jpeg(1)) == "JPEG"
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    assert sniff_image(buffer.getvalue()) == "PNG"
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "WEBP")
    assert sniff_image(buffer.getvalue()) == "WEBP"
    assert sniff_image(b"<svg xmlns=...") is None


def test_a_declared_oversized_file_is_refused_before_reading(web: Web, tmp_path: Path) -> None:
    web.routes["/huge.jpg"] = lambda h, q: respond(h, 200, jpeg(6, (900, 900)), "image/jpeg")
    policy = FetchPolicy(timeout=1, retries=0, max_bytes=20_000)
    with pytest.raises(FetchError) as caught:
        HttpClient(policy).download(web.url("/huge.jpg"), tmp_path / "x.part")
    assert caught.value.reason.startswith("too large")
    assert "declared" in str(caught.value)
    assert not (tmp_path / "x.part").exists()


def test_an_undeclared_endless_body_stops_at_the_size_limit(web: Web, tmp_path: Path) -> None:
    web.routes["/endless.jpg"] = endless
    policy = FetchPolicy(timeout=1, retries=0, max_bytes=300_000)
    with pytest.raises(FetchError) as caught:
        HttpClient(policy).download(web.url("/endless.jpg"), tmp_path / "x.part")
    assert caught.value.reason.startswith("too large")
    assert not (tmp_path / "x.part").exists()


def test_redirects_are_followed(web: Web, tmp_path: Path) -> None:
    body = jpeg(7)
    target = web.add_image("moved.jpg", body)
    web.routes["/old.jpg"] = redirect("/img/moved.jpg", 301)
    fetched = HttpClient(FAST).download(web.url("/old.jpg"), tmp_path / "x.part")
    assert fetched.url == target
    assert fetched.path.read_bytes() == body


def test_a_redirect_loop_ends(web: Web, tmp_path: Path) -> None:
    web.routes["/loop-a"] = redirect("/loop-b")
    web.routes["/loop-b"] = redirect(web.url("/loop-a"))
    with pytest.raises(FetchError) as caught:
        HttpClient(FAST).download(web.url("/loop-a"), tmp_path / "x.part")
    assert caught.value.reason == "redirect loop"
    assert web.hits["/loop-a"] == 1 and web.hits["/loop-b"] == 1


def test_a_redirect_to_another_scheme_is_not_followed(web: Web, tmp_path: Path) -> None:
    web.routes["/sneaky.jpg"] = redirect("file:///etc/passwd")
    with pytest.raises(FetchError) as caught:
        HttpClient(FAST).download(web.url("/sneaky.jpg"), tmp_path / "x.part")
    assert caught.value.reason == "not an http(s) URL"
    assert not (tmp_path / "x.part").exists()


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/cat.jpg", "file:///etc/passwd", "javascript:alert(1)", "cat.jpg", "http:///x"]
)
def test_only_http_and_https_urls_are_fetched(url: str, web: Web, tmp_path: Path) -> None:
    with pytest.raises(FetchError) as caught:
        HttpClient(FAST).download(url, tmp_path / "x.part")
    assert caught.value.reason in ("not an http(s) URL", "bad URL")
    assert not web.requests


def test_a_refused_connection_fails_after_retries(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError) as caught:
        HttpClient(FAST).download(f"http://127.0.0.1:{port}/x.jpg", tmp_path / "x.part")
    assert caught.value.reason == "connection failed"


def test_json_api_calls_retry_and_check_the_type(web: Web) -> None:
    answer = json.dumps({"ok": True}).encode()
    web.routes["/api"] = in_turn(status(503), lambda h, q: respond(h, 200, answer, "application/json"))
    assert HttpClient(FAST).get_json(web.url("/api"), {"q": "x"}) == {"ok": True}
    assert web.queries("/api")[-1] == {"q": "x"}
    web.routes["/html-api"] = status(200)
    with pytest.raises(FetchError) as caught:
        HttpClient(FAST).get_json(web.url("/html-api"))
    assert caught.value.reason == "not JSON"


def test_abort_cuts_off_a_download_blocked_in_a_read(web: Web, tmp_path: Path) -> None:
    web.routes["/drip.jpg"] = trickle(jpeg(8), pause=0.5)
    client = HttpClient(FetchPolicy(timeout=30, max_time=60, retries=3))
    outcome: list[BaseException] = []

    def fetch() -> None:
        try:
            client.download(web.url("/drip.jpg"), tmp_path / "x.part")
        except BaseException as error:
            outcome.append(error)

    worker = threading.Thread(target=fetch)
    worker.start()
    time.sleep(0.3)
    started = time.monotonic()
    client.abort()
    worker.join(5)
    assert not worker.is_alive()
    assert time.monotonic() - started < 1.5  # not the 30 s read timeout
    assert isinstance(outcome[0], Cancelled)
    assert not (tmp_path / "x.part").exists()


# ----------------------------------------------------------------------------------------------------
# Sources, end to end through the stage


def test_wikimedia_images_with_licence_author_and_page(web: Web, workspace: Workspace) -> None:
    bodies = {f"cat{i}.jpg": jpeg(10 + i) for i in range(4)}
    for name, body in bodies.items():
        web.add_image(name, body)
    web.add_image("dog0.jpg", jpeg(20))
    web.add_image("dog1.jpg", jpeg(21))
    web.add_image("copy-of-cat0.jpg", bodies["cat0.jpg"])
    web.routes["/img/error.jpg"] = status(404)
    web.wiki["cat"] = [
        Listing("error.jpg"),
        Listing("cat0.jpg"),
        Listing("icon.jpg", 40, 40),
        Listing("cat1.jpg"),
        Listing("cat2.jpg"),
        Listing("cat3.jpg"),
    ]
    web.wiki["dog"] = [Listing("copy-of-cat0.jpg"), Listing("dog0.jpg"), Listing("dog1.jpg")]

    report, text = run_gather(workspace, categories=("cat", "dog"), source="wikimedia", limit=3)

    cats = stored(workspace, "cat")
    assert len(cats) == 3
    for path in cats:
        assert path.name == hashlib.sha256(path.read_bytes()).hexdigest()[:16] + ".jpg"
        assert path.read_bytes() in bodies.values()
    assert len(stored(workspace, "dog")) == 2  # its copy of cat0 is a duplicate across categories
    rows = manifest(workspace)
    assert list(rows[0]) == IMAGES_MANIFEST_FIELDS
    # downloads run in parallel: rows are in the order they finished
    first = next(row for row in rows if row["url"] == web.url("/img/cat0.jpg"))
    assert first["source"] == "wikimedia"
    assert first["licence"] == "CC BY-SA 4.0"
    assert first["author"] == "Jane & Doe"
    assert first["page"] == "https://commons.wikimedia.org/wiki/File:cat0.jpg"
    assert first["url"] == web.url("/img/cat0.jpg")
    assert (first["width"], first["height"]) == ("96", "80")
    assert first["sha256"] == hashlib.sha256(bodies["cat0.jpg"]).hexdigest()
    searches = web.queries("/w/api.php")
    assert searches[0]["gsrsearch"] == "cat filetype:bitmap"
    assert searches[0]["iiurlwidth"] == "960"
    assert any(q.get("gsroffset") == "2" for q in searches)  # followed the API's continue
    assert web.hits["/img/icon.jpg"] == 0  # listed as 40x40: skipped unseen
    assert web.hits["/img/cat3.jpg"] == 0  # the limit was reached first
    assert "1 HTTP 404" in text and "1 too small (under 64 px)" in text and "1 duplicate" in text
    assert all(not path.startswith("/original/") for path in web.hits)


def test_openverse_pages_and_combines_queries(web: Web, workspace: Workspace) -> None:
    for i in range(23):
        web.add_image(f"house{i}.jpg", jpeg(100 + i))
    for i in range(3):
        web.add_image(f"kitten{i}.jpg", jpeg(200 + i))
    web.openverse["house cat"] = [Listing(f"house{i}.jpg") for i in range(23)]
    web.openverse["kitten"] = [Listing(f"kitten{i}.jpg") for i in range(3)]

    report, text = run_gather(
        workspace,
        categories=("cat", "dog"),
        source="openverse",
        limit=6,
        queries=(("cat", "house cat"), ("cat", "kitten")),
    )

    rows = [row for row in manifest(workspace) if row["category"] == "cat"]
    assert len(rows) == 6
    kinds = Counter("kitten" if "kitten" in row["url"] else "house" for row in rows)
    assert kinds == {"house": 3, "kitten": 3}  # queries take turns until the limit
    assert rows[0]["licence"] == "CC BY-SA 2.0"
    assert rows[0]["author"] == "Some Photographer"
    assert rows[0]["page"].startswith("https://www.flickr.com/photos/someone/")
    asked = web.queries("/v1/images/")
    assert {q["q"] for q in asked} == {"house cat", "kitten", "dog"}
    assert all(q["page_size"] == "20" and q["category"] == "photograph" for q in asked)
    assert "dog: the source has no images for it" in text


def test_openverse_follows_page_count(web: Web, workspace: Workspace) -> None:
    for i in range(23):
        web.add_image(f"p{i}.jpg", jpeg(300 + i))
    web.openverse["cat"] = [Listing(f"p{i}.jpg") for i in range(23)]
    web.openverse["dog"] = []
    report, text = run_gather(workspace, categories=("cat", "dog"), source="openverse", limit=30, workers=4)
    assert len(stored(workspace, "cat")) == 23
    assert [q["page"] for q in web.queries("/v1/images/") if q["q"] == "cat"] == ["1", "2"]
    assert 'the search ran out of results: add queries like --query cat="..."' in text


def test_openverse_refusing_a_deeper_page_ends_the_search_quietly(web: Web, workspace: Workspace) -> None:
    for i in range(20):
        web.add_image(f"d{i}.jpg", jpeg(350 + i))
    web.openverse["cat"] = [Listing(f"d{i}.jpg") for i in range(20)] * 3  # page_count says 3
    answer = web.routes["/v1/images/"]

    def first_page_only(handler: Handler, q: dict) -> None:
        if q.get("page", "1") != "1":
            respond(
                handler,
                401,
                b'{"detail": "Authentication credentials were not provided."}',
                "application/json",
            )
            return
        answer(handler, q)

    web.routes["/v1/images/"] = first_page_only
    report, text = run_gather(workspace, categories=("cat",), source="openverse", limit=30)
    assert len(stored(workspace, "cat")) == 20
    assert [q["page"] for q in web.queries("/v1/images/")] == ["1", "2"]
    assert not report.categories[0].search_errors and "failed" not in text


def test_ddg_through_the_ddgs_package(web: Web, workspace: Workspace) -> None:
    """ddgs's own engine (vqd token, payload, parsing) over real HTTP to the fake DuckDuckGo."""
    for i in range(3):
        web.add_image(f"d{i}.jpg", jpeg(400 + i))
    web.ddg["horse"] = [Listing(f"d{i}.jpg") for i in range(3)]
    report, text = run_gather(workspace, categories=("horse",), source="ddg", limit=5)
    rows = manifest(workspace)
    assert len(rows) == 3
    assert rows[0]["source"] == "ddg" and rows[0]["licence"] == "" and rows[0]["author"] == ""
    assert rows[0]["page"].startswith("https://example.org/horse/")
    first, second = web.queries("/ddg/i.js")[:2]
    assert first["q"] == "horse" and first["vqd"].startswith("4-") and "s" not in first
    assert second["s"] == "100"  # the next page, which has nothing new
    assert "ddg results carry no licence" in text


def test_urls_list_against_every_kind_of_failure(web: Web, workspace: Workspace, tmp_path: Path) -> None:
    good = [web.add_image(f"u{i}.jpg", jpeg(500 + i)) for i in range(3)]
    web.routes["/flaky.jpg"] = in_turn(status(500), image(jpeg(510)))
    web.routes["/busy.jpg"] = in_turn(status(429, {"Retry-After": "1"}), image(jpeg(511)))
    web.routes["/slow.jpg"] = slow(1.5, image(jpeg(512)))
    web.routes["/page.jpg"] = status(200)
    web.routes["/huge.jpg"] = lambda h, q: respond(h, 200, jpeg(513, (1200, 1200)), "image/jpeg")
    web.routes["/endless.jpg"] = endless
    web.routes["/loop-a"] = redirect("/loop-b")
    web.routes["/loop-b"] = redirect("/loop-a")
    web.routes["/tiny.png"] = image(_png((20, 20)), "image/png")
    web.routes["/broken.jpg"] = image(jpeg(514)[:5000])
    listing = tmp_path / "urls.csv"
    rows = [
        "category,url",
        "# my cats",
        f"cat,{good[0]}",
        f"cat,{web.url('/flaky.jpg')}",
        f"cat,{web.url('/busy.jpg')}",
        f"cat,{web.url('/slow.jpg')}",
        f"cat,{web.url('/page.jpg')}",
        f"cat,{web.url('/huge.jpg')}",
        f"cat,{web.url('/endless.jpg')}",
        f"cat,{web.url('/loop-a')}",
        f"cat,{web.url('/tiny.png')}",
        f"cat,{web.url('/broken.jpg')}",
        f"cat,{web.url('/nothing.jpg')}",
        "cat,ftp://127.0.0.1/cat.jpg",
        "",
        f"dog,{good[1]}",
        f"dog,{good[1]}",
        f"dog,{good[2]}?a=1,2",
    ]
    listing.write_text("\n".join(rows) + "\n", encoding="utf-8")
    web.routes["/img/u2.jpg?a=1,2"] = web.routes["/img/u2.jpg"]

    report, text = run_gather(workspace, urls_file=listing)  # source and categories come from the file

    assert [item.category for item in report.categories] == ["cat", "dog"]
    cat = report.categories[0]
    assert cat.kept == 3  # u0, flaky after a retry, busy after Retry-After
    assert dict(cat.skipped) == {
        "timeout": 1,
        "not an image (an HTML page)": 1,
        "too large (over 0.286 MB)": 2,
        "redirect loop": 1,
        "too small (under 64 px)": 1,
        "truncated or corrupt image data": 1,
        "HTTP 404": 1,
        "not an http(s) URL": 1,
    }
    assert report.categories[1].kept == 2
    assert web.hits["/img/u1.jpg"] == 1  # the repeated row is not fetched twice
    assert no_partial_files(workspace)
    for row in manifest(workspace):
        assert inspect(workspace.images / row["file"]).width >= 64


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_text_file_of_urls_for_one_category(web: Web, workspace: Workspace, tmp_path: Path) -> None:
    urls = [web.add_image(f"t{i}.jpg", jpeg(600 + i)) for i in range(3)]
    listing = tmp_path / "cats.txt"
    listing.write_text("\n".join(urls) + "\n", encoding="utf-8")
    report, _ = run_gather(workspace, categories=("cat",), urls_file=listing, limit=2)
    assert len(stored(workspace, "cat")) == 2
    assert web.hits["/img/t2.jpg"] == 0


@pytest.mark.parametrize(
    ("content", "categories", "message"),
    [
        ("cat,\n", ("cat", "dog"), "line 1: expected category,url"),
        (
            "cat,http://127.0.0.1/a.jpg\nhorse,http://127.0.0.1/b.jpg\n",
            ("cat", "dog"),
            "line 2: category 'horse'",
        ),
        ("http://127.0.0.1/a.jpg\n", ("cat", "dog"), "line 1: 'http://127.0.0.1/a.jpg' has no category"),
        ("category,url\n# nothing yet\n", (), "lists no URLs"),
    ],
)
def test_bad_url_lists_are_one_clear_error(
    content: str, categories: tuple, message: str, workspace: Workspace, tmp_path: Path
) -> None:
    listing = tmp_path / "urls.csv"
    listing.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        run_gather(workspace, categories=categories, urls_file=listing)


def _photo_folder(root: Path) -> dict[str, bytes]:
    files = {
        "cat/one.jpg": jpeg(700),
        "cat/two.JPG": jpeg(701),
        "cat/nested/three.jpg": jpeg(702),
        "cat/Thumbs.db": b"junk",
        "cat/.hidden.jpg": jpeg(703),
        "cat/notes.txt": b"not a photo",
        "cat/page.jpg": b"<html><body>saved the page, not the image</body></html>",
        "dog/one.jpg": jpeg(710),
        "dog/same-as-cat.jpg": jpeg(700),
        "dog/tiny.png": _png((30, 30)),
        "__MACOSX/cat/._one.jpg": b"\0\5\26\7",
    }
    for name, body in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return files


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        path.relative_to(root).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
    }


def test_folder_import_checks_everything_and_never_touches_the_originals(
    workspace: Workspace, tmp_path: Path
) -> None:
    source = tmp_path / "my photos"
    _photo_folder(source)
    before = _snapshot(source)

    report, text = run_gather(workspace, from_path=source)

    assert _snapshot(source) == before
    assert [item.category for item in report.categories] == ["cat", "dog"]
    assert len(stored(workspace, "cat")) == 3
    assert len(stored(workspace, "dog")) == 1
    cat, dog = report.categories
    assert cat.skipped == {"not an image (unrecognised file format)": 1, "not an image (an HTML page)": 1}
    assert dog.skipped == {"duplicate": 1, "too small (under 64 px)": 1}
    rows = manifest(workspace)
    assert {row["source"] for row in rows} == {"folder"}
    assert str((source / "cat" / "one.jpg").resolve()) in {row["url"] for row in rows}


def test_zip_import_with_a_wrapping_folder_and_hostile_names(workspace: Workspace, tmp_path: Path) -> None:
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("pets/cat/a.jpg", jpeg(800))
        bundle.writestr("pets/cat/b.jpg", jpeg(801))
        bundle.writestr("pets/dog/c.jpg", jpeg(802))
        bundle.writestr("pets/dog/big.jpg", jpeg(803, (1400, 1400)))
        bundle.writestr("pets/dog/broken.jpg", jpeg(804)[:5000])
        bundle.writestr("__MACOSX/pets/cat/._a.jpg", b"\0\5\26\7")
        bundle.writestr("pets/../../escaped.jpg", jpeg(805))
        bundle.writestr("/absolute.jpg", jpeg(806))
    before = archive.read_bytes()

    report, text = run_gather(workspace, from_path=archive)

    assert archive.read_bytes() == before
    assert [item.category for item in report.categories] == ["cat", "dog"]
    assert len(stored(workspace, "cat")) == 2
    assert len(stored(workspace, "dog")) == 1
    dog = report.categories[1]
    assert dog.skipped["truncated or corrupt image data"] == 1
    assert sum(count for reason, count in dog.skipped.items() if reason.startswith("too large")) == 1
    assert not list(tmp_path.glob("*.jpg")) and not (workspace.root / "escaped.jpg").exists()
    assert manifest(workspace)[0]["url"].startswith(f"{archive.resolve()}!/pets/")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"from_path": Path("nowhere")}, "--from nowhere does not exist"),
        ({"source": "folder"}, "--source folder needs --from"),
        ({"source": "urls", "categories": ("cat",)}, "--source urls needs --urls"),
        ({"urls_file": Path("missing.csv")}, "--urls file missing.csv does not exist"),
        ({"source": "wikimedia"}, "--source wikimedia needs --categories"),
        ({"categories": ("cat",), "queries": (("dog", "puppy"),)}, "'dog' is not one of --categories"),
        ({"from_path": Path("."), "queries": (("cat", "x"),)}, "--query only applies to search sources"),
        ({"source": "wikimedia", "categories": ("cat",), "from_path": Path(".")}, "--from is only read"),
    ],
)
def test_bad_options_are_one_clear_error(options: dict, message: str, workspace: Workspace) -> None:
    with pytest.raises(UserError, match=message):
        run_gather(workspace, **options)


def test_a_folder_without_the_categories_says_which_it_has(workspace: Workspace, tmp_path: Path) -> None:
    _photo_folder(tmp_path / "photos")
    with pytest.raises(UserError, match="no subfolder named horse or cow; its subfolders are cat, dog"):
        run_gather(workspace, from_path=tmp_path / "photos", categories=("horse", "cow"))


# ----------------------------------------------------------------------------------------------------
# Re-runs, user files, limits, concurrency, interruption


def test_rerun_continues_without_downloading_again(web: Web, workspace: Workspace) -> None:
    for i in range(6):
        web.add_image(f"r{i}.jpg", jpeg(900 + i))
    web.wiki["cat"] = [Listing(f"r{i}.jpg") for i in range(6)]
    web.wiki["dog"] = []
    run_gather(workspace, categories=("cat", "dog"), source="wikimedia", limit=2)
    assert len(stored(workspace, "cat")) == 2

    mine = workspace.images / "cat" / "my own cat.png"
    mine.write_bytes(_png((200, 150)))
    unreadable = workspace.images / "cat" / "broken download.jpg"
    unreadable.write_bytes(b"\xff\xd8\xff\xe0 not really")
    report, text = run_gather(workspace, categories=("cat", "dog"), source="wikimedia", limit=4)

    cat = report.categories[0]
    assert (cat.existing, cat.kept, cat.unusable) == (3, 1, 1)
    assert cat.skipped["downloaded before"] == 2
    assert [web.hits[f"/img/r{i}.jpg"] for i in range(6)] == [1, 1, 1, 0, 0, 0]
    assert mine.read_bytes() == _png((200, 150)) and unreadable.exists()
    rows = manifest(workspace)
    assert [row["source"] for row in rows] == ["wikimedia", "wikimedia", "manual", "wikimedia"]
    assert rows[2]["file"] == "cat/my own cat.png"

    report, text = run_gather(workspace, categories=("cat", "dog"), source="wikimedia", limit=4)
    assert report.categories[0].kept == 0 and len(manifest(workspace)) == 4
    assert sum(web.hits[f"/img/r{i}.jpg"] for i in range(6)) == 3


def test_a_users_file_is_never_overwritten(web: Web, workspace: Workspace) -> None:
    body = jpeg(950)
    url = web.add_image("x.jpg", body)
    sha = hashlib.sha256(body).hexdigest()
    folder = workspace.images / "cat"
    folder.mkdir(parents=True)
    squatter = folder / f"{sha[:16]}.jpg"
    squatter.write_bytes(jpeg(951))
    listing = workspace.root / "urls.txt"
    listing.write_text(url + "\n")
    run_gather(workspace, categories=("cat",), urls_file=listing)
    assert squatter.read_bytes() == jpeg(951)
    assert (folder / f"{sha}.jpg").read_bytes() == body


def test_the_limit_counts_good_images_only(web: Web, workspace: Workspace) -> None:
    listings = []
    for i in range(8):
        if i % 2:
            web.routes[f"/img/bad{i}.jpg"] = status(500)
            listings.append(Listing(f"bad{i}.jpg"))
        else:
            web.add_image(f"good{i}.jpg", jpeg(1000 + i))
            listings.append(Listing(f"good{i}.jpg"))
    web.wiki["cat"] = listings
    report, _ = run_gather(workspace, categories=("cat",), source="wikimedia", limit=3, workers=1)
    assert len(stored(workspace, "cat")) == 3
    assert report.categories[0].skipped == {"HTTP 500": 2}
    assert [web.hits[f"/img/{item.name}"] for item in listings] == [1, 2, 1, 2, 1, 0, 0, 0]


def test_downloads_run_concurrently_but_bounded(web: Web, workspace: Workspace, tmp_path: Path) -> None:
    """--workers bounds all downloads; --per-host (default 4) bounds those to one host."""
    urls = []
    for i in range(16):
        web.routes[f"/img/s{i}.jpg"] = slow(0.15, image(jpeg(1100 + i)))
        urls.append(web.url(f"/img/s{i}.jpg"))
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls[:8]) + "\n")
    started = time.monotonic()
    run_gather(workspace, categories=("cat",), urls_file=listing, workers=3)
    assert len(stored(workspace, "cat")) == 8
    assert web.max_active == 3
    assert time.monotonic() - started < 8 * 0.15
    listing.write_text("\n".join(urls[8:]) + "\n")
    web.max_active = 0
    run_gather(workspace, categories=("cat",), urls_file=listing, workers=8)
    assert len(stored(workspace, "cat")) == 16
    assert web.max_active == FAST.per_host == 4


def test_every_search_failing_is_an_error(web: Web, workspace: Workspace) -> None:
    web.routes["/v1/images/"] = status(503)
    with pytest.raises(UserError, match="Openverse search for 'cat' failed: HTTP 503.*check the internet"):
        run_gather(workspace, categories=("cat", "dog"), source="openverse")


def test_a_failed_search_is_reported_when_others_worked(web: Web, workspace: Workspace) -> None:
    web.add_image("ok.jpg", jpeg(1200))
    web.openverse["cat"] = [Listing("ok.jpg")]
    answer = web.routes["/v1/images/"]
    web.routes["/v1/images/"] = lambda h, q: (status(500) if q["q"] == "dog" else answer)(h, q)
    report, text = run_gather(workspace, categories=("cat", "dog"), source="openverse")
    assert "dog: Openverse search for 'dog' failed: HTTP 500" in text
    assert len(stored(workspace, "cat")) == 1


def test_the_manifest_survives_a_cut_off_last_line(web: Web, workspace: Workspace) -> None:
    web.add_image("m.jpg", jpeg(1300))
    web.openverse["cat"] = [Listing("m.jpg")]
    workspace.images.mkdir(parents=True)
    (workspace.images / "manifest.csv").write_text(
        ",".join(IMAGES_MANIFEST_FIELDS) + "\ncat/abc.jpg,cat,wikim"
    )
    run_gather(workspace, categories=("cat",), source="openverse")
    rows = read_manifest(workspace.images / "manifest.csv")
    assert len(rows) == 1 and rows[0]["url"] == web.url("/img/m.jpg")


def test_leftovers_of_a_killed_run_are_cleared_and_nothing_else(workspace: Workspace, tmp_path: Path) -> None:
    folder = workspace.images / "cat"
    folder.mkdir(parents=True)
    (folder / ".gather-0123abcd.part").write_bytes(b"\xff\xd8\xff half")
    (folder / ".my-notes").write_text("mine")
    _photo_folder(tmp_path / "photos")
    run_gather(workspace, from_path=tmp_path / "photos", categories=("cat",))
    assert not (folder / ".gather-0123abcd.part").exists()
    assert (folder / ".my-notes").read_text() == "mine"


def test_image_reasons_are_short_enough_to_count() -> None:
    assert image_reason("not an image: an HTML page") == "not an image (an HTML page)"
    assert image_reason("truncated or corrupt image data (JPEG): broken data stream") == (
        "truncated or corrupt image data"
    )
    assert image_reason("empty file (0 bytes)") == "empty file"


def test_a_web_page_is_counted_the_same_whether_the_download_or_the_decoder_catches_it() -> None:
    from image_classifier.gathering.download import not_an_image
    from image_classifier.images import HTML_PAGE, NOT_AN_IMAGE

    assert image_reason(f"{NOT_AN_IMAGE}: {HTML_PAGE}") == not_an_image(HTML_PAGE).reason


# ----------------------------------------------------------------------------------------------------
# The script


def _load_script():
    spec = importlib.util.spec_from_file_location("gather_images_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--source", "flickr", "--categories", "cat"], "invalid choice: 'flickr'"),
        (["--urls", "missing.csv"], "error: --urls file missing.csv does not exist"),
        (["--from", "no/such/folder"], "error: --from no/such/folder does not exist"),
        (["--categories", "cat", "--query", "cat"], "expected CATEGORY=QUERY"),
        (["--categories", "cat,../dog"], "bad category name"),
        (["--categories", "cat,cat"], "category listed twice"),
        (["--categories", "cat", "--limit", "0"], "expected a whole number above 0"),
        (["--categories", "cat", "--source", "wikimedia"], "needs a way to contact you"),
        (["--categories", "cat", "--contact", "me"], "neither an email address nor a URL"),
        (["--from", ".", "--license", "commercial"], "--license only filters search sources"),
        (["--categories", "cat", "--license", "free"], "invalid choice: 'free'"),
    ],
)
def test_script_bad_input_is_one_line_and_exit_2(
    argv: list, message: str, workspace: Workspace, capsys: pytest.CaptureFixture
) -> None:
    from image_classifier import cli

    script = _load_script()
    with pytest.raises(SystemExit) as stopped:
        sys.exit(cli.run_main(script.main, ["--workspace", str(workspace.root), *argv]))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_script_run_and_ctrl_c_leave_only_whole_images(
    web: Web, workspace: Workspace, tmp_path: Path
) -> None:
    urls = [web.add_image("first.jpg", jpeg(1400))]
    for i in range(6):
        web.routes[f"/img/drip{i}.jpg"] = trickle(jpeg(1410 + i, (400, 300)), pause=0.1, pieces=100)
        urls.append(web.url(f"/img/drip{i}.jpg"))
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--workspace", str(workspace.root), "--categories", "cat"]
        + ["--urls", str(listing), "--workers", "3", "--timeout", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    folder = workspace.images / "cat"

    def kept_one_and_downloading() -> bool:
        return (workspace.images / "manifest.csv").exists() and bool(list(folder.glob(".gather-*.part")))

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not kept_one_and_downloading():
        time.sleep(0.05)
    assert kept_one_and_downloading(), "downloads never started"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "interrupted" in err
    assert "run the same command again to continue" in out
    assert no_partial_files(workspace)
    rows = manifest(workspace)
    assert [path.name for path in stored(workspace, "cat")] == sorted(Path(row["file"]).name for row in rows)
    for row in rows:
        assert inspect(workspace.images / row["file"]).width > 0
