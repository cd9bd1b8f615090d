"""Where candidate images come from: one class per source, looked up by name in SOURCES.

A source only lists candidates (a URL or local file, with page, licence and author when it knows them)
and fetches one into a file it is given. Checking, deduplicating and storing are the same for every
source and live in run.py and store.py, so a file imported from a zip passes exactly the tests a download does.
"""

from __future__ import annotations

import csv
import math
import os
import time
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from ..errors import UserError
from ..images import JUNK_DIRS, is_candidate, list_image_files
from .download import (
    CHUNK,
    USER_AGENT_ENV,
    Fetched,
    FetchError,
    FetchFailure,
    HttpClient,
    RateLimit,
    has_contact,
    too_large,
    write_limited,
)

if TYPE_CHECKING:
    from .store import SearchProgress

DEFAULT_LIMIT = 200
PAST_THE_LAST_PAGE = frozenset({400, 401, 404})
"""Statuses Openverse answers a page deeper than anonymous requests may go with: the end of the results."""


@dataclass(frozen=True)
class Candidate:
    url: str
    page: str = ""
    licence: str = ""
    author: str = ""
    width: int | None = None
    """Listed size of the file that will be fetched, when the source says; lets tiny images be skipped unseen."""
    height: int | None = None
    ref: str = ""
    """The source's own handle for a local candidate: a file path or a zip member name."""
    refused: str = ""
    """A reason to skip it unfetched (a licence --license excludes, no thumbnail), counted like a failure."""
    host_limit: int | None = None
    """Downloads at once the source's media host allows (Wikimedia's robot policy: 2)."""


class SearchError(Exception):
    """A search request that failed for good (after retries); ends that query, not the run.

    `failure` says why in a form code can test (offline, blocked, ...); `limit` is set when a rate limit
    stopped the search, and then the whole source stops until a re-run.
    """

    def __init__(
        self,
        message: str,
        failure: FetchFailure | None = None,
        limit: RateLimit | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.failure = failure
        self.limit = limit
        self.status = status


LICENCES = ("any", "commercial", "modification")
"""--license: any licence, those that allow commercial use (no NC), or those that allow changes (no ND)."""


@dataclass(frozen=True)
class SourceSettings:
    client: HttpClient
    categories: tuple[str, ...] = ()
    urls_file: Path | None = None
    from_path: Path | None = None
    licence: str = "any"
    state_dir: Path | None = None
    """Where the source may keep private state (the Openverse token), inside the workspace."""
    progress: SearchProgress | None = None


class Source(ABC):
    name: ClassVar[str]
    label: ClassVar[str]
    remote: ClassVar[bool] = True
    """Remote candidates are never fetched twice: a URL in the manifest is skipped on later runs."""
    searches: ClassVar[bool] = False
    """Takes --query; the others list what they have."""
    default_limit: ClassVar[int | None] = DEFAULT_LIMIT

    def __init__(self, settings: SourceSettings) -> None:
        self.client = settings.client

    def categories(self) -> list[str] | None:
        """The categories the source itself defines (CSV rows, subfolders), or None for searches."""
        return None

    def check_categories(self, categories: Sequence[str]) -> None:
        """UserError when the source has nothing at all for these categories."""
        return None

    @abstractmethod
    def streams(self, category: str, queries: Sequence[str]) -> list[Iterator[Candidate]]:
        """One lazy stream of candidates per query; gather takes from them in turn."""

    def fetch(self, candidate: Candidate, dest: Path) -> Fetched:
        return self.client.download(candidate.url, dest, candidate.host_limit)


SOURCES: dict[str, type[Source]] = {}


def register(cls: type[Source]) -> type[Source]:
    SOURCES[cls.name] = cls
    return cls


def create_source(name: str, settings: SourceSettings) -> Source:
    try:
        cls = SOURCES[name]
    except KeyError:
        raise UserError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}") from None
    return cls(settings)


