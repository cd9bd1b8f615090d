#!/usr/bin/env python3
"""Gather images: fill workspace/images/<category>/ with up to --limit good images per category.

Examples:
  gather_images.py --categories cat,dog,horse --limit 200
  gather_images.py --categories cat,dog --query cat="house cat" --source wikimedia --contact you@example.org
  gather_images.py --urls my_urls.csv            (rows of category,url)
  gather_images.py --from ~/Pictures/pets        (one subfolder per category; a .zip works too)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from image_classifier import cli
from image_classifier.gathering.run import (
    DEFAULT_MAX_WAIT,
    DEFAULT_MIN_SIDE,
    DEFAULT_PER_HOST,
    DEFAULT_SOURCE,
    DEFAULT_WORKERS,
    GatherOptions,
    gather,
    parse_query,
)
from image_classifier.gathering.sources import DEFAULT_LIMIT, LICENCES, SOURCES


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; shows defaults, except the None of options whose help explains it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def query_arg(text: str) -> tuple[str, str]:
    """The argparse type for --query: parse_query's message becomes a usage error."""
    try:
        return parse_query(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.make_parser(__doc__ or "")
    parser.formatter_class = _HelpFormatter
    _what_options(parser)
    _how_options(parser)
    args = parser.parse_args(argv)
    gather(cli.workspace_of(args), GatherOptions.from_args(args))


def _what_options(parser: argparse.ArgumentParser) -> None:
    """What to gather, and from where."""
    parser.add_argument(
        "--categories",
        type=cli.categories_type(minimum=1),  # one is enough: gather one category at a time
        help="comma-separated category names, like cat,dog,horse (taken from --urls or --from when left out)",
    )
    parser.add_argument(
        "--limit",
        type=cli.positive_int,
        help=f"good images wanted per category, counting those already there "
        f"(default: {DEFAULT_LIMIT} for searches, everything for --urls and --from)",
    )
    parser.add_argument(
        "--source",
        choices=list(SOURCES),
        help=f"where images come from (default: urls with --urls, folder or zip with --from, else {DEFAULT_SOURCE})",
    )
    parser.add_argument(
        "--query",
        type=query_arg,
        action="append",
        metavar="CATEGORY=TEXT",
        help="search text for a category instead of its name; repeat for several queries per category",
    )
    parser.add_argument("--urls", type=Path, metavar="FILE", help="CSV of category,url rows (--source urls)")
    parser.add_argument(
        "--from",
        dest="from_path",
        type=Path,
        metavar="PATH",
        help="folder or .zip with one subfolder of images per category (--source folder or zip); only read",
    )
    parser.add_argument(
        "--license",
        choices=LICENCES,
        default="any",
        help="only photos whose licence allows commercial use (no NC) or changes (no ND); searches only",
    )
    parser.add_argument(
        "--contact",
        metavar="EMAIL_OR_URL",
        help="how Wikimedia can reach you, sent in the User-Agent (required by --source wikimedia, "
        "or set GATHER_USER_AGENT)",
    )


def _how_options(parser: argparse.ArgumentParser) -> None:
    """How hard to fetch: concurrency, patience, limits."""
    parser.add_argument(
        "--workers", type=cli.positive_int, default=DEFAULT_WORKERS, help="downloads at the same time"
    )
    parser.add_argument(
        "--per-host",
        type=cli.positive_int,
        default=DEFAULT_PER_HOST,
        help="downloads at the same time from one host (upload.wikimedia.org: at most 2)",
    )
    parser.add_argument(
        "--max-wait",
        type=cli.positive_float,
        default=DEFAULT_MAX_WAIT,
        help="longest wait in seconds a rate limit may ask for; a longer one stops that source until a re-run",
    )
    parser.add_argument(
        "--min-side",
        type=cli.positive_int,
        default=DEFAULT_MIN_SIDE,
        help="skip images whose shorter side has fewer pixels",
    )
    parser.add_argument(
        "--timeout",
        type=cli.positive_float,
        default=20.0,
        help="seconds to wait for a server before retrying",
    )
    parser.add_argument(
        "--retries", type=cli.non_negative_int, default=3, help="tries after a timeout, 429 or 5xx answer"
    )
    parser.add_argument(
        "--max-mb", type=cli.positive_float, default=25.0, help="largest file to download, in MB"
    )


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
