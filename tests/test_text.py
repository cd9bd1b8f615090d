"""Console tables line up by display width: a kana takes two terminal columns, a combining accent none."""

from __future__ import annotations

import numpy as np
from conftest import make_image_folders

from image_classifier.config import Workspace
from image_classifier.evaluate import compute_metrics, format_report
from image_classifier.preprocess import PreprocessOptions, prepare_dataset
from image_classifier.text import display_width, pad

NAMES = ["きのこ", "たけのこの里", "café", "cafe\u0301", "кот"]


def test_display_width_counts_terminal_columns():
    assert [display_width(name) for name in NAMES] == [6, 12, 4, 4, 3]
    assert display_width(pad("きのこ", 10)) == 10 and pad("cat", 2) == "cat"


def test_the_per_class_table_aligns_names_in_any_script():
    truth = np.arange(len(NAMES))
    probabilities = np.eye(len(NAMES))[truth] * 0.9 + 0.02
    report = format_report(compute_metrics(probabilities, truth, NAMES)).splitlines()
    assert len({display_width(line) for line in report}) == 1, "\n".join(report)  # the last column ends alike
    assert len(report) == len(NAMES) + 2


def test_the_split_table_aligns_japanese_category_names(tmp_path):
    images = make_image_folders(tmp_path / "images", {"きのこ": 6, "たけのこ": 6, "pie": 6})
    lines: list[str] = []
    options = PreprocessOptions(
        categories=("きのこ", "たけのこ", "pie"), images_dir=images, image_size=16, workers=1
    )
    prepare_dataset(options, Workspace(tmp_path / "ws"), print_fn=lines.append)
    table = [
        line
        for line in lines[0].splitlines()
        if line.split() and line.split()[0] in ("category", "きのこ", "たけのこ", "pie", "total")
    ]
    assert len(table) == 5
    assert len({display_width(line) for line in table}) == 1, "\n".join(table)
