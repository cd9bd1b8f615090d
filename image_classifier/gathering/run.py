"""The gather stage: fill workspace/images/<category>/ with up to --limit good images from one source.

Every candidate takes the same path whatever its source: fetched into a hidden temporary file inside the
category folder, decoded by the same code preprocessing uses, checked for size, compared by content hash
with every image already in the workspace, then moved to `<sha256 prefix>.<ext>` and recorded in
images/manifest.csv. A run only ever adds files: what a user put in a folder is counted and left alone,
and a name that is taken is never overwritten. Downloads run on a few threads; searching, storing and the
manifest stay on the main thread, so they need no locks.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..categories import category_problem
from ..config import Workspace
from ..decisions import read_decisions
from ..errors import UserError
from ..images import ImageError, inspect
from .download import (
    USER_AGENT_ENV,
    Cancelled,
    Clock,
    FetchError,
    FetchFailure,
    FetchPolicy,
    HttpClient,
    countable,
    has_contact,
    is_transient,
    too_large,
    user_agent,
)
from .report import CategoryReport, GatherReport
from .sources import (
    SOURCES,
    Candidate,
    SearchError,
    Source,
    SourceSettings,
    create_source,
    licence_refusal,
)
from .store import (
    DUPLICATE_OF,
    FAILED,
    KEPT,
    REJECTED,
    TEMP_PREFIX,
    TEMP_SUFFIX,
    CheckedImage,
    ImageStore,
    SearchProgress,
    remove_stale_temporaries,
)

if TYPE_CHECKING:
    import argparse

DEFAULT_SOURCE = "openverse"
DEFAULT_WORKERS = 8
DEFAULT_PER_HOST = 4
"""Downloads at once from any one host; Wikimedia's media host gets 2 whatever this says."""
DEFAULT_MAX_WAIT = 600.0
"""Seconds a rate limit may make a run wait at once (--max-wait); longer is a limit reached."""
STATE_DIR = ".gather"
"""Inside the workspace: gather's private state (the Openverse token, owner-only)."""
DEFAULT_MIN_SIDE = 64
"""Smaller pictures say too little to learn from; the stage skips them."""
FAILURE_FACTOR = 5
MIN_FAILURE_BUDGET = 50
"""A remote category stops after max(50, 5 x images still needed) fetches that kept nothing."""
DOWNLOADED_BEFORE = "downloaded before"
DUPLICATE = "duplicate"
"""Skip reasons of gather's own (next to FetchError.reason and image_reason) as the summary counts them."""


def parse_query(text: str) -> tuple[str, str]:
    """`cat=house cat` -> ('cat', 'house cat'); ValueError saying the expected form otherwise."""
    category, sep, query = text.partition("=")
    if not sep or not category.strip() or not query.strip():
        raise ValueError(f'expected CATEGORY=QUERY like cat="house cat", got {text!r}')
    return category.strip(), query.strip()


def default_query(category: str) -> str:
    return " ".join(category.replace("_", " ").replace("-", " ").split())


@dataclass(frozen=True)
class GatherOptions:
    categories: tuple[str, ...] = ()
    """Empty: take them from the source (CSV rows, subfolders of --from)."""
    source: str | None = None
    """None: `urls` with --urls, `folder`/`zip` with --from, else DEFAULT_SOURCE."""
    limit: int | None = None
    """Good images wanted per category; None: the source's default (200 for searches, all for imports)."""
    queries: tuple[tuple[str, str], ...] = ()
    urls_file: Path | None = None
    from_path: Path | None = None
    workers: int = DEFAULT_WORKERS
    min_side: int = DEFAULT_MIN_SIDE
    policy: FetchPolicy = field(default_factory=lambda: FetchPolicy(max_wait=DEFAULT_MAX_WAIT))
    progress: bool = True
    licence: str = "any"
    contact: str = ""
    """--contact: an email address or URL for the User-Agent (Wikimedia requires one)."""
    clock: Clock | None = None
    """None: real time; tests give one that jumps, so waits are honoured without taking long."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GatherOptions:
        policy = FetchPolicy(
            timeout=args.timeout,
            retries=args.retries,
            max_bytes=int(args.max_mb * 1024 * 1024),
            max_wait=args.max_wait,
            per_host=args.per_host,
        )
        return cls(
            categories=tuple(args.categories or ()),
            source=args.source,
            limit=args.limit,
            queries=tuple(args.query or ()),
            urls_file=args.urls,
            from_path=args.from_path,
            workers=args.workers,
            min_side=args.min_side,
            policy=policy,
            licence=args.license,
            contact=args.contact or "",
        )

    def source_name(self) -> str:
        if self.source:
            return self.source
        if self.urls_file is not None:
            return "urls"
        if self.from_path is not None:
            return "folder" if self.from_path.is_dir() else "zip"
        return DEFAULT_SOURCE


def image_reason(message: str) -> str:
    """An ImageError message cut to something countable, in the same form as FetchError.reason:
    'not an image: an HTML page' -> 'not an image (an HTML page)', as a download of the page is counted."""
    head = message.split(" (")[0]
    if ": " in head:
        first, rest = head.split(": ", 1)
        return first if len(rest) > 40 else countable(first, rest)
    return head


def too_small(min_side: int, detail: str = "") -> FetchError:
    """An image whose shorter side is under --min-side, whether the source listed its size or it was measured."""
    return FetchError(FetchFailure.TOO_SMALL, detail, qualifier=f"under {min_side} px")


def round_robin(streams: Sequence[Iterator[Candidate]], report: CategoryReport) -> Iterator[Candidate]:
    """Take from each query's results in turn, so several queries share the limit; a failed search drops out."""
    active = list(streams)
    while active:
        for stream in list(active):
            try:
                candidate = next(stream)
            except StopIteration:
                active.remove(stream)
                continue
            except SearchError as error:
                report.search_errors.append(str(error))
                report.search_failures.append(error.failure)
                active.remove(stream)
                continue
            report.candidates += 1
            yield candidate


