"""Category names: which ones can be a folder under images/, read from text like `cat,dog,horse`.

A domain rule shared by gather, preprocessing and training; the command-line adapters are in cli.py.
"""

from __future__ import annotations

FORBIDDEN_CHARACTERS = set('/\\:*?"<>|')
RESERVED_NAMES = {"manifest.csv", "train", "validation", "test"}
"""images/manifest.csv is gather's record; train/, validation/ and test/ mean given splits."""


class CategoryError(ValueError):
    """A category list that cannot name folders; the message says how to write one."""


def category_problem(name: str) -> str | None:
    """Why `name` cannot be a category folder under images/, or None when it can."""
    if not name:
        return "an empty name"
    if name.startswith("."):
        return f"{name!r} starts with a dot (hidden folders are ignored)"
    bad = sorted({char for char in name if char in FORBIDDEN_CHARACTERS or ord(char) < 32})
    if bad:
        return f"{name!r} contains {' '.join(repr(char) for char in bad)}, which a folder name cannot"
    if name.lower() in RESERVED_NAMES:
        return f"{name!r} is reserved in the images folder"
    if len(name) > 100:
        return f"{name[:20]!r}... is longer than 100 characters"
    return None


def parse_categories(text: str, minimum: int = 2) -> list[str]:
    """`cat,dog,horse` -> ['cat', 'dog', 'horse']: safe folder names, no repeats, at least `minimum`."""
    names = [name.strip() for name in text.split(",")]
    for name in names:
        problem = category_problem(name)
        if problem:
            raise CategoryError(f"bad category name: {problem}; write them like cat,dog,horse")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CategoryError(f"category listed twice: {', '.join(repeated)}")
    if len(names) < minimum:
        raise CategoryError(
            f"a classifier needs at least {minimum} categories, got {len(names)}; write them like cat,dog"
        )
    return names