class SearchSource(Source):
    searches = True

    def streams(self, category: str, queries: Sequence[str]) -> list[Iterator[Candidate]]:
        return [self.search(query) for query in queries]

    @abstractmethod
    def search(self, query: str) -> Iterator[Candidate]:
        """Results for one query, most relevant first, fetched page by page as they are consumed."""

    stopped: SearchError | None = None
    """Set when a limit ended the searches: every later query of this run fails the same way at once."""

    def _get_json(
        self, url: str, params: dict[str, Any], query: str, headers: dict[str, str] | None = None
    ) -> Any:
        if self.stopped is not None:
            raise self.stopped
        try:
            return self.client.get_json(url, params, headers)
        except FetchError as error:
            raise self.search_error(error, query) from None

    def search_error(self, error: FetchError, query: str) -> SearchError:
        """The one line a failed search request gets, in words that say what to do."""
        if error.failure is FetchFailure.LIMIT and error.limit is not None:
            self.stopped = SearchError(self.limit_message(error.limit), FetchFailure.LIMIT, error.limit)
            return self.stopped
        if error.failure is FetchFailure.DNS:  # the service's own host exists: name lookups are failing
            return SearchError(
                f"{self.label} search for {query!r} failed: cannot look up {error.detail}, which exists: "
                "this machine seems to have no internet connection or no working DNS (connect and run again)",
                FetchFailure.OFFLINE,
            )
        hint = FAILURE_HINTS.get(error.failure, "")
        if error.failure is FetchFailure.BLOCKED and "User-Agent" in error.qualifier:
            hint = f" (give a way to contact you with --contact, or set {USER_AGENT_ENV})"
        message = f"{self.label} search for {query!r} failed: {error}{hint}"
        return SearchError(message, error.failure, status=error.status)

    def limit_message(self, limit: RateLimit) -> str:
        named = ", ".join(f"{rate} ({scope})" for scope, rate in limit.exhausted() or limit_rates(limit))
        allowed = f" (its limit: {named})" if named else ""
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(limit.resume_at))
        what = (
            "daily limit is used up"
            if limit.is_daily()
            else "rate limit asks for a longer wait than --max-wait"
        )
        return f"{self.label}'s {what}{allowed}: run the same command again after {when} to continue"


def limit_rates(limit: RateLimit) -> list[tuple[str, str]]:
    return [(scope, rate) for scope, rate, _ in limit.limits if rate]


FAILURE_HINTS = {
    FetchFailure.OFFLINE: " (this machine seems to have no internet connection: connect and run again)",
    FetchFailure.TLS: " (a network in between may be intercepting secure connections: try another network)",
    FetchFailure.BLOCKED: " (the service blocks this client)",
}
"""What to do, added to a failed search's line."""


def licence_refusal(licence: str, wanted: str) -> str:
    """Why a listed licence does not allow what --license asks for, or "" when it does."""
    if wanted == "any":
        return ""
    text = licence.upper().replace("-", " ").replace("_", " ").split()
    if not text:
        return FetchError(FetchFailure.LICENCE, qualifier="licence unknown").reason
    if wanted == "commercial" and "NC" in text:
        return FetchError(FetchFailure.LICENCE, qualifier="no commercial use").reason
    if wanted == "modification" and "ND" in text:
        return FetchError(FetchFailure.LICENCE, qualifier="no modification").reason
    return ""


