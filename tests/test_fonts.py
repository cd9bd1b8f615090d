"""Labels in any script are drawn, not turned into boxes; a character no font has is said once, in one line."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings

import numpy as np
import pytest

from image_classifier import fonts
from image_classifier.evaluate import compute_metrics, confusion_matrix_figure

NAMES = ["きのこ", "たけのこ", "고양이", "кот"]


def drawn_warnings(figure) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure.savefig(io.BytesIO(), format="png")
    return [str(warning.message) for warning in caught if "missing from font" in str(warning.message)]


def figure_of(names: list[str]):
    truth = np.arange(len(names))
    return confusion_matrix_figure(compute_metrics(np.eye(len(names))[truth] * 0.9 + 0.02, truth, names))


def test_japanese_and_korean_labels_are_drawn_with_an_installed_cjk_font():
    chain = fonts.families_for("".join(NAMES))
    if len(chain) == 1:
        pytest.skip("no CJK font installed here (run-tests.sh installs fonts-noto-cjk)")
    figure = figure_of(NAMES)
    assert drawn_warnings(figure) == []
    for text in figure.findobj(lambda item: hasattr(item, "get_text") and item.get_text() in NAMES):
        assert text.get_fontfamily() == chain
    for text in figure.findobj(lambda item: hasattr(item, "get_text") and item.get_text() in NAMES):
        text.set_fontfamily([fonts.BASE_FONT])
    assert drawn_warnings(figure), "the base font alone draws boxes: the check above can fail"


def test_a_character_no_font_has_is_reported_once_in_one_line():
    script = (
        "from image_classifier import fonts\n"
        "fonts.families_for('\\U0010fffd cat')\n"
        "fonts.families_for('\\U0010fffd dog')\n"
        "fonts.families_for('plain ascii')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: no installed font can draw")
    assert fonts.INSTALL_HINT in lines[0]
