"""Find likely wrong labels, off-topic photos and duplicates, and review them in a page.

    python scripts/clean.py --categories cat,dog,horse            # writes images/review/review.html
    python scripts/clean.py --categories cat,dog,horse --serve    # the page on http://127.0.0.1, saves at once
    python scripts/clean.py --categories cat,dog,horse --decisions decisions.csv
    python scripts/clean.py --categories cat,dog,horse --apply auto

Decisions go to exclude.txt and relabel.csv beside the photos; the photos themselves are never touched.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from image_classifier import cli
from image_classifier.cleaning import CleanOptions, run_clean
from image_classifier.options import add_options, coerce


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.make_parser(__doc__.strip().splitlines()[0])
    add_options(parser, CleanOptions)
    actions = parser.add_argument_group("actions")
    actions.add_argument(
        "--serve", action="store_true", help="show the review on 127.0.0.1 and record each save"
    )
    actions.add_argument(
        "--port", type=cli.non_negative_int, default=8765, help="for --serve; 0 picks a free one"
    )
    actions.add_argument(
        "--decisions", type=Path, metavar="FILE", help="record a decisions.csv the page downloaded"
    )
    actions.add_argument(
        "--apply",
        choices=("auto",),
        help="exclude the flagged wrong labels and off-topic photos without review",
    )
    args = parser.parse_args(argv)
    if not hasattr(args, "categories"):
        parser.error("the following arguments are required: --categories")
    if args.decisions and (args.apply or args.serve):
        parser.error("--decisions records a saved file; use it without --apply and --serve")
    workspace = cli.workspace_of(args)
    options = coerce(CleanOptions, vars(args))
    options.setdefault("images_dir", workspace.images)
    run = partial(
        run_clean, CleanOptions(**options), workspace, args.decisions, args.apply, args.serve, args.port
    )
    run(print_fn=partial(print, flush=True))


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
