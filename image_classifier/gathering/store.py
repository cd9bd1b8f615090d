"""The images folder as gather keeps it: files named by content hash, never overwritten,
images/manifest.csv saying where each came from, and images/tried.csv saying what became of every URL
tried (kept as a file, a duplicate of one, or rejected and why), so a re-run fetches none of them again.

Adding a file is a hard link (or a checked rename) from a temporary file in the same folder, so a name
that is taken is never replaced, and each manifest row is one flushed write, so an interrupted run
leaves at most one broken last line (which reading ignores).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from ..decisions import Decisions
from ..errors import UserError
from ..images import ImageError, ImageInfo, inspect, list_image_files
from .download import FAILURE_LABELS, Fetched, FetchError, FetchFailure
from .sources import Candidate

MANIFEST_NAME = "manifest.csv"
IMAGES_MANIFEST_FIELDS = [
    "file",
    "category",
    "source",
    "url",
    "page",
    "licence",
    "author",
    "sha256",
    "width",
    "height",
    "time",
]
"""Columns of images/manifest.csv: where each gathered file came from (the dataset's own manifest is
preprocess.DATASET_MANIFEST_FIELDS)."""
TRIED_NAME = "tried.csv"
TRIED_FIELDS = ["url", "category", "source", "outcome", "file", "reason", "time"]
"""Columns of images/tried.csv, one row per URL tried; the last row of a URL is its outcome."""
KEPT, DUPLICATE_OF, REJECTED, FAILED = "kept", "duplicate", "rejected", "failed"
FINAL_OUTCOMES = frozenset({KEPT, DUPLICATE_OF, REJECTED})
"""Outcomes a re-run believes; a FAILED URL (offline, timeout, 5xx, a limit) is tried again."""
OPTION_REASONS = tuple(
    FAILURE_LABELS[failure]
    for failure in (FetchFailure.TOO_SMALL, FetchFailure.TOO_LARGE, FetchFailure.LICENCE)
)
"""Rejections that depend on today's options rather than on the URL alone."""
SEARCHES_NAME = "searches.json"
"""How far each search got (the next page), so a re-run after a daily limit continues where it stopped."""
MANUAL_SOURCE = "manual"
"""Manifest source of a file that was already in a category folder (put there by hand)."""
TEMP_PREFIX = ".gather-"
TEMP_SUFFIX = ".part"
NAME_CHARS = 16
"""Hex digits of the sha256 in a stored file's name: unique in practice, short enough to read."""
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}
EXTENSIONS |= {"TIFF": ".tif", "AVIF": ".avif"}


@dataclass(frozen=True)
class CheckedImage:
    """A fetched temporary file that decoded fully, with what the decode found."""

    fetched: Fetched
    info: ImageInfo


