"""An HTTP client for a hostile network: every way a download can go wrong ends as a short, countable reason.

Only http and https are followed (redirects too, one hop at a time); 429 and 5xx are retried with backoff,
waiting as long as Retry-After asks within reason; bodies are streamed to a file the caller names (a
temporary one, renamed only once it proved to be an image), with a size limit, a time limit and a
magic-byte check, so an HTML error page or an endless stream never becomes a "photo". A stop event and
`abort()` let Ctrl-C end downloads that are blocked in a read.
"""

from __future__ import annotations

import email.utils
import errno
import hashlib
import json
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from .. import __version__
from ..images import HTML_PAGE, NOT_AN_IMAGE

T = TypeVar("T")

USER_AGENT_ENV = "GATHER_USER_AGENT"


def user_agent(contact: str = "") -> str:
    """The User-Agent the Wikimedia policy asks for: `<client>/<version> (<contact>) <library>/<version>`.

    $GATHER_USER_AGENT replaces it whole, unless `contact` (--contact: an email address or a URL) is given.
    """
    given = os.environ.get(USER_AGENT_ENV, "").strip()
    if given and not contact:
        return given
    about = contact.strip() or "gathers training photos for a personal image classifier"
    return f"image-classifier/{__version__} ({about}) python-requests/{requests.__version__}"


def default_user_agent() -> str:
    return user_agent()


_EMAIL = re.compile(r"[^\s@();<>]+@[^\s@();<>]+\.[A-Za-z]{2,}")
_URL = re.compile(r"https?://[^\s/();<>]+\.[^\s();<>]+", re.IGNORECASE)


def has_contact(agent: str) -> bool:
    """Whether a User-Agent names a way to reach its operator: an email address or a URL."""
    return bool(_EMAIL.search(agent) or _URL.search(agent))


RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
BINARY_TYPES = frozenset({"application/octet-stream", "binary/octet-stream", "application/binary"})
CHUNK = 64 * 1024


class FetchFailure(StrEnum):
    """Why a fetch failed, as a key for code to test (with FetchError.status for HTTP_STATUS).

    The words a user reads are in FAILURE_LABELS, so rewording a message never changes what the code does.
    """

    BAD_URL = "bad_url"
    NOT_HTTP = "not_http"
    HTTP_STATUS = "http_status"
    TIMEOUT = "timeout"
    CONNECTION_FAILED = "connection_failed"
    BAD_REDIRECT = "bad_redirect"
    REDIRECT_LOOP = "redirect_loop"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    NOT_AN_IMAGE = "not_an_image"
    TOO_LARGE = "too_large"
    NOT_JSON = "not_json"
    BAD_JSON = "bad_json"
    CANNOT_READ = "cannot_read"
    """A local file (--from) that cannot be read."""
    ENCRYPTED = "encrypted"
    BROKEN_ZIP_ENTRY = "broken_zip_entry"
    TOO_SMALL = "too_small"
    """Raised by gather's own check after the download: a shorter side under --min-side."""
    NAME_TAKEN = "name_taken"
    """Raised by gather's store: both names for the file exist with other content."""
    OFFLINE = "offline"
    """No name could be resolved or no network reached: the machine has no connection."""
    DNS = "dns"
    """This host's name does not exist."""
    TLS = "tls"
    """The secure connection failed: a bad certificate, or something in between rewriting traffic."""
    BLOCKED = "blocked"
    """The server refuses this client (HTTP 403 naming the User-Agent, or a search that is blocked)."""
    LIMIT = "limit"
    """A rate limit asks for a longer wait than --max-wait."""
    LICENCE = "licence"
    """Raised by a source: the listed licence does not allow what --license asks for."""
    NO_THUMBNAIL = "no_thumbnail"
    """Wikimedia could not make a thumbnail (thumberror); originals are never fetched instead."""