@register
class WikimediaSource(SearchSource):
    """Wikimedia Commons: freely licensed files, searched with the MediaWiki Action API (no key).

    Its rules, as its policies state them: a User-Agent with a contact (requests without one get a 403),
    `maxlag` on every non-interactive request (and a pause when the servers lag), continuation as the
    original request plus the last `continue`, and at most 2 downloads at once from upload.wikimedia.org.
    Only thumbnails are fetched: a file without one (thumberror) is skipped, its original never fetched.
    """

    name = "wikimedia"
    label = "Wikimedia Commons"
    API_URL = "https://commons.wikimedia.org/w/api.php"
    ENV = "WIKIMEDIA_API_URL"
    THUMB_WIDTH = 960
    """A standard Wikimedia thumbnail step: served from cache, far smaller than most originals."""
    BATCH = 50
    MAXLAG = 5
    """Seconds of replication lag past which the API should refuse us: the value the etiquette advises."""
    MAXLAG_TRIES = 5
    MEDIA_CONCURRENCY = 2
    """Downloads at once from the thumbnail host (upload.wikimedia.org): the robot policy's limit."""

    def __init__(self, settings: SourceSettings, api_url: str | None = None) -> None:
        super().__init__(settings)
        self.api_url = api_url or os.environ.get(self.ENV) or self.API_URL
        self.licence = settings.licence
        if not has_contact(self.client.policy.user_agent):
            raise UserError(
                "--source wikimedia needs a way to contact you in the User-Agent (Wikimedia blocks clients "
                "without one): add --contact you@example.org (or a URL of yours), or set "
                f"{USER_AGENT_ENV}='my-classifier/1.0 (you@example.org)'"
            )

    def search(self, query: str) -> Iterator[Candidate]:
        original: dict[str, Any] = {
            "action": "query",
            "format": "json",
            "formatversion": "2",
            "maxlag": str(self.MAXLAG),
            "generator": "search",
            "gsrsearch": f"{query} filetype:bitmap",
            "gsrnamespace": "6",
            "gsrlimit": str(self.BATCH),
            "prop": "imageinfo",
            "iiprop": "url|size|mime|extmetadata",
            "iiurlwidth": str(self.THUMB_WIDTH),
            "iiextmetadatafilter": "Artist|LicenseShortName|LicenseUrl",
            "iiextmetadatalanguage": "en",
        }
        seen: set[str] = set()
        last_continue: dict[str, Any] = {}
        while True:
            data = self._answer({**original, **last_continue}, query)
            pages = data.get("query", {}).get("pages", [])
            if isinstance(pages, dict):
                pages = list(pages.values())
            for page in sorted(pages, key=lambda item: item.get("index", 0)):
                title = page.get("title", "")
                info = (page.get("imageinfo") or [None])[0]
                if not info or title in seen:
                    continue  # its imageinfo comes with a later continuation
                seen.add(title)
                candidate = self._candidate(info)
                if candidate is not None:
                    yield candidate
            last_continue = data.get("continue") or {}
            if not last_continue:
                return

    def _answer(self, params: dict[str, Any], query: str) -> dict[str, Any]:
        """One API answer; a maxlag error is waited out (at least 5 s, as the etiquette asks) and retried."""
        for _ in range(self.MAXLAG_TRIES):
            data = self._get_json(self.api_url, params, query)
            if not isinstance(data, dict):
                raise SearchError(f"{self.label} search for {query!r}: unexpected answer")
            error = data.get("error")
            if not error:
                return data
            if error.get("code") != "maxlag":
                raise SearchError(
                    f"{self.label} search for {query!r} failed: {error.get('code')}: {error.get('info')}"
                )
            lag = _int(error.get("lag")) or 0
            self.client.wait(max(float(self.MAXLAG), float(lag)), urlsplit(self.api_url).hostname or "")
        raise SearchError(
            f"{self.label} search for {query!r}: the servers stayed lagged (maxlag) through "
            f"{self.MAXLAG_TRIES} tries; they are busy: run again later",
            FetchFailure.LIMIT,
        )

    def _candidate(self, info: dict[str, Any]) -> Candidate | None:
        if not str(info.get("mime", "image/")).startswith("image/"):
            return None
        meta = info.get("extmetadata") or {}
        licence = plain_text(_meta_value(meta, "LicenseShortName"))
        thumb = info.get("thumburl")
        refused = licence_refusal(licence, self.licence)
        if not thumb:
            if not info.get("url"):
                return None
            refused = FetchError(FetchFailure.NO_THUMBNAIL, qualifier="thumberror").reason
        return Candidate(
            url=thumb or info["url"],
            page=info.get("descriptionurl", ""),
            licence=licence,
            author=plain_text(_meta_value(meta, "Artist")),
            width=_int(info.get("thumbwidth")),
            height=_int(info.get("thumbheight")),
            refused=refused,
            host_limit=self.MEDIA_CONCURRENCY,
        )