class _Run:
    """One gather run: the source, the store, the download threads and the options they share."""

    def __init__(
        self,
        source: Source,
        source_name: str,
        store: ImageStore,
        pool: ThreadPoolExecutor,
        options: GatherOptions,
        limit: int | None,
    ) -> None:
        self.source = source
        self.source_name = source_name
        self.store = store
        self.pool = pool
        self.options = options
        self.limit = limit
        self.attempted: set[str] = set()
        self.reports: list[CategoryReport] = []

    def category(self, category: str, queries: Sequence[str]) -> CategoryReport:
        """Fill one folder: what is already there counts first, then candidates until the limit."""
        report = CategoryReport(category=category, limit=self.limit)
        self.reports.append(report)
        (self.store.root / category).mkdir(parents=True, exist_ok=True)
        existing = self.store.check_existing(category, self.pool.map)
        report.existing, report.unusable = existing.good, existing.unusable
        report.excluded, report.relabeled_in = existing.excluded, existing.relabeled_in
        if self.limit is not None and report.existing >= self.limit:
            return report
        candidates = round_robin(self.source.streams(category, queries), report)
        pending: dict[Future, tuple[Candidate, Path]] = {}
        bar = _progress_bar(category, self.limit, report.existing, self.options.progress)
        self.source.client.on_wait = _countdown(bar)
        try:
            self._download(candidates, pending, report, bar)
        except BaseException:
            self.source.client.abort()
            raise
        finally:
            _drain(pending)
            bar.close()
        return report

    def _download(
        self,
        candidates: Iterator[Candidate],
        pending: dict[Future, tuple[Candidate, Path]],
        report: CategoryReport,
        bar: Any,
    ) -> None:
        """Keep up to --workers downloads going and settle each as it ends, until enough are kept, the
        source runs out, or so many fetches kept nothing that the source looks unusable."""
        needed = None if self.limit is None else self.limit - report.existing
        budget = max(MIN_FAILURE_BUDGET, FAILURE_FACTOR * (needed or 0)) if self.source.remote else None
        failures = 0
        while True:
            remaining = None if needed is None else needed - report.kept
            if remaining is not None and remaining <= 0:
                return
            room = self.options.workers if remaining is None else min(self.options.workers, remaining)
            self._submit(candidates, pending, report, room)
            if not pending:
                return
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                candidate, _ = pending.pop(future)
                if not self._settle(future, candidate, report):
                    failures += 1
            if budget is not None and failures >= budget:
                report.gave_up = True
            bar.set_postfix(skipped=sum(report.skipped.values()), refresh=False)
            bar.update(report.total - bar.n)

    def _submit(
        self,
        candidates: Iterator[Candidate],
        pending: dict[Future, tuple[Candidate, Path]],
        report: CategoryReport,
        room: int,
    ) -> None:
        """Start downloads until `room` run at once; candidates skipped without a fetch are counted here."""
        folder = self.store.root / report.category
        while len(pending) < room and not report.ran_out and not report.gave_up:
            candidate = next(candidates, None)
            if candidate is None:
                report.ran_out = True
                return
            if candidate.url in self.attempted:
                continue  # listed again (by another query, or twice in a file): not a skip worth counting
            self.attempted.add(candidate.url)
            reason = self._skip_unfetched(candidate)
            if reason:
                report.skipped[reason] += 1
                if reason != DOWNLOADED_BEFORE:
                    self._note(candidate, report, REJECTED, reason=reason)
                continue
            temp = folder / f"{TEMP_PREFIX}{uuid.uuid4().hex}{TEMP_SUFFIX}"
            pending[self.pool.submit(self._fetch_and_check, candidate, temp)] = (candidate, temp)

    def _skip_unfetched(self, candidate: Candidate) -> str | None:
        """A reason to skip without fetching: kept in an earlier run, or listed as too small."""
        if self.source.remote and candidate.url in self.store.known_urls:
            return DOWNLOADED_BEFORE
        if candidate.refused:
            return candidate.refused
        sides = [side for side in (candidate.width, candidate.height) if side]
        if len(sides) == 2 and min(sides) < self.options.min_side:
            return too_small(self.options.min_side).reason
        return None

    def _fetch_and_check(self, candidate: Candidate, temp: Path) -> CheckedImage:
        """Runs on a download thread: the bytes into `temp`, then a full decode, as preprocessing will."""
        fetched = self.source.fetch(candidate, temp)
        try:
            info = inspect(temp)
            if min(info.width, info.height) < self.options.min_side:
                raise too_small(self.options.min_side, f"{info.width}x{info.height}")
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return CheckedImage(fetched, info)

    def _settle(self, future: Future, candidate: Candidate, report: CategoryReport) -> bool:
        """Store a finished fetch or count why not; True when an image was kept."""
        try:
            checked = future.result()
        except Cancelled:
            return False
        except FetchError as error:
            return self._rejected(
                candidate, report, error.reason, FAILED if is_transient(error) else REJECTED
            )
        except ImageError as error:
            return self._rejected(candidate, report, image_reason(str(error)), REJECTED)
        except Exception as error:  # one odd file or server must not end a long run; the reason is shown
            return self._rejected(candidate, report, f"unexpected {type(error).__name__}", FAILED)
        earlier = self.store.hashes.get(checked.fetched.sha256, "")
        try:
            stored = self.store.add(checked, report.category, self.source_name, candidate)
        except FetchError as error:
            return self._rejected(candidate, report, error.reason, FAILED)
        if not stored:
            report.skipped[DUPLICATE] += 1
            self._note(candidate, report, DUPLICATE_OF, earlier)
            return False
        report.kept += 1
        self._note(candidate, report, KEPT, self.store.hashes[checked.fetched.sha256])
        return True

    def _rejected(self, candidate: Candidate, report: CategoryReport, reason: str, outcome: str) -> bool:
        report.skipped[reason] += 1
        self._note(candidate, report, outcome, reason=reason)
        return False

    def _note(
        self, candidate: Candidate, report: CategoryReport, outcome: str, file: str = "", reason: str = ""
    ) -> None:
        """Remote URLs only: local files are read again each run, as they may have changed."""
        if self.source.remote:
            self.store.note_tried(candidate.url, report.category, self.source_name, outcome, file, reason)


