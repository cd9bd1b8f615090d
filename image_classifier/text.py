"""Console text that lines up whatever script a label is written in.

A kana, kanji or hangul character takes two columns of a terminal, a combining accent none, so padding by
character count misaligns tables of Japanese category names. Python's unicodedata knows each character's
East Asian width, which is what terminals follow; no extra dependency is needed for it.
"""

from __future__ import annotations

import unicodedata


def display_width(text: str) -> int:
    """Terminal columns `text` takes: 2 for wide and full-width characters, 0 for combining marks."""
    width = 0
    for char in str(text):
        if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def pad(text: str, width: int) -> str:
    """`text` followed by spaces up to `width` columns (left-aligned)."""
    return str(text) + " " * max(0, width - display_width(text))


def column_width(*texts: str) -> int:
    return max(display_width(text) for text in texts)