FAILURE_LABELS: dict[FetchFailure, str] = {
    FetchFailure.BAD_URL: "bad URL",
    FetchFailure.NOT_HTTP: "not an http(s) URL",
    FetchFailure.HTTP_STATUS: "HTTP",
    FetchFailure.TIMEOUT: "timeout",
    FetchFailure.CONNECTION_FAILED: "connection failed",
    FetchFailure.BAD_REDIRECT: "bad redirect",
    FetchFailure.REDIRECT_LOOP: "redirect loop",
    FetchFailure.TOO_MANY_REDIRECTS: "too many redirects",
    FetchFailure.NOT_AN_IMAGE: NOT_AN_IMAGE,
    FetchFailure.TOO_LARGE: "too large",
    FetchFailure.NOT_JSON: "not JSON",
    FetchFailure.BAD_JSON: "bad JSON",
    FetchFailure.CANNOT_READ: "cannot read file",
    FetchFailure.ENCRYPTED: "encrypted in the zip",
    FetchFailure.BROKEN_ZIP_ENTRY: "broken zip entry",
    FetchFailure.TOO_SMALL: "too small",
    FetchFailure.NAME_TAKEN: "name taken",
    FetchFailure.OFFLINE: "no internet connection",
    FetchFailure.DNS: "host not found",
    FetchFailure.TLS: "secure connection failed",
    FetchFailure.BLOCKED: "blocked",
    FetchFailure.LIMIT: "rate limit reached",
    FetchFailure.LICENCE: "licence not allowed",
    FetchFailure.NO_THUMBNAIL: "no thumbnail",
}
"""The start of each failure's countable reason, as the summary shows it."""

TRANSIENT = frozenset(
    {FetchFailure.TIMEOUT, FetchFailure.CONNECTION_FAILED, FetchFailure.OFFLINE, FetchFailure.LIMIT}
)
"""Failures a later run may not meet: their URLs are tried again (with 429 and 5xx, see is_transient)."""


def is_transient(error: FetchError) -> bool:
    if error.failure in TRANSIENT:
        return True
    return error.failure is FetchFailure.HTTP_STATUS and (
        error.status in RETRY_STATUSES or (error.status or 0) >= 500
    )


def countable(label: str, qualifier: str = "") -> str:
    """The one form of a reason a summary counts: `too large` + `over 25 MB` -> `too large (over 25 MB)`."""
    return f"{label} ({qualifier})" if qualifier else label


class FetchError(Exception):
    """A fetch that failed for good.

    Code tests `failure` (and `status` for HTTP_STATUS); `reason` is the short text a summary counts,
    like "HTTP 404" or "too large (over 25 MB)"; `detail` only adds to the message the user reads.
    """

    def __init__(
        self,
        failure: FetchFailure,
        detail: str = "",
        *,
        status: int | None = None,
        qualifier: str = "",
        limit: RateLimit | None = None,
    ) -> None:
        label = FAILURE_LABELS[failure]
        self.failure = failure
        self.status = status
        self.qualifier = qualifier
        self.detail = detail
        self.limit = limit
        """For LIMIT: what the server said about its limits and when to come back."""
        shown = f"{label} {status}" if failure is FetchFailure.HTTP_STATUS else label
        self.reason = countable(shown, qualifier)
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)

    def with_detail(self, detail: str) -> FetchError:
        """The same failure with another detail (retries add how they ended)."""
        return FetchError(
            self.failure, detail, status=self.status, qualifier=self.qualifier, limit=self.limit
        )


