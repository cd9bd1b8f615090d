"""Gathering under the real services' rules, as the fakes in fake_services.py enforce them.

Openverse's throttles (X-RateLimit-* and long Retry-After, a daily limit reached mid-run), its page cap,
credentials and licence groups; Wikimedia's User-Agent rule, maxlag, iicontinue and thumberror; the media
host's 2 connections; DuckDuckGo's 403; re-runs that fetch no URL twice; review decisions; and each kind
of network failure named. A FakeClock stands in for time, so every wait is honoured in full, instantly.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import stat
from dataclasses import replace
from pathlib import Path

import fake_services
import pytest
from fake_services import (
    FAST,
    Listing,
    Web,
    jpeg,
    manifest,
    run_gather,
    slow,
    tried,
)

from image_classifier.config import Workspace
from image_classifier.decisions import record_decisions
from image_classifier.errors import UserError
from image_classifier.gathering.download import FetchError, FetchFailure, FetchPolicy, HttpClient
from image_classifier.gathering.run import STATE_DIR, GatherOptions, gather

only_this_machine = fake_services.only_this_machine
web = fake_services.web
workspace = fake_services.workspace
PATIENT = FetchPolicy(timeout=2, max_time=5, retries=2, backoff=0.01, max_wait=600, max_bytes=300_000)
"""The default --max-wait (10 minutes): a wait longer than that is a limit reached."""


def photos(web: Web, prefix: str, count: int, seed: int, **listing) -> list[Listing]:
    for i in range(count):
        web.add_image(f"{prefix}{i}.jpg", jpeg(seed + i))
    return [Listing(f"{prefix}{i}.jpg", **listing) for i in range(count)]


def pages_asked(web: Web, query: str) -> list[int]:
    return [int(q.get("page", 1)) for q in web.queries("/v1/images/") if q.get("q") == query]


# ----------------------------------------------------------------------------------------------------
# Openverse


def test_a_retry_after_over_a_minute_is_waited_out_with_a_countdown(
    web: Web, workspace: Workspace, capsys: pytest.CaptureFixture
) -> None:
    web.ov_anon_rates = {"anon_burst": "2/hour"}
    web.openverse["cat"] = photos(web, "o", 80, 2000, width=40, height=40)  # listed too small: no downloads
    options = dict(categories=("cat",), source="openverse", limit=3, clock=web.clock)
    report, text = run_gather(workspace, policy=PATIENT, **options)
    assert "rate limit asks for a longer wait than --max-wait (its limit: 2/hour (anon_burst))" in text
    assert pages_asked(web, "cat") == [1, 2, 3]  # the third got a 429 asking for about an hour

    report, text = run_gather(workspace, policy=replace(PATIENT, max_wait=4000), progress=True, **options)
    answers = [code for path, code in web.statuses if path == "/v1/images/"]
    assert answers == [200, 200, 429, 429, 200, 200]  # after the wait, answered: not back too early
    assert sorted(set(pages_asked(web, "cat"))) == [1, 2, 3, 4]  # continued at page 3, to the end
    assert 3500 < sum(web.clock.slept) < 3700  # about an hour, honoured in full
    assert "waiting 3599 s for 127.0.0.1 (its rate limit)" in capsys.readouterr().err
    assert "ran out of results" in text


def test_a_daily_limit_mid_run_stops_the_source_and_a_rerun_continues(web: Web, workspace: Workspace) -> None:
    web.ov_anon_rates = {"anon_burst": "50/minute", "anon_sustained": "3/day"}
    listings = photos(web, "d", 100, 2100)
    web.openverse["cat"] = listings
    web.openverse["dog"] = photos(web, "g", 2, 2200)
    options = dict(categories=("cat", "dog"), source="openverse", limit=70, policy=PATIENT, clock=web.clock)

    report, text = run_gather(workspace, **options)
    assert pages_asked(web, "cat") == [1, 2, 3, 4]  # the fourth search of the day: a 429
    assert report.categories[0].kept == 60 and report.categories[1].kept == 0
    assert "cat: Openverse's daily limit is used up (its limit: 3/day (anon_sustained))" in text
    assert "run the same command again after" in text and "OPENVERSE_CLIENT_ID" in text
    assert "ran out of results" not in text
    assert web.queries("/v1/images/")[-1].get("q") != "dog"  # the stopped source asks nothing more

    web.clock.advance(86400)
    report, text = run_gather(workspace, **options)
    assert pages_asked(web, "cat") == [1, 2, 3, 4, 4]  # continued at page 4, not from page 1
    assert report.categories[0].total == 70 and report.categories[1].kept == 2
    assert max(web.hits[f"/img/d{i}.jpg"] for i in range(100)) == 1  # no photo fetched twice


def test_no_page_past_20_is_asked_for_and_page_21_is_refused(web: Web, workspace: Workspace) -> None:
    web.openverse["cat"] = photos(web, "p", 1, 2300, width=40, height=40) * 500
    report, text = run_gather(workspace, categories=("cat",), source="openverse", limit=600)
    assert pages_asked(web, "cat") == list(range(1, 21))
    with pytest.raises(FetchError) as caught:
        HttpClient(FAST).get_json(web.url("/v1/images/"), {"q": "cat", "page": 21})
    assert caught.value.status == 400  # the fake holds the rule the client avoids
    assert "ran out of results" in text
    report, text = run_gather(workspace, categories=("cat",), source="openverse", limit=600)
    again = list(range(1, 21))  # read to its end, so afresh from page 1 (21 was this test's own ask)
    assert pages_asked(web, "cat") == [*range(1, 21), 21, *again]
    assert "ran out of results" in text and report.categories[0].candidates == 20 * 20


def test_credentials_token_cached_owner_only_renewed_and_never_shown(
    web: Web, workspace: Workspace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-" + "x" * 30
    web.ov_clients = {"my-app-id": secret}
    web.ov_anon_rates = {"anon_burst": "1/day"}  # anonymous would stop at once
    web.openverse["cat"] = photos(web, "c", 30, 2400, licence="by")
    web.openverse["cat"] += photos(web, "n", 5, 2450, licence="by-nc")
    monkeypatch.setenv("OPENVERSE_CLIENT_ID", "my-app-id")
    monkeypatch.setenv("OPENVERSE_CLIENT_SECRET", secret)
    caplog.set_level(logging.DEBUG)
    options = dict(categories=("cat",), source="openverse", policy=PATIENT, clock=web.clock)

    report, text = run_gather(workspace, limit=20, licence="commercial", **options)
    shown = [text]
    assert report.categories[0].kept == 20
    posts = web.queries("/v1/auth_tokens/token/")
    assert len(posts) == 1 and posts[0]["grant_type"] == "client_credentials"
    searches = [(q, h) for path, q, h in web.requests if path == "/v1/images/"]
    assert all(h["Authorization"].startswith("Bearer ") for _, h in searches)
    assert all(q["license_type"] == "commercial" for q, _ in searches)
    assert not any("/img/n" in row["url"] for row in manifest(workspace))
    token_file = workspace.root / STATE_DIR / "openverse-token.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    token = searches[0][1]["Authorization"].removeprefix("Bearer ")

    shown.append(run_gather(workspace, limit=25, licence="commercial", **options)[1])
    assert len(web.queries("/v1/auth_tokens/token/")) == 1  # the cached token served again
    web.clock.advance(web.ov_token_lifetime)
    report, text = run_gather(workspace, limit=30, licence="commercial", **options)
    shown.append(text)
    assert len(web.queries("/v1/auth_tokens/token/")) == 2  # renewed before it lapsed
    assert report.categories[0].total == 30

    written = [path for path in workspace.root.rglob("*") if path.is_file()]
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    for path in [p for p in written if p != token_file]:
        assert token.encode() not in path.read_bytes(), path
    everything = "\n".join(shown + [record.getMessage() for record in caplog.records])
    assert secret not in everything and token not in everything


def test_wrong_credentials_are_one_clear_error(
    web: Web, workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    web.ov_clients = {"my-app-id": "right"}
    monkeypatch.setenv("OPENVERSE_CLIENT_ID", "my-app-id")
    monkeypatch.setenv("OPENVERSE_CLIENT_SECRET", "wrong-secret-value")
    with pytest.raises(UserError, match="Openverse refused OPENVERSE_CLIENT_ID") as caught:
        run_gather(workspace, categories=("cat",), source="openverse")
    assert "wrong-secret-value" not in str(caught.value)
    monkeypatch.delenv("OPENVERSE_CLIENT_SECRET")
    with pytest.raises(UserError, match="set both OPENVERSE_CLIENT_ID and OPENVERSE_CLIENT_SECRET"):
        run_gather(workspace, categories=("cat",), source="openverse")


# ----------------------------------------------------------------------------------------------------
# Wikimedia


def test_wikimedia_without_a_contact_stops_before_any_request(web: Web, workspace: Workspace) -> None:
    with pytest.raises(UserError, match="--contact you@example.org") as caught:
        run_gather(workspace, categories=("cat",), source="wikimedia", contact="")
    assert "GATHER_USER_AGENT" in str(caught.value)
    assert not web.requests
    with pytest.raises(UserError, match="neither an email address nor a URL"):
        run_gather(workspace, categories=("cat",), source="wikimedia", contact="me")


def test_a_user_agent_without_contact_gets_the_403_and_it_is_named(web: Web, tmp_path: Path) -> None:
    client = HttpClient(
        FetchPolicy(timeout=2, retries=0, user_agent="image-classifier/1.0 python-requests/2")
    )
    with pytest.raises(FetchError) as caught:
        client.get_json(web.url("/w/api.php"), {"action": "query"})
    assert caught.value.failure is FetchFailure.BLOCKED
    assert caught.value.reason == "blocked (User-Agent refused)"
    assert "robot policy" in str(caught.value)


def test_wikimedia_continuation_thumberror_maxlag_and_the_contact(
    web: Web, workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATHER_USER_AGENT", "pet-sorter/2.0 (https://example.org/pets; pets@example.org)")
    names = ["m0", "m1", "m2", "m3", "a0", "a1", "a2", "a3", "b0"]  # later batches sort before m2
    listings = []
    for i, name in enumerate(names):
        web.add_image(f"{name}.jpg", jpeg(2500 + i))
        listings.append(Listing(f"{name}.jpg", thumb=name != "a2"))
    web.wiki["cat"] = listings
    web.wiki_batch, web.wiki_imageinfo_limit = 4, 2  # each batch needs an iicontinue
    web.wiki_lagged_until = web.clock.now() + 12
    report, text = run_gather(
        workspace, categories=("cat",), source="wikimedia", limit=20, contact="", clock=web.clock
    )
    asked = web.queries("/w/api.php")
    assert all(q["maxlag"] == "5" for q in asked)
    assert asked[0] == asked[1] and sum(web.clock.slept) >= 12  # the lag waited out, then the same ask
    assert any("iicontinue" in q for q in asked)
    fetched = {name for name in web.hits if name.startswith("/img/")}
    assert fetched == {f"/img/{name}.jpg" for name in names if name != "a2"}  # none dropped
    assert not any(path.startswith("/original/") for path in web.hits)
    assert report.categories[0].kept == 8
    assert report.categories[0].skipped["no thumbnail (thumberror)"] == 1
    agents = {headers["User-Agent"] for _, _, headers in web.requests}
    assert agents == {"pet-sorter/2.0 (https://example.org/pets; pets@example.org)"}


def test_the_media_host_gets_two_downloads_at_a_time(web: Web, workspace: Workspace) -> None:
    listings = photos(web, "h", 10, 2600)
    for item in listings:
        web.routes[f"/img/{item.name}"] = slow(0.1, web.routes[f"/img/{item.name}"])
    web.wiki["cat"] = listings
    web.wiki_batch = 50
    web.upload_concurrency = 2  # a third request while 2 are in flight is refused
    web.upload_needs_contact = True
    report, text = run_gather(workspace, categories=("cat",), source="wikimedia", limit=10, workers=8)
    assert report.categories[0].kept == 10
    assert web.refused_crowded == 0
    assert web.group_max["upload"] == 2


# ----------------------------------------------------------------------------------------------------
# DuckDuckGo


def test_a_ddg_search_answered_403_is_named_a_block(web: Web, workspace: Workspace) -> None:
    web.ddg_status = 403
    with pytest.raises(UserError, match=r"DuckDuckGo refused the search for 'horse' \(HTTP 403\): a block"):
        run_gather(workspace, categories=("horse", "cow"), source="ddg")
    assert len(web.queries("/ddg/i.js")) == 1  # a block holds for every query: no second one is sent


def test_a_ddg_search_with_nothing_says_it_may_be_a_block(web: Web, workspace: Workspace) -> None:
    web.ddg["cat"] = photos(web, "k", 2, 2700)
    report, text = run_gather(workspace, categories=("cat", "horse"), source="ddg", limit=5)
    assert "horse: DuckDuckGo answered no images for 'horse'; that can also mean it is blocking" in text
    assert "the source has no images for it" not in text


def test_a_ddg_connection_refused_is_not_called_offline(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("DDG_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError, match="Connection refused") as caught:
        run_gather(workspace, categories=("horse",), source="ddg")
    assert "no internet connection" not in str(caught.value)


# ----------------------------------------------------------------------------------------------------
# Re-runs and review decisions


def test_a_duplicate_url_is_not_fetched_on_a_rerun(web: Web, workspace: Workspace, tmp_path: Path) -> None:
    body = jpeg(2800)
    first = web.add_image("same.jpg", body)
    second = web.add_image("mirror.jpg", body)
    broken = web.add_image("broken.jpg", b"<html>gone</html>", "text/html")
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{first}\n{second}\n{broken}\n")
    options = dict(categories=("cat",), urls_file=listing, workers=1)
    report, _ = run_gather(workspace, **options)
    assert report.categories[0].kept == 1
    rows = {row["url"]: row for row in tried(workspace)}
    kept = f"cat/{hashlib.sha256(body).hexdigest()[:16]}.jpg"
    assert (rows[first]["outcome"], rows[first]["file"]) == ("kept", kept)
    assert (rows[second]["outcome"], rows[second]["file"]) == ("duplicate", kept)
    assert (rows[broken]["outcome"], rows[broken]["reason"]) == ("rejected", "not an image (an HTML page)")
    assert [row["url"] for row in manifest(workspace)] == [first]  # the first URL's provenance

    report, text = run_gather(workspace, **options)
    assert [web.hits[f"/img/{name}"] for name in ("same.jpg", "mirror.jpg", "broken.jpg")] == [1, 1, 1]
    assert report.categories[0].skipped["downloaded before"] == 3


def test_excluded_photos_do_not_count_and_never_come_back(
    web: Web, workspace: Workspace, tmp_path: Path
) -> None:
    urls = [web.add_image(f"e{i}.jpg", jpeg(2900 + i)) for i in range(6)]
    copy_of_first = web.add_image("copy.jpg", jpeg(2900))
    listing = tmp_path / "urls.csv"
    listing.write_text("".join(f"cat,{url}\n" for url in urls[:3]) + f"dog,{urls[5]}\n")
    run_gather(workspace, urls_file=listing, workers=1)
    files = {row["url"]: row["file"] for row in manifest(workspace)}
    record_decisions(workspace.images, exclude={files[urls[0]]}, relabel={files[urls[1]]: "dog"})
    again = [*urls[:3], copy_of_first, urls[3], urls[4]]
    listing.write_text("".join(f"cat,{url}\n" for url in again) + f"dog,{urls[5]}\n")
    report, text = run_gather(workspace, urls_file=listing, workers=1, limit=3)

    cat, dog = report.categories
    assert (cat.existing, cat.excluded, cat.kept) == (1, 1, 2)  # only cat/e2 still counts for cat
    assert dog.existing == 2 and dog.relabeled_in == 1
    assert web.hits["/img/e0.jpg"] == 1 and web.hits["/img/e3.jpg"] == 1 and web.hits["/img/e4.jpg"] == 1
    assert cat.skipped["duplicate"] == 1  # another URL for the excluded photo is not kept again
    assert "1 excluded by review, not counted" in text
    (workspace.images / files[urls[0]]).unlink()  # even when the excluded file is gone
    another_copy = web.add_image("copy2.jpg", jpeg(2900))
    listing.write_text(f"cat,{urls[0]}\ncat,{copy_of_first}\ncat,{another_copy}\n")
    report, _ = run_gather(workspace, urls_file=listing, workers=1, limit=5)
    assert web.hits["/img/e0.jpg"] == 1 and web.hits["/img/copy.jpg"] == 1
    assert report.categories[0].skipped["duplicate"] == 1 and report.categories[0].kept == 0


# ----------------------------------------------------------------------------------------------------
# Failures named


def _resolver(monkeypatch: pytest.MonkeyPatch, code: int, message: str) -> None:
    """Name lookups of other hosts fail as a resolver does: offline (EAI_AGAIN) or no such host."""
    real = socket.getaddrinfo

    def lookup(host, *args, **kwargs):
        if host in ("127.0.0.1", "localhost", None):
            return real(host, *args, **kwargs)
        raise socket.gaierror(code, message)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (socket.EAI_AGAIN, "Temporary failure in name resolution"),
        (socket.EAI_NONAME, "Name or service not known"),
    ],
)
def test_offline_is_named_not_out_of_results(
    code: int, message: str, workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resolver that cannot reach its upstream says EAI_AGAIN; one with none configured, EAI_NONAME.
    Either way the service's own host exists, so the machine is offline."""
    monkeypatch.delenv("OPENVERSE_API_URL", raising=False)
    _resolver(monkeypatch, code, message)
    lines: list[str] = []
    with pytest.raises(UserError) as caught:
        gather(workspace, GatherOptions(categories=("cat",), policy=FAST, progress=False), lines.append)
    assert "no internet connection" in str(caught.value) and "connect and run again" in str(caught.value)
    assert "api.openverse.org" in str(caught.value)
    assert "ran out of results" not in "\n".join(lines)


def test_dns_tls_and_offline_downloads_each_have_their_reason(
    web: Web, workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = web.server.server_port
    listing = tmp_path / "urls.txt"
    listing.write_text(f"http://no-such-host.invalid/a.jpg\nhttps://127.0.0.1:{port}/img/x.jpg\n")
    web.add_image("x.jpg", jpeg(3000))
    _resolver(monkeypatch, socket.EAI_NONAME, "Name or service not known")
    report, text = run_gather(workspace, categories=("cat",), urls_file=listing)
    assert dict(report.categories[0].skipped) == {"host not found": 1, "secure connection failed": 1}

    listing.write_text("http://photos.example.org/b.jpg\n")
    _resolver(monkeypatch, socket.EAI_AGAIN, "Temporary failure in name resolution")
    report, text = run_gather(workspace, categories=("cat",), urls_file=listing)
    assert dict(report.categories[0].skipped) == {"no internet connection": 1}
    assert tried(workspace)[-1]["outcome"] == "failed"  # tried again once the machine is online
    report, _ = run_gather(workspace, categories=("cat",), urls_file=listing)
    assert dict(report.categories[0].skipped) == {"no internet connection": 1}