@register
class OpenverseSource(SearchSource):
    """Openverse: Creative Commons photos from Flickr, museums and more; 20 results a page, 20 pages.

    Anonymous searches get the API's small limits; OPENVERSE_CLIENT_ID / OPENVERSE_CLIENT_SECRET give a
    registered application's. How far each query got is kept, so a re-run after a limit continues there.
    """

    name = "openverse"
    label = "Openverse"
    API_URL = "https://api.openverse.org/v1/images/"
    ENV = "OPENVERSE_API_URL"
    PAGE_SIZE = 20
    """The most an anonymous request may ask for."""
    MAX_PAGE = 20
    """The API's pagination depth: page 21 is a 400, so it is never asked for."""

    def __init__(self, settings: SourceSettings, api_url: str | None = None) -> None:
        from .credentials import OpenverseCredentials

        super().__init__(settings)
        self.api_url = api_url or os.environ.get(self.ENV) or self.API_URL
        self.licence = settings.licence
        self.progress = settings.progress
        state = settings.state_dir or Path(".")
        self.credentials = OpenverseCredentials(self.client, self.api_url, state)

    def search(self, query: str) -> Iterator[Candidate]:
        key = f"{self.name}|{self.licence}|{query}"
        page = self.progress.next_page(key) if self.progress else 1
        while page <= self.MAX_PAGE:
            data = self._page(query, page)
            results = data.get("results") if isinstance(data, dict) else None
            if not results:
                break
            for item in results:
                if item.get("url"):
                    yield self._candidate(item)
            if self.progress:
                self.progress.reached(key, page + 1)
            if page >= (_int(data.get("page_count")) or 0):
                break
            page += 1
        if self.progress:
            self.progress.finished(key)  # a search read to its end starts afresh next time

    def _page(self, query: str, page: int) -> Any:
        params = {"q": query, "page": page, "page_size": self.PAGE_SIZE, "category": "photograph"}
        if self.licence != "any":
            params["license_type"] = self.licence
        for renewed in (False, True):
            try:
                return self._get_json(self.api_url, params, query, self._headers(query))
            except SearchError as error:
                if error.status == 401 and self.credentials.enabled and not renewed:
                    self.credentials.renew()  # an expired or revoked token: ask for a new one once
                    continue
                if page > 1 and error.status in PAST_THE_LAST_PAGE:
                    return {}
                raise
        return {}

    def _headers(self, query: str) -> dict[str, str]:
        try:
            return self.credentials.headers()
        except FetchError as error:
            raise self.search_error(error, query) from None

    def limit_message(self, limit: RateLimit) -> str:
        text = super().limit_message(limit)
        if self.credentials.enabled:
            return text
        return f"{text}, or set OPENVERSE_CLIENT_ID and OPENVERSE_CLIENT_SECRET for a registered app's higher limits"

    def _candidate(self, item: dict[str, Any]) -> Candidate:
        return Candidate(
            url=item["url"],
            page=item.get("foreign_landing_url") or "",
            licence=openverse_licence(item.get("license"), item.get("license_version")),
            author=item.get("creator") or "",
            width=_int(item.get("width")),
            height=_int(item.get("height")),
        )