@dataclass(frozen=True)
class RateLimit:
    """A server's answer to "too many requests": when to come back, and the limits its headers named."""

    host: str
    resume_at: float
    """Epoch seconds when the server said it will answer again."""
    limits: tuple[tuple[str, str, int | None], ...] = ()
    """(scope, limit like `100/day`, requests still available) from X-RateLimit-* headers."""
    wait: float = 0.0
    """Seconds the server asked to wait (Retry-After)."""

    def exhausted(self) -> list[tuple[str, str]]:
        """(scope, limit) of the limits with nothing left: the ones that refused."""
        return [(scope, rate) for scope, rate, left in self.limits if left is not None and left <= 0]

    def is_daily(self) -> bool:
        used_up = self.exhausted() or [(scope, rate) for scope, rate, _ in self.limits]
        return any(rate.endswith(("/day", "/d")) for _, rate in used_up) or self.wait > 6 * 3600


def rate_limits(headers: Any) -> tuple[tuple[str, str, int | None], ...]:
    """X-RateLimit-* headers as (scope, limit, available).

    Openverse (its throttle.py) sends one pair per throttle: `X-RateLimit-Limit-<scope>: 5/hour` and
    `X-RateLimit-Available-<scope>: 3`; other APIs send `X-RateLimit-Limit` / `X-RateLimit-Remaining`.
    """
    limits: dict[str, list] = {}
    for key, value in headers.items():
        name = key.lower()
        if not name.startswith("x-ratelimit-"):
            continue
        kind, _, scope = name.removeprefix("x-ratelimit-").partition("-")
        entry = limits.setdefault(scope or "limit", ["", None])
        if kind == "limit":
            entry[0] = value.strip()
        elif kind in ("available", "remaining"):
            with suppress(ValueError):
                entry[1] = int(value)
    return tuple((scope, rate, left) for scope, (rate, left) in sorted(limits.items()))


def too_large(max_bytes: int, detail: str = "") -> FetchError:
    """A body over the --max-mb limit; the limit is part of the counted reason."""
    return FetchError(FetchFailure.TOO_LARGE, detail, qualifier=f"over {_mebibytes(max_bytes)}")


def not_an_image(what: str) -> FetchError:
    """A body that is something else: `what` says what it most likely is (HTML_PAGE, ...)."""
    return FetchError(FetchFailure.NOT_AN_IMAGE, qualifier=what)


class Cancelled(Exception):
    """The run is stopping (Ctrl-C, or the limit was reached); not a failure of the URL."""


