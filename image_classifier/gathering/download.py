"""An HTTP client for a hostile network: every way a download can go wrong ends as a short, countable reason.

Only http and https are followed (redirects too, one hop at a time); 429 and 5xx are retried with backoff,
waiting as long as Retry-After asks within reason; bodies are streamed to a file the caller names (a
temporary one, renamed only once it proved to be an image), with a size limit, a time limit and a
magic-byte check, so an HTML error page or an endless stream never becomes a "photo". A stop event and
`abort()` let Ctrl-C end downloads that are blocked in a read.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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

USER_AGENT = (
    f"image-classifier/{__version__} (gathers training photos for a personal image classifier; "
    f"set GATHER_USER_AGENT to add your contact) python-requests/{requests.__version__}"
)
"""Wikimedia asks every client for a descriptive User-Agent; $GATHER_USER_AGENT replaces this one."""


def default_user_agent() -> str:
    return os.environ.get("GATHER_USER_AGENT") or USER_AGENT


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
}
"""The start of each failure's countable reason, as the summary shows it."""


def countable(label: str, qualifier: str = "") -> str:
    """The one form of a reason a summary counts: `too large` + `over 25 MB` -> `too large (over 25 MB)`."""
    return f"{label} ({qualifier})" if qualifier else label


class FetchError(Exception):
    """A fetch that failed for good.

    Code tests `failure` (and `status` for HTTP_STATUS); `reason` is the short text a summary counts,
    like "HTTP 404" or "too large (over 25 MB)"; `detail` only adds to the message the user reads.
    """

    def __init__(
        self, failure: FetchFailure, detail: str = "", *, status: int | None = None, qualifier: str = ""
    ) -> None:
        label = FAILURE_LABELS[failure]
        self.failure = failure
        self.status = status
        self.qualifier = qualifier
        self.detail = detail
        self.reason = countable(label if status is None else f"{label} {status}", qualifier)
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)

    def with_detail(self, detail: str) -> FetchError:
        """The same failure with another detail (retries add how they ended)."""
        return FetchError(self.failure, detail, status=self.status, qualifier=self.qualifier)


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
    """A Retry-After longer than this gives up on the URL instead of stalling the run."""
    max_bytes: int = 25 * 1024 * 1024
    max_redirects: int = 5
    user_agent: str = field(default_factory=default_user_agent)


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


class HttpClient:
    """Thread-safe: each worker thread gets its own `requests.Session` (connection reuse per host)."""

    def __init__(self, policy: FetchPolicy | None = None, stop: threading.Event | None = None) -> None:
        self.policy = policy or FetchPolicy()
        self.stop = stop or threading.Event()
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

    def get_json(self, url: str, params: dict[str, Any] | None = None) -> Any:
        """A JSON API response, with the same retries, limits and checks as downloads."""

        def attempt(target: str, query: dict[str, Any] | None) -> Any:
            response = self._open(target, "application/json", query)
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

        return self._with_retries(url, params, attempt)

    def download(self, url: str, dest: Path) -> Fetched:
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
                if tries > self.policy.retries:
                    detail = f"{error.detail}, " if error.detail else ""
                    raise error.with_detail(f"{detail}gave up after {tries} tries") from None
                if retry.wait is not None and retry.wait > self.policy.max_wait:
                    raise error.with_detail(f"asked to retry after {retry.wait:.0f} s") from None
                wait = retry.wait if retry.wait is not None else self._backoff(tries)
                if self.stop.wait(wait):
                    raise Cancelled() from None

    def _backoff(self, tries: int) -> float:
        return self.policy.backoff * 2 ** (tries - 1) * random.uniform(1.0, 1.5)

    def _open(self, url: str, accept: str, params: dict[str, Any] | None) -> requests.Response:
        """One try at a response with a 2xx status, following redirects one checked hop at a time."""
        seen: set[str] = set()
        for _ in range(self.policy.max_redirects + 1):
            check_url(url)
            if url in seen:
                raise FetchError(FetchFailure.REDIRECT_LOOP, url[:200])
            seen.add(url)
            try:
                response = self._session().get(
                    url,
                    params=params,
                    headers={"Accept": accept},
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
                raise _Retry(FetchError(FetchFailure.CONNECTION_FAILED, _short(error))) from None
            except (requests.RequestException, ValueError) as error:
                raise FetchError(FetchFailure.BAD_URL, _short(error)) from None
            params = None
            status = response.status_code
            if status in REDIRECT_STATUSES:
                location = response.headers.get("Location", "")
                response.close()
                if not location:
                    raise FetchError(FetchFailure.BAD_REDIRECT, f"HTTP {status} without a Location")
                url = urljoin(response.url, location)
                continue
            if status in RETRY_STATUSES or status >= 500:
                wait = retry_after_seconds(response.headers.get("Retry-After"))
                response.close()
                raise _Retry(FetchError(FetchFailure.HTTP_STATUS, status=status), wait)
            if status != 200:
                response.close()
                raise FetchError(FetchFailure.HTTP_STATUS, status=status)
            return response
        raise FetchError(FetchFailure.TOO_MANY_REDIRECTS, f"more than {self.policy.max_redirects}")

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


def _short(error: BaseException) -> str:
    text = str(error)
    return text if len(text) <= 160 else text[:157] + "..."