@register
class DdgSource(SearchSource):
    """DuckDuckGo image search through the `ddgs` package: the most relevant results, but no licences.

    ddgs turns a refused request into "No results found.", the same as an empty search, so its engine is
    driven one request at a time here and the HTTP status itself says whether it was a block (403) or a
    rate limit (429, or 202 with no results, DuckDuckGo's way of saying so).
    """

    name = "ddg"
    label = "DuckDuckGo"
    SITE_URL = "https://duckduckgo.com"
    ENV = "DDG_URL"
    MAX_PAGES = 5
    MAYBE_BLOCKED = (
        "DuckDuckGo answered no images for {query!r}; that can also mean it is blocking or rate-limiting "
        "this address: wait an hour and run again, try other --query words, or use --source openverse"
    )

    def __init__(self, settings: SourceSettings) -> None:
        super().__init__(settings)
        self.site = (os.environ.get(self.ENV) or self.SITE_URL).rstrip("/")

    def search(self, query: str) -> Iterator[Candidate]:
        engine = _ddg_engine(self.site, max(1, math.ceil(self.client.policy.timeout)))
        seen: set[str] = set()
        for page in range(1, self.MAX_PAGES + 1):
            results = self._page(engine, query, page)
            fresh = [item for item in results if item.get("image") and item["image"] not in seen]
            if not fresh:
                if page == 1:
                    raise SearchError(self.MAYBE_BLOCKED.format(query=query), FetchFailure.BLOCKED)
                return
            for item in fresh:
                seen.add(item["image"])
                yield Candidate(
                    url=item["image"],
                    page=item.get("url") or "",
                    width=_int(item.get("width")),
                    height=_int(item.get("height")),
                )

    def _page(self, engine: Any, query: str, page: int) -> list[dict[str, Any]]:
        from ddgs.exceptions import DDGSException

        if self.stopped is not None:
            raise self.stopped
        try:
            payload = engine.build_payload(query, "us-en", "moderate", None, page=page)
            response = engine.http_client.request("GET", engine.search_url, params=payload)
        except DDGSException as error:
            status = getattr(engine, "last_status", None)
            if status is not None and status != 200:
                raise self._refused(status, query) from None
            text = str(error)
            if text.startswith("DNSError") or (text.startswith("ConnectError") and "refused" not in text):
                raise SearchError(
                    f"{self.label} search for {query!r} failed: cannot reach {urlsplit(self.site).hostname}: "
                    "this machine seems to have no internet connection or no working DNS (connect and run again)",
                    FetchFailure.OFFLINE,
                ) from None
            raise SearchError(f"{self.label} search for {query!r} failed: {error}") from None
        if response.status_code != 200:
            raise self._refused(response.status_code, query)
        return [vars(item) for item in engine.extract_results(response.text)]

    def _refused(self, status: int, query: str) -> SearchError:
        """A block or a rate limit holds for every query from this address: the source stops for the run."""
        error = self._refusal(status, query)
        if error.failure in (FetchFailure.BLOCKED, FetchFailure.LIMIT):
            self.stopped = error
        return error

    def _refusal(self, status: int, query: str) -> SearchError:
        if status == 403:
            return SearchError(
                f"{self.label} refused the search for {query!r} (HTTP 403): a block of this address; wait an "
                "hour or two and run again, or use --source openverse or wikimedia",
                FetchFailure.BLOCKED,
            )
        if status in (202, 429):
            return SearchError(
                f"{self.label} rate-limited the search for {query!r} (HTTP {status}): wait a few minutes and "
                "run again, or use --source openverse or wikimedia",
                FetchFailure.LIMIT,
            )
        return SearchError(
            f"{self.label} search for {query!r} failed: HTTP {status}", FetchFailure.HTTP_STATUS
        )


def _ddg_engine(site: str, timeout: int) -> Any:
    """ddgs's own DuckDuckGo images engine (its payload, vqd token and parsing), aimed at `site`."""
    from ddgs.engines.duckduckgo_images import DuckduckgoImages
    from ddgs.utils import _extract_vqd

    class Engine(DuckduckgoImages):
        search_url = f"{site}/i.js"
        last_status: int | None = None

        def _get_vqd(self, query: str) -> str:
            response = self.http_client.request("GET", site, params={"q": query})
            self.last_status = response.status_code
            return _extract_vqd(response.content, query)

    return Engine(timeout=timeout)