def _drain(pending: dict[Future, tuple[Candidate, Path]]) -> None:
    """Wait for downloads still running and remove what they wrote: nothing half-done stays behind."""
    for future in pending:
        future.cancel()
    wait(pending)
    for _, temp in pending.values():
        temp.unlink(missing_ok=True)


def _countdown(bar: Any) -> Callable[[str, float], None]:
    """What the progress bar shows while a rate limit is waited out."""

    def show(host: str, left: float) -> None:
        bar.set_postfix_str(f"waiting {left:.0f} s for {host} (its rate limit)" if left > 0 else "")

    return show


def _progress_bar(category: str, limit: int | None, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=limit,
        initial=initial,
        desc=category,
        unit="img",
        file=sys.stderr,
        mininterval=0.3,
        dynamic_ncols=True,
        disable=not enabled,
    )


def _resolve_categories(options: GatherOptions, source: Source, name: str) -> list[str]:
    categories = list(options.categories)
    offered = source.categories()
    if not categories:
        if offered is None:
            raise UserError(f"--source {name} needs --categories; write them like --categories cat,dog,horse")
        categories = offered
        for category in categories:
            problem = category_problem(category)
            if problem:
                raise UserError(
                    f"category from the {source.label} cannot be a folder name: {problem}; rename it"
                )
    source.check_categories(categories)
    return categories


