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
import random
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from . import __version__

USER_AGENT = (
    f"image-classifier/{__version__} (gathers training photos for a personal image classifier; "
    f"set GATHER_USER_AGENT to add your contact) python-requests/{requests.__version__}"
)
"""Wikimedia asks every client for a descriptive User-Agent; $GATHER_USER_AGENT replaces this one."""

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
BINARY_TYPES = frozenset({"application/octet-stream", "binary/octet-stream", "application/binary"})
CHUNK = 64 * 1024


class FetchError(Exception):
    """A download that failed for good; `reason` is short enough to count in a summary."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


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
    user_agent: str = USER_AGENT


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
        raise FetchError("bad URL", url[:200]) from None
    if parts.scheme.lower() not in ("http", "https"):
        shown = f"{parts.scheme}:" if parts.scheme else repr(url[:80])
        raise FetchError("not an http(s) URL", shown)
    if not parts.hostname:
        raise FetchError("bad URL", url[:200])
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
    """What a body that is not an image most likely is, for the skip reason."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not text:
        return "not an image (empty body)"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text[:512]:
        return "not an image (HTML page)"
    if b"<svg" in text[:1024]:
        return "not an image (SVG vector graphics)"
    if text.startswith((b"{", b"[")):
        return "not an image (JSON)"
    return "not an image (unknown file type)"


def write_limited(
    chunks: Iterable[bytes],
    dest: Path,
    max_bytes: int,
    stop: threading.Event | None = None,
    deadline: float | None = None,
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
                        raise FetchError(describe_non_image(head + chunk[:1024]))
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"too large (over {_megabytes(max_bytes)})")
                if deadline is not None and time.monotonic() > deadline:
                    raise FetchError("timeout", "the transfer took too long")
                digest.update(chunk)
                handle.write(chunk)
        if require_image and sniff_image(head) is None:
            raise FetchError(describe_non_image(head))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def _megabytes(count: int) -> str:
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
        when = when.replace(tzinfo=timezone.utc)
    current = now if now is not None else datetime.now(timezone.utc).timestamp()
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
        for _ in self._attempts(url, params, accept="application/json") as_iter():
            pass
        raise AssertionError("unreachable")

    def download(self, url: str, dest: Path) -> Fetched:
        """Stream an image to the new file `dest`; FetchError or Cancelled leave no file behind."""
        raise NotImplementedError
