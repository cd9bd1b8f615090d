"""What a gather run tells the user: per category, how many images are there, what was skipped and why,
and what to try when a category came up short."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .sources import SOURCES
from .store import MANIFEST_NAME


@dataclass
class CategoryReport:
    category: str
    limit: int | None
    existing: int = 0
    """Good images that were already in the folder."""
    unusable: int = 0
    """Files already in the folder that do not decode; left in place, not counted."""
    excluded: int = 0
    """Photos in the folder a review excluded: not counted, and never fetched again."""
    relabeled_in: int = 0
    """Photos in other folders a review relabeled to this category: counted here."""
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    candidates: int = 0
    search_errors: list[str] = field(default_factory=list)
    search_failures: list = field(default_factory=list)
    """Each search error's FetchFailure (None when it has no name), in the same order."""
    ran_out: bool = False
    gave_up: bool = False

    @property
    def total(self) -> int:
        return self.existing + self.kept

    def line(self, searches: bool) -> str:
        wanted = f" of {self.limit}" if self.limit is not None else ""
        parts = [f"{self.kept} new"] + ([f"{self.existing} already there"] if self.existing else [])
        if self.relabeled_in:
            parts.append(f"{self.relabeled_in} of them relabeled here by review")
        if self.excluded:
            parts.append(f"{self.excluded} excluded by review, not counted")
        text = f"{self.category}: {self.total}{wanted} images ({', '.join(parts)})"
        if self.skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
            text += f"; skipped {sum(self.skipped.values())}: {reasons}"
        notes = []
        if self.unusable:
            notes.append(
                f"{self.unusable} file(s) already in the folder do not open as images (left as they are)"
            )
        notes += self.search_errors
        short = self.limit is not None and self.total < self.limit
        if self.ran_out and not self.candidates and not self.search_errors:
            notes.append("the source has no images for it")
        elif short and self.gave_up:
            notes.append(
                "stopped early: too many downloads failed or were duplicates; try again later or another --source"
            )
        elif short and self.ran_out and searches and not self.search_errors:
            notes.append(
                f'the search ran out of results: add queries like --query {self.category}="..." '
                "or try another --source"
            )
        elif short and self.ran_out and not self.search_errors:
            notes.append("the source has no more images for it")
        return "\n".join([text, *(f"  {self.category}: {note}" for note in notes)])


@dataclass
class GatherReport:
    source: str
    root: Path
    categories: list[CategoryReport] = field(default_factory=list)

    def format(self) -> str:
        searches = SOURCES[self.source].searches
        lines = [f"Images in {self.root} (source: {self.source}):"]
        lines += ["  " + report.line(searches).replace("\n", "\n  ") for report in self.categories]
        lines.append(f"Every kept image is listed in {self.root / MANIFEST_NAME}")
        if self.source == "ddg":
            lines.append(
                "Note: ddg results carry no licence; check an image's page (in the manifest) before you "
                "share it or a model trained on it."
            )
        return "\n".join(lines)
