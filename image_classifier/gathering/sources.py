"""Where candidate images come from: one class per source, looked up by name in SOURCES.

A source only lists candidates (a URL or local file, with page, licence and author when it knows them)
and fetches one into a file it is given. Checking, deduplicating and storing are the same for every
source and live in run.py and store.py, so a file imported from a zip passes exactly the tests a download does.
"""

from __future__ import annotations

import csv
import math
import os
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

from ..errors import UserError
from ..images import JUNK_DIRS, is_candidate, list_image_files
from .download import CHUNK, Fetched, FetchError, FetchFailure, HttpClient, too_large, write_limited

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


class SearchError(Exception):
    """A search request that failed for good (after retries); ends that query, not the run."""


@dataclass(frozen=True)
class SourceSettings:
    client: HttpClient
    categories: tuple[str, ...] = ()
    urls_file: Path | None = None
    from_path: Path | None = None


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
        return self.client.download(candidate.url, dest)


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

    def _get_json(self, url: str, params: dict[str, Any], query: str) -> Any:
        try:
            return self.client.get_json(url, params)
        except FetchError as error:
            raise SearchError(f"{self.label} search for {query!r} failed: {error}") from None


@register
class WikimediaSource(SearchSource):
    """Wikimedia Commons: freely licensed files, searched with the MediaWiki Action API (no key)."""

    name = "wikimedia"
    label = "Wikimedia Commons"
    API_URL = "https://commons.wikimedia.org/w/api.php"
    ENV = "WIKIMEDIA_API_URL"
    THUMB_WIDTH = 960
    """A standard Wikimedia thumbnail step: served from cache, far smaller than most originals."""
    BATCH = 50

    def __init__(self, settings: SourceSettings, api_url: str | None = None) -> None:
        super().__init__(settings)
        self.api_url = api_url or os.environ.get(self.ENV) or self.API_URL

    def search(self, query: str) -> Iterator[Candidate]:
        params: dict[str, Any] = {
            "action": "query",
            "format": "json",
            "formatversion": "2",
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
        while True:
            data = self._get_json(self.api_url, params, query)
            if not isinstance(data, dict):
                raise SearchError(f"{self.label} search for {query!r}: unexpected answer")
            if "error" in data:
                error = data["error"]
                raise SearchError(
                    f"{self.label} search for {query!r} failed: {error.get('code')}: {error.get('info')}"
                )
            pages = data.get("query", {}).get("pages", [])
            if isinstance(pages, dict):
                pages = list(pages.values())
            for page in sorted(pages, key=lambda item: item.get("index", 0)):
                title = page.get("title", "")
                info = (page.get("imageinfo") or [None])[0]
                if not info or title in seen:
                    continue
                seen.add(title)
                url = info.get("thumburl") or info.get("url")
                if not url or not str(info.get("mime", "image/")).startswith("image/"):
                    continue
                meta = info.get("extmetadata") or {}
                yield Candidate(
                    url=url,
                    page=info.get("descriptionurl", ""),
                    licence=plain_text(_meta_value(meta, "LicenseShortName")),
                    author=plain_text(_meta_value(meta, "Artist")),
                    width=_int(info.get("thumbwidth") or info.get("width")),
                    height=_int(info.get("thumbheight") or info.get("height")),
                )
            follow = data.get("continue")
            if not follow:
                return
            params = {**params, **follow}


@register
class OpenverseSource(SearchSource):
    """Openverse: Creative Commons photos from Flickr, museums and more; anonymous use, 20 results a page."""

    name = "openverse"
    label = "Openverse"
    API_URL = "https://api.openverse.org/v1/images/"
    ENV = "OPENVERSE_API_URL"
    PAGE_SIZE = 20
    """The most an anonymous request may ask for."""

    def __init__(self, settings: SourceSettings, api_url: str | None = None) -> None:
        super().__init__(settings)
        self.api_url = api_url or os.environ.get(self.ENV) or self.API_URL

    def search(self, query: str) -> Iterator[Candidate]:
        page = 1
        while True:
            params = {"q": query, "page": page, "page_size": self.PAGE_SIZE, "category": "photograph"}
            try:
                data = self.client.get_json(self.api_url, params)
            except FetchError as error:
                past_the_end = (
                    error.failure is FetchFailure.HTTP_STATUS and error.status in PAST_THE_LAST_PAGE
                )
                if page > 1 and past_the_end:
                    return
                raise SearchError(f"{self.label} search for {query!r} failed: {error}") from None
            results = data.get("results") if isinstance(data, dict) else None
            if not results:
                return
            for item in results:
                if not item.get("url"):
                    continue
                yield Candidate(
                    url=item["url"],
                    page=item.get("foreign_landing_url") or "",
                    licence=openverse_licence(item.get("license"), item.get("license_version")),
                    author=item.get("creator") or "",
                    width=_int(item.get("width")),
                    height=_int(item.get("height")),
                )
            if page >= (_int(data.get("page_count")) or 0):
                return
            page += 1


@register
class DdgSource(SearchSource):
    """DuckDuckGo image search through the `ddgs` package: the most relevant results, but no licences."""

    name = "ddg"
    label = "DuckDuckGo"
    PAGE_RESULTS = 100
    MAX_PAGES = 5

    def search(self, query: str) -> Iterator[Candidate]:
        from ddgs import DDGS
        from ddgs.exceptions import DDGSException

        seen: set[str] = set()
        timeout = max(1, math.ceil(self.client.policy.timeout))
        with DDGS(timeout=timeout) as ddgs:
            for page in range(1, self.MAX_PAGES + 1):
                try:
                    results = ddgs.images(
                        query, max_results=self.PAGE_RESULTS, page=page, backend="duckduckgo"
                    )
                except DDGSException as error:
                    if "no results" in str(error).lower():
                        return
                    raise SearchError(f"{self.label} search for {query!r} failed: {error}") from None
                fresh = [item for item in results if item.get("image") and item["image"] not in seen]
                if not fresh:
                    return
                for item in fresh:
                    seen.add(item["image"])
                    yield Candidate(
                        url=item["image"],
                        page=item.get("url") or "",
                        width=_int(item.get("width")),
                        height=_int(item.get("height")),
                    )


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
