"""Search the head's hyperparameters and the feature options with KerasTuner, on cached backbone features.

    python scripts/tune.py --categories cat,dog,horse [--trials 30] [--max-minutes 15] [--resume]

Writes workspace/tuning/<timestamp>/ (trials, TensorBoard HParams, best.json), trains the best configuration
once (the only use of the test split), and prints how to train it again:
python scripts/machine_learning.py --config workspace/tuning/<timestamp>/best.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from image_classifier import cli
from image_classifier.options import add_options, coerce
from image_classifier.tuning import TuneOptions

SCRIPT_OPTIONS = ("workspace", "resume")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser(__doc__.strip().splitlines()[0])
    add_options(parser, TuneOptions)
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="SEARCH",
        default=argparse.SUPPRESS,
        help="continue a stopped search with its own options: latest (the default), a folder name in "
        "tuning/, or a path; --trials and --max-minutes may be given anew",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from image_classifier.tuning import resume_search, tune

    parser = build_parser()
    args = vars(parser.parse_args(argv))
    workspace = cli.workspace_of(argparse.Namespace(**args))
    given = coerce(TuneOptions, {key: value for key, value in args.items() if key not in SCRIPT_OPTIONS})
    if "resume" in args:
        resume_search(workspace, args["resume"], given)
        return
    if not given.get("categories"):
        parser.error("the following arguments are required: --categories (or --resume SEARCH)")
    given.setdefault("images_dir", workspace.images)
    tune(TuneOptions(**given), workspace)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