@register
class UrlsSource(Source):
    """A list of URLs the user chose: CSV rows of category,url, or one URL a line for a single category."""

    name = "urls"
    label = "URL list"
    default_limit = None

    def __init__(self, settings: SourceSettings) -> None:
        super().__init__(settings)
        path = settings.urls_file
        if path is None:
            raise UserError(
                "--source urls needs --urls FILE: a CSV of category,url rows "
                "(or one URL a line when you give a single --categories name)"
            )
        if not path.is_file():
            raise UserError(f"--urls file {path} does not exist; give the path of a CSV of category,url rows")
        self.rows = read_url_list(path, settings.categories)

    def categories(self) -> list[str]:
        return list(self.rows)

    def streams(self, category: str, queries: Sequence[str]) -> list[Iterator[Candidate]]:
        return [iter([Candidate(url=url) for url in self.rows.get(category, [])])]


def read_url_list(path: Path, categories: Sequence[str]) -> dict[str, list[str]]:
    """Category -> URLs in file order; a row that makes no sense is a UserError naming its line."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--urls file {path} is not UTF-8 text; save it as UTF-8 CSV") from None
    except OSError as error:
        raise UserError(f"cannot read --urls file {path}: {error.strerror or error}") from None
    rows: dict[str, list[str]] = {}
    header_checked = False
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = [field.strip() for field in next(csv.reader([text]))]
        if not header_checked:
            header_checked = True
            if [field.lower() for field in fields[:2]] == ["category", "url"]:
                continue
        if len(fields) == 1 or "://" in fields[0]:
            if len(categories) != 1:
                raise UserError(
                    f"{path} line {number}: {text[:80]!r} has no category; write rows as category,url "
                    "(a bare URL a line only works with a single --categories name)"
                )
            category, url = categories[0], text
        else:
            category, url = fields[0], ",".join(fields[1:]).strip()
        if not category or not url:
            raise UserError(f"{path} line {number}: expected category,url, got {text[:80]!r}")
        if categories and category not in categories:
            raise UserError(
                f"{path} line {number}: category {category!r} is not in --categories "
                f"({','.join(categories)}); fix the row or add the category"
            )
        rows.setdefault(category, []).append(url)
    if not rows:
        raise UserError(f"--urls file {path} lists no URLs; write one category,url row per image")
    return rows


class _LocalSource(Source):
    remote = False
    default_limit = None

    def __init__(self, settings: SourceSettings) -> None:
        super().__init__(settings)
        path = settings.from_path
        if path is None:
            raise UserError(
                f"--source {self.name} needs --from PATH: a folder (or .zip) with one subfolder of images "
                "per category"
            )
        if not path.exists():
            raise UserError(
                f"--from {path} does not exist; give a folder (or .zip) with one subfolder of images per category"
            )
        self.path = path

    def check_categories(self, categories: Sequence[str]) -> None:
        available = set(self.categories() or [])
        if not available:
            raise UserError(
                f"{self.path} has no category subfolders with images in them; put each category's images in "
                "a subfolder named after it (like cat/, dog/)"
            )
        if not any(category in available for category in categories):
            raise UserError(
                f"{self.path} has no subfolder named {' or '.join(categories)}; its subfolders are "
                f"{', '.join(sorted(available))}: use those names in --categories or leave --categories out"
            )

    def _copy(self, handle: Any, dest: Path, url: str) -> Fetched:
        sha256, size = write_limited(
            iter(lambda: handle.read(CHUNK), b""), dest, self.client.policy.max_bytes, self.client.stop
        )
        return Fetched(path=dest, sha256=sha256, size=size, url=url)


@register
class FolderSource(_LocalSource):
    """Photos the user already has, one subfolder per category; the originals are only read."""

    name = "folder"
    label = "folder"

    def __init__(self, settings: SourceSettings) -> None:
        super().__init__(settings)
        if not self.path.is_dir():
            raise UserError(f"--from {self.path} is a file, not a folder; for a zip archive use --source zip")

    def categories(self) -> list[str]:
        return [
            entry.name
            for entry in sorted(self.path.iterdir())
            if entry.is_dir()
            and not entry.name.startswith(".")
            and entry.name.lower() not in JUNK_DIRS
            and list_image_files(entry)
        ]

    def streams(self, category: str, queries: Sequence[str]) -> list[Iterator[Candidate]]:
        folder = self.path / category
        if not folder.is_dir():
            return []
        return [
            iter([Candidate(url=str(path.resolve()), ref=str(path)) for path in list_image_files(folder)])
        ]

    def fetch(self, candidate: Candidate, dest: Path) -> Fetched:
        try:
            with open(candidate.ref, "rb") as handle:
                return self._copy(handle, dest, candidate.url)
        except OSError as error:
            raise FetchError(FetchFailure.CANNOT_READ, error.strerror or str(error)) from None


@register
class ZipSource(_LocalSource):
    """A zip archive of category folders; members are read by name, never extracted to their own paths."""

    name = "zip"
    label = "zip archive"

    def __init__(self, settings: SourceSettings) -> None:
        super().__init__(settings)
        if self.path.is_dir():
            raise UserError(f"--from {self.path} is a folder, not a zip archive; use --source folder")
        try:
            self.archive = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as error:
            raise UserError(
                f"--from {self.path} is not a readable zip archive ({error}); check the file or unpack it "
                "and use --source folder"
            ) from None
        self.members = self._index()

    def _index(self) -> dict[str, list[str]]:
        """Category -> member names, ignoring junk and a single folder that wraps everything."""
        entries = []
        for info in self.archive.infolist():
            if info.is_dir():
                continue
            parts = [part for part in info.filename.replace("\\", "/").split("/") if part]
            folders, name = parts[:-1], parts[-1] if parts else ""
            if not folders or any(
                p in ("..", ".") or p.startswith(".") or p.lower() in JUNK_DIRS for p in folders
            ):
                continue
            if is_candidate(Path(name)):
                entries.append((parts, info.filename))
        while (
            entries and all(len(parts) >= 3 for parts, _ in entries) and len({p[0] for p, _ in entries}) == 1
        ):
            entries = [(parts[1:], member) for parts, member in entries]
        members: dict[str, list[str]] = {}
        for parts, member in entries:
            if len(parts) >= 2:
                members.setdefault(parts[0], []).append(member)
        return members

    def categories(self) -> list[str]:
        return sorted(self.members)

    def streams(self, category: str, queries: Sequence[str]) -> list[Iterator[Candidate]]:
        if category not in self.members:
            return []
        where = self.path.resolve()
        return [iter([Candidate(url=f"{where}!/{name}", ref=name) for name in self.members[category]])]

    def fetch(self, candidate: Candidate, dest: Path) -> Fetched:
        info = self.archive.getinfo(candidate.ref)
        if info.flag_bits & 0x1:
            raise FetchError(FetchFailure.ENCRYPTED)
        if info.file_size > self.client.policy.max_bytes:
            raise too_large(self.client.policy.max_bytes)
        try:
            with self.archive.open(info) as handle:
                return self._copy(handle, dest, candidate.url)
        except (
            zipfile.BadZipFile,
            NotImplementedError,
            RuntimeError,
            zlib.error,
            EOFError,
            OSError,
        ) as error:
            raise FetchError(FetchFailure.BROKEN_ZIP_ENTRY, str(error)[:120]) from None


def openverse_licence(code: str | None, version: str | None) -> str:
    """`by-sa`, `2.0` -> `CC BY-SA 2.0`; `cc0` -> `CC0 1.0`; `pdm` -> `Public Domain Mark 1.0`."""
    code = (code or "").strip().lower()
    if not code:
        return ""
    name = {"cc0": "CC0", "pdm": "Public Domain Mark"}.get(code, f"CC {code.upper()}")
    return f"{name} {version or ''}".strip()


class _TextOnly(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def plain_text(markup: str) -> str:
    """Wikimedia's metadata values are HTML snippets (links to user pages); the manifest wants text."""
    if not markup:
        return ""
    parser = _TextOnly()
    parser.feed(markup)
    parser.close()
    return " ".join("".join(parser.parts).split())


def _meta_value(meta: dict[str, Any], key: str) -> str:
    value = meta.get(key)
    return str(value.get("value", "")) if isinstance(value, dict) else ""


def _int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