class ImageStore:
    """The images folder: what it holds (by content hash), the manifest, and adding files without overwriting."""

    def __init__(
        self, root: Path, decisions: Decisions | None = None, current: frozenset[str] = frozenset()
    ) -> None:
        """`current`: the option-dependent reasons (too small, too large, licence) today's options give."""
        self.root = root
        self.decisions = decisions or Decisions()
        self.manifest = root / MANIFEST_NAME
        self.rows = read_manifest(self.manifest)
        self.recorded = {(row["file"], row["sha256"]): row for row in self.rows}
        self.known_urls = {
            row["url"] for row in self.rows if row.get("url") and row.get("source") != MANUAL_SOURCE
        }
        self.tried = TriedUrls(root / TRIED_NAME)
        self.known_urls |= self.tried.final(current)
        self.hashes: dict[str, str] = {}
        """sha256 -> file (relative to root) of every image anywhere in the category folders."""
        self.file_hashes: dict[str, str] = {}
        self._needs_newline = _lacks_final_newline(self.manifest)

    def remember_excluded(self) -> None:
        """An excluded photo's content stays known even when its file is gone: it never comes back."""
        for row in self.rows:
            if row["file"] in self.decisions.excluded:
                self.hashes.setdefault(row["sha256"], row["file"])

    def scan(self, map_fn: Callable[..., Iterable[Any]]) -> None:
        """Hash every file in every category folder, so nothing is stored twice anywhere."""
        files = [path for path in list_image_files(self.root) if len(path.relative_to(self.root).parts) > 1]
        for path, sha256 in zip(files, map_fn(_sha256_of, files), strict=True):
            if sha256 is None:
                continue
            relative = path.relative_to(self.root).as_posix()
            self.file_hashes[relative] = sha256
            self.hashes.setdefault(sha256, relative)

    def check_existing(self, category: str, map_fn: Callable[..., Iterable[Any]]) -> Existing:
        """The images already there for a category: good ones in its folder not yet in the manifest are
        added; review decisions decide what counts (excluded: not at all, relabeled: for the new category)."""
        folder = self.root / category
        good: dict[str, str] = {}
        unknown: list[tuple[Path, str]] = []
        unusable = 0
        for path in list_image_files(folder) if folder.is_dir() else []:
            relative = path.relative_to(self.root).as_posix()
            sha256 = self.file_hashes.get(relative)
            if sha256 is None:
                unusable += 1
            elif (relative, sha256) in self.recorded:
                good.setdefault(sha256, relative)
            else:
                unknown.append((path, relative))
        infos = map_fn(_inspect_or_none, [path for path, _ in unknown])
        for (_, relative), info in zip(unknown, infos, strict=True):
            if info is None:
                unusable += 1
                continue
            sha256 = self.file_hashes[relative]
            good.setdefault(sha256, relative)
            self._record(relative, category, MANUAL_SOURCE, Candidate(url=""), sha256, info)
        counted = {sha for sha, rel in good.items() if self.decisions.category_of(rel, category) == category}
        excluded = sum(1 for rel in good.values() if rel in self.decisions.excluded)
        moved_in = {
            self.file_hashes[rel]
            for rel, to in self.decisions.relabeled.items()
            if to == category and rel in self.file_hashes and rel not in self.decisions.excluded
        }
        return Existing(len(counted | moved_in), unusable, excluded, len(moved_in - counted))

    def add(self, checked: CheckedImage, category: str, source: str, candidate: Candidate) -> bool:
        """Move a checked temporary file into place; False (and the file removed) when it is a duplicate."""
        temp, sha256 = checked.fetched.path, checked.fetched.sha256
        if sha256 in self.hashes:
            temp.unlink(missing_ok=True)
            return False
        ext = EXTENSIONS.get(checked.info.format, f".{checked.info.format.lower()}")
        folder = self.root / category
        for stem in (sha256[:NAME_CHARS], sha256):
            final = folder / f"{stem}{ext}"
            if _place(temp, final):
                break
        else:
            temp.unlink(missing_ok=True)
            raise FetchError(FetchFailure.NAME_TAKEN, f"{final.name} exists with other content")
        relative = final.relative_to(self.root).as_posix()
        self.hashes[sha256] = relative
        self.file_hashes[relative] = sha256
        self._record(relative, category, source, candidate, sha256, checked.info)
        return True

    def _record(
        self, relative: str, category: str, source: str, candidate: Candidate, sha256: str, info: ImageInfo
    ) -> None:
        row = {
            "file": relative,
            "category": category,
            "source": source,
            "url": candidate.url,
            "page": candidate.page,
            "licence": candidate.licence,
            "author": candidate.author,
            "sha256": sha256,
            "width": info.width,
            "height": info.height,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.append_row(row)
        self.recorded[(relative, sha256)] = {key: str(value) for key, value in row.items()}
        if candidate.url and source != MANUAL_SOURCE:
            self.known_urls.add(candidate.url)

    def note_tried(
        self, url: str, category: str, source: str, outcome: str, file: str = "", reason: str = ""
    ) -> None:
        """What became of one URL, in tried.csv; a final outcome also keeps it from being fetched again."""
        self.tried.append(url, category, source, outcome, file, reason)
        if outcome in FINAL_OUTCOMES:
            self.known_urls.add(url)

    def append_row(self, row: dict[str, Any]) -> None:
        """One whole line per write, flushed at once: an interrupted run leaves at most one broken last line."""
        _append_csv_row(self.manifest, IMAGES_MANIFEST_FIELDS, row, self._needs_newline)
        self._needs_newline = False


@dataclass(frozen=True)
class Existing:
    good: int
    """Images that count toward the limit (excluded ones not; relabeled ones for their new category)."""
    unusable: int
    excluded: int = 0
    relabeled_in: int = 0


class TriedUrls:
    """images/tried.csv: every URL gather fetched (or refused unfetched), with its outcome."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last: dict[str, dict[str, str]] = {}
        if path.exists():
            try:
                with open(path, newline="", encoding="utf-8") as handle:
                    for row in csv.DictReader(handle):
                        if row.get("url") and row.get("outcome") and None not in row:
                            self.last[row["url"]] = row
            except (csv.Error, UnicodeDecodeError, OSError) as error:
                raise UserError(
                    f"cannot read {path} ({error}); move it aside and run again (already-tried URLs would "
                    "then be fetched once more)"
                ) from None
        self._needs_newline = _lacks_final_newline(path)

    def final(self, current: frozenset[str] = frozenset()) -> set[str]:
        """URLs not to fetch again. A rejection that other options would not make (a smaller --min-side,
        a larger --max-mb, another --license) is tried again; the same rejection today is believed."""
        return {
            url
            for url, row in self.last.items()
            if row["outcome"] in FINAL_OUTCOMES
            and (
                row["outcome"] != REJECTED
                or not row["reason"].startswith(OPTION_REASONS)
                or row["reason"] in current
            )
        }

    def append(self, url: str, category: str, source: str, outcome: str, file: str, reason: str) -> None:
        row = {"url": url, "category": category, "source": source, "outcome": outcome, "file": file}
        row |= {"reason": reason, "time": datetime.now(UTC).isoformat(timespec="seconds")}
        _append_csv_row(self.path, TRIED_FIELDS, row, self._needs_newline)
        self._needs_newline = False
        self.last[url] = row


class SearchProgress:
    """images/searches.json: per source and query, the next page a search starts from."""

    def __init__(self, root: Path) -> None:
        self.path = root / SEARCHES_NAME
        try:
            self.pages: dict[str, int] = (
                json.loads(self.path.read_text("utf-8")) if self.path.exists() else {}
            )
        except (ValueError, OSError):
            self.pages = {}  # only an optimisation: a lost file means re-reading pages already seen

    def next_page(self, key: str) -> int:
        value = self.pages.get(key, 1)
        return value if isinstance(value, int) and value >= 1 else 1

    def reached(self, key: str, page: int) -> None:
        """Every candidate on the pages before `page` was taken: a re-run starts at `page`."""
        if page > self.next_page(key):
            self.pages[key] = page
            self._write()

    def finished(self, key: str) -> None:
        """The search was read to its end: the next run reads it from page 1 again (new uploads come
        first; the URLs already tried are skipped unfetched)."""
        if self.pages.pop(key, None) is not None:
            self._write()

    def _write(self) -> None:
        write_atomic(self.path, json.dumps(self.pages, indent=1, sort_keys=True).encode())


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows with a file and a hash; a line cut short by an interrupted run is ignored."""
    if not path.exists():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [
                row
                for row in csv.DictReader(handle)
                if row.get("file") and row.get("sha256") and len(row["sha256"]) == 64 and None not in row
            ]
    except (csv.Error, UnicodeDecodeError, OSError) as error:
        raise UserError(f"cannot read {path} ({error}); move it aside and run again to rebuild it") from None


def _append_csv_row(path: Path, fieldnames, row: dict[str, Any], needs_newline: bool) -> None:
    """One row appended in a single write (a header first into an empty file), so a crash never leaves half a row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    if not path.exists() or path.stat().st_size == 0:
        writer.writeheader()
    elif needs_newline:
        buffer.write("\n")
    writer.writerow(row)
    with open(path, "a", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())
        handle.flush()


def _lacks_final_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) not in (b"\n", b"\r")
    except OSError:
        return False


def _place(temp: Path, final: Path) -> bool:
    """Give `temp` the name `final` unless that name is taken; never replaces an existing file."""
    try:
        os.link(temp, final)
    except FileExistsError:
        return False
    except OSError:  # no hard links on this filesystem: check, then rename (one writer: the main thread)
        if final.exists():
            return False
        os.replace(temp, final)
        return True
    temp.unlink()
    return True


def _sha256_of(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1024 * 1024), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _inspect_or_none(path: Path) -> ImageInfo | None:
    try:
        return inspect(path)
    except ImageError:
        return None


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files a killed run left behind; only names this stage makes are touched."""
    if folder.is_dir():
        for path in folder.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
            path.unlink(missing_ok=True)
