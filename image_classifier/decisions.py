"""A user's review decisions about photos, kept beside the photos and never applied to the files themselves.

<images>/exclude.txt   one photo per line, its path relative to the images folder (`cat/0001.jpg`); `#` starts a comment
<images>/relabel.csv   `file,category`: the photo is used under that category instead of its folder's

Preprocessing, training and gathering read them through `read_decisions`; the review (clean.py) writes them
through `record_decisions`. Sources are never moved, renamed or deleted.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .atomic import write_atomic
from .errors import UserError

EXCLUDE_FILE = "exclude.txt"
RELABEL_FILE = "relabel.csv"
RELABEL_FIELDS = ("file", "category")


@dataclass(frozen=True)
class Decisions:
    excluded: frozenset[str] = frozenset()
    relabeled: dict[str, str] = field(default_factory=dict)

    def category_of(self, relative: str, given: str) -> str | None:
        """The category a photo is used under, or None when it is excluded."""
        if relative in self.excluded:
            return None
        return self.relabeled.get(relative, given)

    def is_empty(self) -> bool:
        return not self.excluded and not self.relabeled

    def digest(self) -> str:
        """Changes whenever a decision does: part of the data fingerprint a run records."""
        text = (
            "\n".join(sorted(self.excluded))
            + "\0"
            + "\n".join(f"{k}\t{v}" for k, v in sorted(self.relabeled.items()))
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def summary(self) -> dict:
        return {"excluded": len(self.excluded), "relabeled": len(self.relabeled), "digest": self.digest()}


def normalize(relative: str) -> str:
    """A photo's key: a forward-slash path relative to the images folder, with no way out of it."""
    path = PurePosixPath(relative.strip().replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise UserError(f"{relative!r} is not a path inside the images folder; give it like cat/0001.jpg")
    return path.as_posix()


def read_decisions(images_dir: Path) -> Decisions:
    """The decisions recorded for this images folder (none when the files do not exist)."""
    excluded: set[str] = set()
    exclude_path = images_dir / EXCLUDE_FILE
    if exclude_path.exists():
        for number, line in enumerate(exclude_path.read_text("utf-8").splitlines(), 1):
            entry = line.split("#", 1)[0].strip()
            if entry:
                excluded.add(_checked(entry, exclude_path, number))
    relabeled: dict[str, str] = {}
    relabel_path = images_dir / RELABEL_FILE
    if relabel_path.exists():
        rows = csv.DictReader(io.StringIO(relabel_path.read_text("utf-8")))
        if rows.fieldnames is None or list(rows.fieldnames[:2]) != list(RELABEL_FIELDS):
            raise UserError(
                f"{relabel_path} must start with the header line 'file,category'; fix or remove it"
            )
        for number, row in enumerate(rows, 2):
            category = (row.get("category") or "").strip()
            if not category:
                raise UserError(f"{relabel_path} line {number}: no category; give one or remove the line")
            relabeled[_checked(row["file"] or "", relabel_path, number)] = category
    return Decisions(frozenset(excluded), relabeled)


def _checked(entry: str, path: Path, number: int) -> str:
    try:
        return normalize(entry)
    except UserError as error:
        raise UserError(f"{path} line {number}: {error}") from None


def record_decisions(
    images_dir: Path,
    exclude: set[str] | frozenset[str] = frozenset(),
    relabel: dict[str, str] | None = None,
    keep: set[str] | frozenset[str] = frozenset(),
) -> Decisions:
    """Merge new decisions into the recorded ones and write both files atomically; `keep` undoes earlier ones."""
    current = read_decisions(images_dir)
    relabel = {normalize(k): v for k, v in (relabel or {}).items()}
    undo = {normalize(k) for k in keep}
    excluded = (set(current.excluded) - undo - set(relabel)) | {normalize(k) for k in exclude}
    relabeled = {k: v for k, v in current.relabeled.items() if k not in undo and k not in excluded}
    relabeled.update({k: v for k, v in relabel.items() if k not in excluded})
    merged = Decisions(frozenset(excluded), relabeled)
    header = "# Photos left out of preprocessing, training and gathering (the files are not touched).\n"
    write_atomic(images_dir / EXCLUDE_FILE, (header + "".join(f"{k}\n" for k in sorted(excluded))).encode())
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RELABEL_FIELDS)
    writer.writerows(sorted(relabeled.items()))
    write_atomic(images_dir / RELABEL_FILE, out.getvalue().encode())
    return merged