class _Retry(Exception):
    def __init__(self, error: FetchError, wait: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.wait = wait


class Clock:
    """Time as the client sees it; tests hand in one that jumps ahead, so a 2-minute Retry-After is
    honoured in full without the test waiting 2 minutes."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float, stop: threading.Event) -> bool:
        """Wait, or return True at once when `stop` is set."""
        return stop.wait(seconds)


WAIT_STEP = 1.0
"""Seconds between countdown updates while waiting for a rate limit."""


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 20.0
    """Seconds to connect, and at most this long without a byte arriving."""
    max_time: float = 120.0
    """Seconds for one whole response, however steadily it trickles in."""
    retries: int = 3
    """Extra tries after a timeout, a dropped connection, a 429 or a 5xx."""
    backoff: float = 1.0
    """First wait between tries in seconds; doubles each time, with jitter."""
    max_wait: float = 60.0
    """A Retry-After longer than this is a limit reached (LIMIT), not a wait; gather's --max-wait sets it
    (10 minutes by default), predict and serve keep this minute."""
    max_bytes: int = 25 * 1024 * 1024
    max_redirects: int = 5
    user_agent: str = field(default_factory=default_user_agent)
    per_host: int = 4
    """Requests at once to any one host, whatever --workers says."""
    host_limits: tuple[tuple[str, int], ...] = (("upload.wikimedia.org", 2),)
    """Hosts whose operators ask for fewer: Wikimedia's robot policy allows 2 at once for media files."""


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    size: int
    url: str
    """Where the bytes finally came from, after redirects."""


def check_url(url: str) -> str:
    """The URL itself, or FetchError when it is not an http(s) URL with a host."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise FetchError(FetchFailure.BAD_URL, url[:200]) from None
    if parts.scheme.lower() not in ("http", "https"):
        shown = f"{parts.scheme}:" if parts.scheme else repr(url[:80])
        raise FetchError(FetchFailure.NOT_HTTP, shown)
    if not parts.hostname:
        raise FetchError(FetchFailure.BAD_URL, url[:200])
    return url.strip()


def sniff_image(head: bytes) -> str | None:
    """The raster format the first bytes announce, or None when they are not one we download."""
    signatures = (
        (b"\xff\xd8\xff", "JPEG"),
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"GIF87a", "GIF"),
        (b"GIF89a", "GIF"),
        (b"BM", "BMP"),
        (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"),
    )
    for magic, name in signatures:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


def describe_non_image(head: bytes) -> str:
    """What a body that is not an image most likely is, for the skip reason (`not an image (...)`)."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not text:
        return "empty body"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text[:512]:
        return HTML_PAGE
    if b"<svg" in text[:1024]:
        return "SVG vector graphics"
    if text.startswith((b"{", b"[")):
        return "JSON"
    return "unknown file type"


def write_limited(
    chunks: Iterable[bytes],
    dest: Path,
    max_bytes: int,
    stop: threading.Event | None = None,
    require_image: bool = False,
) -> tuple[str, int]:
    """Stream chunks into a new file `dest` (sha256, size), removing it again on any failure.

    `require_image` checks the magic bytes before anything past the first chunk is read, so a large
    non-image body costs one chunk.
    """
    digest = hashlib.sha256()
    size = 0
    head = b""
    try:
        with open(dest, "xb") as handle:
            for chunk in chunks:
                if stop is not None and stop.is_set():
                    raise Cancelled()
                if not chunk:
                    continue
                if require_image and len(head) < 32:
                    head += chunk[: 32 - len(head)]
                    if len(head) >= 32 and sniff_image(head) is None:
                        raise not_an_image(describe_non_image(head + chunk[:1024]))
                size += len(chunk)
                if size > max_bytes:
                    raise too_large(max_bytes)
                digest.update(chunk)
                handle.write(chunk)
        if require_image and sniff_image(head) is None:
            raise not_an_image(describe_non_image(head))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def _mebibytes(count: int) -> str:
    """Bytes in units of 1024 x 1024, as --max-mb counts them (shown as "MB", like the option)."""
    return f"{count / 1024 / 1024:.3g} MB"


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds to wait: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now if now is not None else time.time()
    return max(0.0, when.timestamp() - current)


class HostSlots:
    """At most N requests at once per host: a semaphore per host and limit, made on first use.

    A source that asks for fewer (Wikimedia's media host: 2) gets its own, so its downloads never share
    slots with the API calls of the same host.
    """

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self.named = dict(policy.host_limits)
        self._slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def limit_of(self, host: str, asked: int | None = None) -> int:
        limits = [self.policy.per_host, self.named.get(host, self.policy.per_host)]
        return max(1, min(limits + ([asked] if asked else [])))

    @contextmanager
    def hold(self, url: str, asked: int | None, stop: threading.Event) -> Iterator[None]:
        host = (urlsplit(url).hostname or "").lower()
        key = (host, self.limit_of(host, asked))
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = threading.BoundedSemaphore(key[1])
        while not slot.acquire(timeout=0.2):
            if stop.is_set():
                raise Cancelled()
        try:
            yield
        finally:
            slot.release()


class HttpClient:
    """Thread-safe: each worker thread gets its own `requests.Session` (connection reuse per host)."""

    def __init__(
        self,
        policy: FetchPolicy | None = None,
        stop: threading.Event | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.policy = policy or FetchPolicy()
        self.stop = stop or threading.Event()
        self.clock = clock or Clock()
        self.on_wait: Callable[[str, float], None] | None = None
        """Called about once a second while a rate limit is waited out: (host, seconds left)."""
        self.slots = HostSlots(self.policy)
        self._local = threading.local()
        self._active: set[requests.Response] = set()
        self._lock = threading.Lock()

    def abort(self) -> None:
        """Stop everything: pending waits return, and reads blocked on a socket are cut off."""
        self.stop.set()
        with self._lock:
            active = list(self._active)
        for response in active:
            shutdown = getattr(response.raw, "shutdown", None)  # urllib3 >= 2.3
            try:
                if shutdown is not None:
                    shutdown()
                response.close()
            except Exception:  # the reader thread reports its own error; this only unblocks it
                pass

    def get_json(
        self, url: str, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> Any:
        """A JSON API response, with the same retries, limits and checks as downloads."""
        return self._json("GET", url, params, None, headers)

    def post_form(self, url: str, data: dict[str, str]) -> Any:
        """POST application/x-www-form-urlencoded, answered with JSON (an OAuth2 token endpoint)."""
        return self._json("POST", url, None, data, None)

    def _json(
        self,
        method: str,
        url: str,
        params: dict[str, Any] | None,
        data: dict[str, str] | None,
        headers: dict[str, str] | None,
    ) -> Any:
        def attempt(target: str, query: dict[str, Any] | None) -> Any:
            response = self._open(target, "application/json", query, method, data, headers)
            with self._tracked(response):
                ctype = _content_type(response)
                if "json" not in ctype:
                    raise FetchError(FetchFailure.NOT_JSON, f"served as {ctype or 'unknown type'}")
                body = bytearray()
                for chunk in self._chunks(response, time.monotonic() + self.policy.max_time):
                    body += chunk
                    if len(body) > self.policy.max_bytes:
                        raise too_large(self.policy.max_bytes)
            try:
                return json.loads(body)
            except ValueError as error:
                raise FetchError(FetchFailure.BAD_JSON, str(error)[:100]) from None

        with self.slots.hold(url, None, self.stop):
            return self._with_retries(url, params, attempt)

    def download(self, url: str, dest: Path, host_limit: int | None = None) -> Fetched:
        """Stream an image into the new file `dest`; FetchError or Cancelled leave no file behind."""

        def attempt(target: str, query: dict[str, Any] | None) -> Fetched:
            response = self._open(target, IMAGE_ACCEPT, query)
            with self._tracked(response):
                _check_image_headers(response, self.policy.max_bytes)
                chunks = self._chunks(response, time.monotonic() + self.policy.max_time)
                sha256, size = write_limited(
                    chunks, dest, self.policy.max_bytes, self.stop, require_image=True
                )
                return Fetched(path=dest, sha256=sha256, size=size, url=response.url)

        check_url(url)
        with self.slots.hold(url, host_limit, self.stop):
            return self._with_retries(url, None, attempt)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = self.policy.user_agent
            self._local.session = session
        return session

    @contextmanager
    def _tracked(self, response: requests.Response) -> Iterator[None]:
        with self._lock:
            self._active.add(response)
        try:
            yield
        finally:
            with self._lock:
                self._active.discard(response)
            response.close()

    def _with_retries(
        self, url: str, params: dict[str, Any] | None, attempt: Callable[[str, dict[str, Any] | None], T]
    ) -> T:
        url = check_url(url)
        tries = 0
        while True:
            if self.stop.is_set():
                raise Cancelled()
            tries += 1
            try:
                return attempt(url, params)
            except _Retry as retry:
                error = retry.error
                if retry.wait is not None and retry.wait > self.policy.max_wait:
                    raise error from None
                if tries > self.policy.retries:
                    detail = f"{error.detail}, " if error.detail else ""
                    raise error.with_detail(f"{detail}gave up after {tries} tries") from None
                wait = retry.wait if retry.wait is not None else self._backoff(tries)
                self.wait(wait, urlsplit(url).hostname or "")

    def wait(self, seconds: float, host: str) -> None:
        """Wait out a limit, counting down through `on_wait`; Cancelled when the run stops."""
        remaining = seconds
        while remaining > 0:
            step = min(WAIT_STEP, remaining)
            if self.on_wait is not None and seconds >= 2 * WAIT_STEP:
                self.on_wait(host, remaining)
            if self.clock.sleep(step, self.stop):
                raise Cancelled()
            remaining -= step
        if self.on_wait is not None and seconds >= 2 * WAIT_STEP:
            self.on_wait(host, 0.0)

    def _backoff(self, tries: int) -> float:
        return self.policy.backoff * 2 ** (tries - 1) * random.uniform(1.0, 1.5)

    def _open(
        self,
        url: str,
        accept: str,
        params: dict[str, Any] | None,
        method: str = "GET",
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        """One try at a response with a 2xx status, following redirects one checked hop at a time."""
        seen: set[str] = set()
        for _ in range(self.policy.max_redirects + 1):
            check_url(url)
            if url in seen:
                raise FetchError(FetchFailure.REDIRECT_LOOP, url[:200])
            seen.add(url)
            response = self._request(method, url, accept, params, data, headers)
            params = None
            status = response.status_code
            if status in REDIRECT_STATUSES and method == "GET":
                location = response.headers.get("Location", "")
                response.close()
                if not location:
                    raise FetchError(FetchFailure.BAD_REDIRECT, f"HTTP {status} without a Location")
                url = urljoin(response.url, location)
                continue
            if status in RETRY_STATUSES or status >= 500:
                raise self._retry_for(response)
            if status == 403:
                raise _refusal(response)
            if status != 200:
                response.close()
                raise FetchError(FetchFailure.HTTP_STATUS, status=status)
            return response
        raise FetchError(FetchFailure.TOO_MANY_REDIRECTS, f"more than {self.policy.max_redirects}")

    def _request(
        self,
        method: str,
        url: str,
        accept: str,
        params: dict[str, Any] | None,
        data: dict[str, str] | None,
        headers: dict[str, str] | None,
    ) -> requests.Response:
        try:
            return self._session().request(
                method,
                url,
                params=params,
                data=data,
                headers={"Accept": accept, **(headers or {})},
                stream=True,
                timeout=(self.policy.timeout, self.policy.timeout),
                allow_redirects=False,
            )
        except requests.Timeout:
            raise _Retry(
                FetchError(FetchFailure.TIMEOUT, f"no answer within {self.policy.timeout:g} s")
            ) from None
        except requests.ConnectionError as error:
            if self.stop.is_set():
                raise Cancelled() from None
            named = name_connection_error(error, urlsplit(url).hostname or "")
            if named.failure is FetchFailure.CONNECTION_FAILED:
                raise _Retry(named) from None
            raise named from None
        except (requests.RequestException, ValueError) as error:
            raise FetchError(FetchFailure.BAD_URL, _short(error)) from None

    def _retry_for(self, response: requests.Response) -> _Retry:
        """A 429 or 5xx to retry after its Retry-After, or a LIMIT when that is longer than --max-wait."""
        status = response.status_code
        wait = retry_after_seconds(response.headers.get("Retry-After"), self.clock.now())
        limits = rate_limits(response.headers)
        response.close()
        host = urlsplit(response.url).hostname or ""
        if wait is not None and wait > self.policy.max_wait:
            limit = RateLimit(host=host, resume_at=self.clock.now() + wait, limits=limits, wait=wait)
            detail = f"asked to retry after {wait:.0f} s"
            return _Retry(FetchError(FetchFailure.LIMIT, detail, status=status, limit=limit), wait)
        return _Retry(FetchError(FetchFailure.HTTP_STATUS, status=status), wait)

    def _chunks(self, response: requests.Response, deadline: float) -> Iterator[bytes]:
        """The body in chunks as they arrive, so the time limit and the stop event are checked between any
        two reads (a 64 KB read would wait for 64 KB); trouble mid-body becomes a retry, or Cancelled."""
        try:
            for chunk in _arriving(response):
                if self.stop.is_set():
                    raise Cancelled()
                if time.monotonic() > deadline:
                    raise FetchError(
                        FetchFailure.TIMEOUT, f"the transfer took over {self.policy.max_time:g} s"
                    )
                yield chunk
        except (Cancelled, FetchError):
            raise
        except Exception as error:
            if self.stop.is_set():
                raise Cancelled() from None
            if isinstance(error, OSError | urllib3.exceptions.HTTPError):
                timed_out = "timed out" in str(error).lower()  # urllib3 and ssl say so only in words
                failure = FetchFailure.TIMEOUT if timed_out else FetchFailure.CONNECTION_FAILED
                raise _Retry(FetchError(failure, "while reading the body")) from None
            raise


def _arriving(response: requests.Response) -> Iterator[bytes]:
    read1 = getattr(response.raw, "read1", None)  # urllib3 >= 2
    if read1 is None:
        yield from response.iter_content(CHUNK)
        return
    while chunk := read1(CHUNK, decode_content=True):
        yield chunk


IMAGE_ACCEPT = "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.1"


def _content_type(response: requests.Response) -> str:
    return response.headers.get("Content-Type", "").split(";")[0].strip().lower()


def _check_image_headers(response: requests.Response, max_bytes: int) -> None:
    """Refuse before reading the body: a declared type that is not an image, or a declared size too big."""
    ctype = _content_type(response)
    if ctype == "text/html" or ctype == "application/xhtml+xml":
        raise not_an_image(HTML_PAGE)
    if ctype == "image/svg+xml":
        raise not_an_image("SVG vector graphics")
    if ctype and not ctype.startswith("image/") and ctype not in BINARY_TYPES:
        raise not_an_image(f"served as {ctype}")
    length = response.headers.get("Content-Length", "").strip()
    if length.isdigit() and int(length) > max_bytes:
        raise too_large(max_bytes, f"{_mebibytes(int(length))} declared")


def _refusal(response: requests.Response) -> FetchError:
    """A 403: a block when the body says the User-Agent is refused (Wikimedia's policy page), else HTTP 403."""
    try:
        head = response.raw.read(2048, decode_content=True) or b""
    except Exception:  # the status alone is enough to report
        head = b""
    response.close()
    text = head.decode("utf-8", "replace")
    if "user-agent" in text.lower() or "user agent" in text.lower():
        return FetchError(FetchFailure.BLOCKED, " ".join(text.split())[:200], qualifier="User-Agent refused")
    return FetchError(FetchFailure.HTTP_STATUS, status=403)


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and everything it wraps (requests -> urllib3 MaxRetryError.reason -> socket errors)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [item.__cause__, item.__context__, getattr(item, "reason", None)]
        todo += [arg for arg in getattr(item, "args", ()) if isinstance(arg, BaseException)]


OFFLINE_ERRNOS = frozenset({errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTUNREACH})


def name_connection_error(error: BaseException, host: str) -> FetchError:
    """What a failed connection means for the user: offline, a name that does not exist, TLS, or other."""
    for cause in _causes(error):
        if isinstance(cause, requests.exceptions.SSLError) or cause.__class__.__name__.startswith("SSL"):
            return FetchError(FetchFailure.TLS, f"{host}: {_short(cause)}")
        if isinstance(cause, socket.gaierror):
            if cause.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None)):
                return FetchError(FetchFailure.OFFLINE, f"cannot look up {host}")
            return FetchError(FetchFailure.DNS, host)
        if isinstance(cause, OSError) and cause.errno in OFFLINE_ERRNOS:
            return FetchError(FetchFailure.OFFLINE, f"network unreachable for {host}")
    return FetchError(FetchFailure.CONNECTION_FAILED, _short(error))


def _short(error: BaseException) -> str:
    text = str(error)
    return text if len(text) <= 160 else text[:157] + "..."