def _check_options(options: GatherOptions, name: str) -> None:
    if name not in SOURCES:
        raise UserError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    cls = SOURCES[name]
    if options.urls_file is not None and name != "urls":
        raise UserError(f"--urls is only read by --source urls, not --source {name}; drop one of them")
    if options.from_path is not None and name not in ("folder", "zip"):
        raise UserError(
            f"--from is only read by --source folder or zip, not --source {name}; drop one of them"
        )
    if options.queries and not cls.searches:
        searching = ", ".join(n for n, c in SOURCES.items() if c.searches)
        raise UserError(f"--query only applies to search sources ({searching}), not --source {name}")
    if options.workers < 1 or options.min_side < 1:
        raise UserError("--workers and --min-side must be at least 1")
    if options.contact and not has_contact(options.contact):
        raise UserError(
            f"--contact {options.contact!r} is neither an email address nor a URL; give one, like you@example.org"
        )
    if options.licence != "any" and not cls.searches:
        raise UserError(f"--license only filters search sources, not --source {name}; drop --license")


def _queries_by_category(options: GatherOptions, categories: Sequence[str]) -> dict[str, list[str]]:
    """Each category's --query texts, or its own name as the search when none was given."""
    for category, _ in options.queries:
        if category not in categories:
            raise UserError(
                f"--query {category}=...: {category!r} is not one of --categories ({','.join(categories)})"
            )
    return {
        category: [q for c, q in options.queries if c == category] or [default_query(category)]
        for category in categories
    }


def _prepare_folders(root: Path, categories: Sequence[str]) -> None:
    """Make the images folder and clear what a killed run left; a path that cannot be written is a UserError."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        for category in categories:
            remove_stale_temporaries(root / category)
    except OSError as error:
        raise UserError(
            f"cannot write to {root}: {error.strerror or error}; check the --workspace path"
        ) from None


def _fail_when_no_search_worked(report: GatherReport, name: str) -> None:
    """When every search failed and nothing is in the folders, the run failed: say so with an exit status."""
    failed = [item for item in report.categories if item.search_errors and not item.candidates]
    if failed and len(failed) == len(report.categories) and not any(item.total for item in failed):
        first = failed[0].search_errors[0]
        if failed[0].search_failures[0] in NAMED_FAILURES:
            raise UserError(first)  # it already says what to do
        raise UserError(
            f"{first}; check the internet connection, or try another --source "
            f"({', '.join(n for n in SOURCES if n != name)})"
        )


NAMED_FAILURES = frozenset(
    {FetchFailure.OFFLINE, FetchFailure.DNS, FetchFailure.TLS, FetchFailure.BLOCKED, FetchFailure.LIMIT}
)
"""Search failures whose line already says what to do."""


def option_reasons(options: GatherOptions) -> frozenset[str]:
    """The rejections today's options make, so tried.csv's earlier ones under other options are retried."""
    licences = {licence_refusal(text, options.licence) for text in ("", "CC BY-NC", "CC BY-ND")}
    return frozenset(
        {too_small(options.min_side).reason, too_large(options.policy.max_bytes).reason} | licences
    )


def gather(
    workspace: Workspace, options: GatherOptions, print_fn: Callable[[str], object] = print
) -> GatherReport:
    """Fill each category folder up to the limit, print a summary, and return it."""
    name = options.source_name()
    _check_options(options, name)
    policy = options.policy
    if options.contact or os.environ.get(USER_AGENT_ENV):
        policy = replace(policy, user_agent=user_agent(options.contact))
    client = HttpClient(policy, clock=options.clock)
    root = workspace.images
    settings = SourceSettings(
        client,
        options.categories,
        options.urls_file,
        options.from_path,
        licence=options.licence,
        state_dir=workspace.root / STATE_DIR,
        progress=SearchProgress(root),
    )
    source = create_source(name, settings)
    categories = _resolve_categories(options, source, name)
    queries = _queries_by_category(options, categories)
    limit = options.limit if options.limit is not None else source.default_limit
    report = GatherReport(source=name, root=root)
    _prepare_folders(root, categories)
    store = ImageStore(root, read_decisions(root), option_reasons(options))
    pool = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="gather")
    try:
        store.scan(pool.map)
        store.remember_excluded()
        run = _Run(source, name, store, pool, options, limit)
        report.categories = run.reports
        for category in categories:
            run.category(category, queries[category])
    except KeyboardInterrupt:
        client.abort()
        print_fn(report.format())
        print_fn("Stopped before the end: what was kept stays; run the same command again to continue.")
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    print_fn(report.format())
    _fail_when_no_search_worked(report, name)
    return report
