"""Local fakes of the services gather talks to, with the rules the real ones enforce, on 127.0.0.1.

Each fake answers in the service's documented format and enforces its rules as its own source or policy
states them (the tests shorten the clock through FakeClock, never a rule):
- Openverse (WordPress/openverse api): DRF SimpleRateThrottle per scope with X-RateLimit-Limit-<scope> /
  X-RateLimit-Available-<scope> headers and Retry-After on 429; page_size over 20 without a token is a
  401, a page past 20 a 400, page_count is capped at 20; license_type groups (commercial: no NC,
  modification: no ND); POST /v1/auth_tokens/token/ with the client-credentials grant, tokens that expire
  and then count as anonymous.
- Wikimedia Commons (MediaWiki ApiQueryImageInfo, ApiMain): a 403 for a User-Agent without contact,
  maxlag errors with Retry-After, generator continuation that stays on a batch while imageinfo continues
  by sorted title (iicontinue), thumberror instead of thumburl; the media host answers 429 to a request
  made while 2 others are in flight (the robot policy's limit), when a test turns that rule on.
- DuckDuckGo (as ddgs 9.16.1 reads it): a page holding the vqd token, then i.js; a blocked client
  gets a 403.
Nothing here reaches beyond this machine: name lookups of any other host fail the test.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from image_classifier.config import Workspace
from image_classifier.gathering.download import Clock, FetchPolicy
from image_classifier.gathering.run import GatherOptions, gather

FAST = FetchPolicy(timeout=0.4, max_time=3.0, retries=1, backoff=0.01, max_wait=5.0, max_bytes=300_000)


def jpeg(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    """A real, distinct photo-like JPEG (noise, so every seed hashes differently)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


Responder = Callable[["Handler", dict], None]


def respond(
    handler: Handler,
    status: int = 200,
    body: bytes = b"",
    ctype: str = "image/jpeg",
    headers: dict | None = None,
    length: bool = True,
) -> None:
    handler.send_response(status)
    if ctype:
        handler.send_header("Content-Type", ctype)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        handler.wfile.write(body)


def image(body: bytes, ctype: str = "image/jpeg") -> Responder:
    return lambda handler, query: respond(handler, 200, body, ctype)


def status(code: int, headers: dict | None = None) -> Responder:
    page = f"<!DOCTYPE html><html><body><h1>{code}</h1></body></html>".encode()
    return lambda handler, query: respond(handler, code, page, "text/html", headers)


def in_turn(*responders: Responder) -> Responder:
    """The first answer on the first request, the next on the next; the last one repeats."""
    calls = iter(range(10**6))

    def serve(handler: Handler, query: dict) -> None:
        responders[min(next(calls), len(responders) - 1)](handler, query)

    return serve


def slow(seconds: float, then: Responder) -> Responder:
    def serve(handler: Handler, query: dict) -> None:
        time.sleep(seconds)
        then(handler, query)

    return serve


def redirect(target: str, code: int = 302) -> Responder:
    return lambda handler, query: respond(handler, code, b"", "", {"Location": target})


