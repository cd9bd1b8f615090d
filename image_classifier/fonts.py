"""Fonts that can draw every label of a figure: category names in Japanese, Chinese, Korean, Cyrillic...

Matplotlib's default font (DejaVu Sans) has no kana or kanji: a confusion matrix of きのこ and たけのこ shows
empty boxes. Before a figure is drawn, `use_fonts_for(figure)` finds, among the installed fonts, ones that
hold the characters DejaVu Sans lacks and gives every text of the figure that fallback chain (matplotlib
takes each glyph from the first font that has it). When no installed font has some character, it says so
once, in one line, with the package to install; the Docker image installs Debian's Noto CJK fonts.
"""

from __future__ import annotations

import sys
from functools import cache

BASE_FONT = "DejaVu Sans"
PREFERRED = ("Noto Sans CJK JP", "Noto Sans CJK", "Noto Sans", "IPAexGothic", "IPAGothic", "TakaoPGothic")
"""Looked at first, in this order, for characters the base font lacks (Japanese users come first here)."""
PLACEHOLDER_FONTS = ("Last Resort",)
"""Fonts that "have" every character as a placeholder box: drawing with them is the boxes this module avoids."""
INSTALL_HINT = "install a font that has them, e.g. apt-get install fonts-noto-cjk (Debian/Ubuntu)"

_warned: set[str] = set()


@cache
def _charmap(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


@cache
def _fonts() -> tuple[tuple[str, str], ...]:
    """(family, file) of every installed font, preferred ones first; fonts installed after matplotlib built
    its font cache are added to it."""
    from matplotlib import font_manager

    manager = font_manager.fontManager
    known = {entry.fname for entry in manager.ttflist}
    for path in font_manager.findSystemFonts():
        if path not in known:
            try:
                manager.addfont(path)
            except (OSError, RuntimeError, ValueError):
                continue
    entries = {
        (entry.name, entry.fname)
        for entry in manager.ttflist
        if entry.style == "normal" and not entry.name.startswith(PLACEHOLDER_FONTS)
    }

    def rank(entry: tuple[str, str]) -> tuple[int, str]:
        name = entry[0]
        order = next(
            (i for i, preferred in enumerate(PREFERRED) if name.startswith(preferred)), len(PREFERRED)
        )
        return order, name

    return tuple(sorted(entries, key=rank))


def families_for(text: str) -> list[str]:
    """The base font, then enough installed fonts to draw every character of `text`."""
    from matplotlib import font_manager

    needed = {ord(char) for char in text if not char.isspace()}
    base = _charmap(font_manager.findfont(BASE_FONT))
    missing = needed - base
    chain = [BASE_FONT]
    for family, path in _fonts() if missing else ():
        if family in chain:
            continue
        covered = missing & _charmap(path)
        if covered:
            chain.append(family)
            missing -= covered
        if not missing:
            break
    if missing:
        _warn(sorted(chr(code) for code in missing))
    return chain


def _warn(characters: list[str]) -> None:
    new = [char for char in characters if char not in _warned]
    if not new:
        return
    _warned.update(characters)
    shown = "".join(new[:8]) + ("..." if len(new) > 8 else "")
    print(f"warning: no installed font can draw {shown!r} in figure labels; {INSTALL_HINT}", file=sys.stderr)


def use_fonts_for(figure):
    """Give every text of `figure` a font chain that draws all of them; returns the figure."""
    from matplotlib.text import Text

    texts = figure.findobj(Text)
    chain = families_for("".join(text.get_text() for text in texts))
    if len(chain) > 1:
        for text in texts:
            text.set_fontfamily(chain)
    return figure
