"""Train an image classifier on workspace/images/<category>/ and save everything in a run folder.

python scripts/machine_learning.py --categories cat,dog,horse
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from image_classifier import cli
from image_classifier.options import add_options, coerce, read_config_file
from image_classifier.training.config import TrainConfig

SCRIPT_OPTIONS = ("workspace", "resume", "config")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser(__doc__.strip().splitlines()[0])
    add_options(parser, TrainConfig)
    runs = parser.add_argument_group("runs")
    runs.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="train with the options saved in FILE (a run's config.json, or a tuning best.json); "
        "options typed on the command line override it",
    )
    runs.add_argument(
        "--resume",
        metavar="RUN",
        default=argparse.SUPPRESS,
        help="continue an interrupted run from its last finished epoch: latest (the newest unfinished run), "
        "a folder name in runs/, or a path; it keeps the run's own options",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from image_classifier.training.loop import resume_training, train

    parser = build_parser()
    args = vars(parser.parse_args(argv))
    workspace = cli.workspace_of(argparse.Namespace(**args))
    given = coerce(TrainConfig, {key: value for key, value in args.items() if key not in SCRIPT_OPTIONS})
    if args.get("resume"):
        if args.get("config"):
            parser.error("--resume continues a run with its own options; leave out --config")
        resume_training(workspace, args["resume"], given)
        return
    options = {**(read_config_file(args["config"], TrainConfig) if args.get("config") else {}), **given}
    if not options.get("categories"):
        parser.error("the following arguments are required: --categories (or --resume RUN)")
    options.setdefault("images_dir", workspace.images)
    train(TrainConfig(**options), workspace)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