def trickle(body: bytes, pause: float, pieces: int = 40) -> Responder:
    """A real image sent a few bytes at a time, `pause` seconds apart."""

    def serve(handler: Handler, query: dict) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        step = max(1, len(body) // pieces)
        try:
            for start in range(0, len(body), step):
                handler.wfile.write(body[start : start + step])
                handler.wfile.flush()
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass

    return serve


def endless(handler: Handler, query: dict) -> None:
    """A JPEG header followed by more bytes than anyone should accept, without a Content-Length."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.end_headers()
    try:
        handler.wfile.write(b"\xff\xd8\xff\xe0" + b"\0" * 60)
        for _ in range(100):
            handler.wfile.write(b"\0" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass


@dataclass
class Listing:
    """One search result the fake APIs return: the image's name on the server and its listed size."""

    name: str
    width: int = 96
    height: int = 80
    licence: str = "by-sa"
    """Openverse's code (`by-nc`, `cc0`, ...); Wikimedia shows it as a LicenseShortName."""
    thumb: bool = True
    """False: Wikimedia cannot make its thumbnail and answers thumberror instead of thumburl."""


class FakeClock(Clock):
    """Time that jumps ahead when slept: the client honours a 2-minute Retry-After in full, the test
    takes no time, and the fake servers judge the client's timing by this same clock."""

    def __init__(self) -> None:
        self.time = time.time()
        self.slept: list[float] = []
        self.lock = threading.Lock()

    def now(self) -> float:
        with self.lock:
            return self.time

    def sleep(self, seconds: float, stop: threading.Event) -> bool:
        with self.lock:
            self.time += seconds
            self.slept.append(seconds)
        return stop.is_set()

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.time += seconds


CONTACT = re.compile(r"[^\s@()]+@[^\s@()]+\.\w+|https?://\S+\.\S+")
UA_REFUSAL = b"Please set a user-agent and respect our robot policy https://w.wiki/4wJS. See also T400119."
"""The body Wikimedia answers a User-Agent without contact with, since 2025 (HTTP 403)."""
DURATIONS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Throttles:
    """Django REST framework's SimpleRateThrottle, as Openverse runs it: a sliding window per scope and
    client, every passing throttle records the request, the longest wait becomes Retry-After, and each
    throttle adds X-RateLimit-Limit-<scope> / X-RateLimit-Available-<scope> to the answer."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.history: dict[tuple[str, str], list[float]] = {}

    def check(self, rates: dict[str, str], ident: str) -> tuple[float | None, dict[str, str]]:
        now = self.clock.now()
        waits, headers = [], {}
        for scope, rate in rates.items():
            number, period = rate.split("/")
            limit, duration = int(number), DURATIONS[period[0]]
            history = self.history.setdefault((scope, ident), [])
            while history and history[-1] <= now - duration:
                history.pop()
            if len(history) >= limit:
                remaining = duration - (now - history[-1]) if history else duration
                waits.append(remaining / (limit - len(history) + 1))
            else:
                history.insert(0, now)
            headers[f"X-RateLimit-Limit-{scope}"] = rate
            headers[f"X-RateLimit-Available-{scope}"] = str(limit - len(history))
        return (max(waits) if waits else None), headers


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._serve({})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        form = {key: values[-1] for key, values in parse_qs(self.rfile.read(length).decode()).items()}
        self._serve(form)

    def _serve(self, form: dict) -> None:
        web = self.server.web
        parts = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()} | form
        group = "upload" if parts.path.startswith("/img/") else "api"
        with web.lock:
            web.hits[parts.path] += 1
            web.requests.append((parts.path, query, dict(self.headers)))
            web.active += 1
            web.max_active = max(web.max_active, web.active)
            web.group_active[group] += 1
            crowded = web.group_active[group] > (web.upload_concurrency or 10**6) and group == "upload"
            web.group_max[group] = max(web.group_max[group], web.group_active[group])
        try:
            if crowded:
                web.refused_crowded += 1
                status(429)(self, query)
            elif (
                group == "upload"
                and web.upload_needs_contact
                and not CONTACT.search(self.headers.get("User-Agent", ""))
            ):
                respond(self, 403, UA_REFUSAL, "text/plain")
            else:
                web.routes.get(parts.path, status(404))(self, query)
        finally:
            with web.lock:
                web.active -= 1
                web.group_active[group] -= 1

    def send_response(self, code: int, message: str | None = None) -> None:
        with self.server.web.lock:
            self.server.web.statuses.append((urlsplit(self.path).path, code))
        super().send_response(code, message)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    web: Web


class Web:
    """The local web: routes by path, a record of every request, and fakes of the services gather uses,
    each with the rules the real one enforces (see the module docstring)."""

    def __init__(self) -> None:
        self.routes: dict[str, Responder] = {}
        self.hits: Counter = Counter()
        self.requests: list[tuple[str, dict, dict]] = []
        self.statuses: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.group_active: Counter = Counter()
        self.group_max: Counter = Counter()
        self.upload_concurrency: int | None = None
        """Media host rule: a request arriving while this many others are in flight gets a 429."""
        self.upload_needs_contact = False
        self.refused_crowded = 0
        self.clock = FakeClock()
        self.wiki: dict[str, list[Listing]] = {}
        self.wiki_batch = 2
        self.wiki_imageinfo_limit = 50
        """imageinfo entries per answer; the rest of a batch comes through iicontinue."""
        self.wiki_lagged_until = 0.0
        self.openverse: dict[str, list[Listing]] = {}
        self.ov_anon_rates: dict[str, str] = {}
        """Scope -> rate for anonymous requests; the API's defaults are anon_burst 5/hour, anon_sustained 100/day."""
        self.ov_app_rates = {"oauth2_client_credentials_burst": "100/min"}
        self.ov_app_rates["oauth2_client_credentials_sustained"] = "10000/day"
        self.ov_clients: dict[str, str] = {}
        self.ov_tokens: dict[str, tuple[str, float]] = {}
        self.ov_token_lifetime = 43200
        self.throttles = Throttles(self.clock)
        self.ddg: dict[str, list[Listing]] = {}
        self.ddg_status = 200
        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.web = self
        self.routes["/w/api.php"] = self._wikimedia
        self.routes["/v1/images/"] = self._openverse
        self.routes["/v1/auth_tokens/token/"] = self._token
        self.routes["/ddg"] = self._ddg_page
        self.routes["/ddg/i.js"] = self._ddg_images
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def add_image(self, name: str, body: bytes, ctype: str = "image/jpeg") -> str:
        self.routes[f"/img/{name}"] = image(body, ctype)
        return self.url(f"/img/{name}")

    def queries(self, path: str) -> list[dict]:
        return [query for seen, query, _ in self.requests if seen == path]

    def _json(self, handler: Handler, body: dict, status: int = 200, headers: dict | None = None) -> None:
        respond(handler, status, json.dumps(body).encode(), "application/json; charset=utf-8", headers)

    # -- Wikimedia Commons: action=query&generator=search&prop=imageinfo, formatversion=2 --------------

    def _wikimedia(self, handler: Handler, q: dict) -> None:
        """The Action API's rules: a User-Agent with contact, maxlag, generator continuation that stays on
        a batch until imageinfo (continued with iicontinue, by sorted title) is done, and thumberror."""
        if not CONTACT.search(handler.headers.get("User-Agent", "")):
            respond(handler, 403, UA_REFUSAL, "text/plain")
            return
        expected = {"action": "query", "format": "json", "formatversion": "2", "generator": "search"}
        expected |= {"gsrnamespace": "6", "prop": "imageinfo"}
        if any(q.get(key) != value for key, value in expected.items()) or "url" not in q.get("iiprop", ""):
            self._json(handler, {"error": {"code": "badparams", "info": f"unexpected parameters {q}"}})
            return
        lag = self.wiki_lagged_until - self.clock.now()
        if "maxlag" in q and lag > int(q["maxlag"]):
            error = {"code": "maxlag", "info": f"Waiting for db1: {lag:.0f} seconds lagged", "host": "db1"}
            headers = {"Retry-After": "5", "X-Database-Lag": f"{lag:.0f}"}
            self._json(handler, {"error": error | {"lag": round(lag), "type": "db"}}, 200, headers)
            return
        listings = self.wiki.get(q["gsrsearch"].removesuffix(" filetype:bitmap"), [])
        offset = int(q.get("gsroffset", 0))
        batch = listings[offset : offset + min(int(q["gsrlimit"]), self.wiki_batch)]
        numbered = {item.name.replace(" ", "_"): (offset + i + 1, item) for i, item in enumerate(batch)}
        titles = sorted(numbered)
        if "iicontinue" in q:
            start = q["iicontinue"].split("|")[0]
            titles = [title for title in titles if title >= start]  # ApiQueryImageInfo's own filter
        described, later = titles[: self.wiki_imageinfo_limit], titles[self.wiki_imageinfo_limit :]
        pages = []
        for key, (number, item) in numbered.items():
            page = {"pageid": 1000 + number, "ns": 6, "title": f"File:{item.name}", "index": number}
            if key in described:
                page |= {"imagerepository": "local", "imageinfo": [self._imageinfo(item, number)]}
            pages.append(page)
        body: dict = {"query": {"pages": pages[::-1]}}  # the API does not sort them
        if later:
            body["continue"] = {"iicontinue": f"{later[0]}|20240101000000", "gsroffset": offset}
            body["continue"]["continue"] = "gsroffset||"
        elif offset + len(batch) < len(listings):
            body["batchcomplete"] = True
            body["continue"] = {"gsroffset": offset + len(batch), "continue": "gsroffset||"}
        else:
            body["batchcomplete"] = True
        self._json(handler, body)

    def _imageinfo(self, item: Listing, number: int) -> dict:
        title = f"File:{item.name}"
        info: dict = {
            "size": 123456,
            "width": item.width * 4,
            "height": item.height * 4,
            "url": self.url(f"/original/{item.name}"),
            "descriptionurl": f"https://commons.wikimedia.org/wiki/{title}",
            "descriptionshorturl": f"https://commons.wikimedia.org/w/index.php?curid={number}",
            "mime": "image/jpeg",
            "extmetadata": {
                "Artist": {
                    "value": '<a href="//commons.wikimedia.org/wiki/User:Jane_Doe" title="User:Jane Doe">'
                    "Jane &amp; Doe</a>",
                    "source": "commons-desc-page",
                },
                "LicenseShortName": {"value": wiki_licence(item.licence), "source": "commons-desc-page"},
                "LicenseUrl": {"value": "https://creativecommons.org/licenses/by-sa/4.0", "hidden": ""},
            },
        }
        if item.thumb:
            info |= {"thumburl": self.url(f"/img/{item.name}"), "thumbwidth": item.width}
            info["thumbheight"] = item.height
        else:
            info["thumberror"] = "Error creating thumbnail: File with dimensions greater than 12.5 MP"
        return info

    # -- Openverse: GET /v1/images/, POST /v1/auth_tokens/token/ -----------------------------------------

    def _openverse(self, handler: Handler, q: dict) -> None:
        """Throttled per client (anonymous by address, an app by its token), page_size <= 20 without a
        token (401), pages past 20 refused (400), page_count capped at 20, license_type groups."""
        client = self._token_client(handler.headers.get("Authorization", ""))
        rates = self.ov_app_rates if client else self.ov_anon_rates
        wait, headers = self.throttles.check(rates, client or handler.client_address[0])
        if wait is not None:
            detail = f"Request was throttled. Expected available in {math.ceil(wait)} seconds."
            self._json(handler, {"detail": detail}, 429, headers | {"Retry-After": str(math.ceil(wait))})
            return
        page, size = int(q.get("page", 1)), int(q.get("page_size", 20))
        if size > 20 and not client:
            self._json(handler, {"detail": "Ensure this value is less than or equal to 20."}, 401, headers)
            return
        if page > 20:
            self._json(handler, {"page": ["Ensure this value is less than or equal to 20."]}, 400, headers)
            return
        groups = {"commercial": "nc", "modification": "nd"}
        if q.get("license_type", "all") not in ("all", "all-cc", *groups):
            self._json(handler, {"license_type": ["License type does not exist."]}, 400, headers)
            return
        banned = groups.get(q.get("license_type", ""), "@")
        listings = [item for item in self.openverse.get(q.get("q", ""), []) if banned not in item.licence]
        chunk = listings[(page - 1) * size : page * size]
        results = [self._ov_result(item, number) for number, item in enumerate(chunk, (page - 1) * size + 1)]
        page_count = min(20, max(1, -(-len(listings) // size)))
        body = {"result_count": len(listings), "page_count": page_count, "page_size": size, "page": page}
        self._json(handler, body | {"results": results}, 200, headers)

    def _ov_result(self, item: Listing, number: int) -> dict:
        return {
            "id": f"0000000{number}-aaaa-bbbb-cccc-dddddddddddd",
            "title": item.name,
            "indexed_on": "2024-01-01T00:00:00Z",
            "foreign_landing_url": f"https://www.flickr.com/photos/someone/{number}",
            "url": self.url(f"/img/{item.name}"),
            "creator": "Some Photographer",
            "creator_url": "https://www.flickr.com/photos/someone",
            "license": item.licence,
            "license_version": "2.0",
            "license_url": f"https://creativecommons.org/licenses/{item.licence}/2.0/",
            "provider": "flickr",
            "source": "flickr",
            "category": "photograph",
            "filesize": None,
            "filetype": "jpg",
            "tags": [{"name": "cat", "accuracy": None}],
            "attribution": f'"{item.name}" by Some Photographer is licensed under CC BY-SA 2.0.',
            "fields_matched": ["title"],
            "mature": False,
            "height": item.height,
            "width": item.width,
            "thumbnail": f"https://api.openverse.org/v1/images/{number}/thumb/",
            "detail_url": f"https://api.openverse.org/v1/images/{number}/",
            "related_url": f"https://api.openverse.org/v1/images/{number}/related/",
        }

    def _token(self, handler: Handler, form: dict) -> None:
        """django-oauth-toolkit's client-credentials grant, as Openverse's TokenView serves it."""
        if handler.command != "POST":
            self._json(handler, {"detail": 'Method "GET" not allowed.'}, 405)
            return
        known = self.ov_clients.get(form.get("client_id", ""))
        if (
            form.get("grant_type") != "client_credentials"
            or known is None
            or known != form.get("client_secret")
        ):
            self._json(handler, {"error": "invalid_client"}, 401)
            return
        token = secrets.token_urlsafe(24)
        self.ov_tokens[token] = (form["client_id"], self.clock.now() + self.ov_token_lifetime)
        answer = {"access_token": token, "expires_in": self.ov_token_lifetime, "token_type": "Bearer"}
        self._json(handler, answer | {"scope": "read write"})

    def _token_client(self, authorization: str) -> str:
        """The app a bearer token belongs to; an unknown or expired token is simply anonymous (DOT)."""
        client, expires = self.ov_tokens.get(authorization.removeprefix("Bearer ").strip(), ("", 0.0))
        return client if expires > self.clock.now() else ""

    # -- DuckDuckGo: the page that hands out a vqd token, then i.js ---------------------------------------

    def _ddg_page(self, handler: Handler, q: dict) -> None:
        page = f'<html><head><script>vqd="4-{abs(hash(q.get("q", ""))) % 10**12}";</script></head></html>'
        respond(handler, 200, page.encode(), "text/html; charset=UTF-8")

    def _ddg_images(self, handler: Handler, q: dict) -> None:
        """i.js: 100 results a page (s = offset); a blocked client gets 403, whatever it asks."""
        if self.ddg_status != 200:
            status(self.ddg_status)(handler, q)
            return
        if not q.get("vqd", "").startswith("4-"):
            self._json(handler, {"message": "invalid vqd"}, 418)
            return
        listings = self.ddg.get(q.get("q", ""), [])
        start = int(q.get("s", 0))
        results = [
            {
                "title": f"A {q['q']} {i}",
                "image": self.url(f"/img/{item.name}"),
                "thumbnail": "https://tse1.mm.bing.net/th?id=OIP.x",
                "url": f"https://example.org/{q['q']}/{i}.html",
                "height": item.height,
                "width": item.width,
                "source": "Bing",
            }
            for i, item in enumerate(listings[start : start + 100], start)
        ]
        self._json(handler, {"results": results, "query": q["q"]})


def wiki_licence(code: str) -> str:
    return "CC BY-SA 4.0" if code == "by-sa" else f"CC {code.upper()} 4.0"


@pytest.fixture(autouse=True)
def only_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything tries to resolve a host other than this machine's loopback."""
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1", None):
            raise AssertionError(f"test tried to reach {host!r}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("GATHER_USER_AGENT", "OPENVERSE_CLIENT_ID", "OPENVERSE_CLIENT_SECRET", "DDGS_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def web(monkeypatch: pytest.MonkeyPatch):
    server = Web()
    monkeypatch.setenv("WIKIMEDIA_API_URL", server.url("/w/api.php"))
    monkeypatch.setenv("OPENVERSE_API_URL", server.url("/v1/images/"))
    monkeypatch.setenv("DDG_URL", server.url("/ddg/"))
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "workspace")


CONTACT_GIVEN = "tester@example.org"


def run_gather(workspace: Workspace, **options) -> tuple[object, str]:
    """A gather run with fast timeouts, no progress bar, and a contact (Wikimedia needs one)."""
    lines: list[str] = []
    options.setdefault("policy", FAST)
    options.setdefault("progress", False)
    options.setdefault("contact", CONTACT_GIVEN)
    report = gather(workspace, GatherOptions(**options), print_fn=lines.append)
    return report, "\n".join(lines)


def manifest(workspace: Workspace) -> list[dict]:
    with open(workspace.images / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def tried(workspace: Workspace) -> list[dict]:
    with open(workspace.images / "tried.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def stored(workspace: Workspace, category: str) -> list[Path]:
    folder = workspace.images / category
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def no_partial_files(workspace: Workspace) -> bool:
    return not [path for path in workspace.images.rglob("*") if path.name.endswith(".part")]
