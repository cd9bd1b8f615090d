"""Draw training curves as PNG: history.png in each run folder, and one overlay when given several runs.

python scripts/plot_history.py                       # the latest run
python scripts/plot_history.py 20250101-120000-cnn 20250101-130000-cnn
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from image_classifier import cli
from image_classifier.reports import plot_runs


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.make_parser(__doc__.strip().splitlines()[0])
    parser.add_argument(
        "runs",
        nargs="*",
        default=["latest"],
        metavar="RUN",
        help="'latest', a run folder name under WORKSPACE/runs, or a path to a run folder",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="where the overlay of several runs goes (default: WORKSPACE/comparisons/<run>_vs_<run>.png)",
    )
    args = parser.parse_args(argv)
    for path in plot_runs(cli.workspace_of(args), args.runs, args.output):
        print(f"Wrote {path}")


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
