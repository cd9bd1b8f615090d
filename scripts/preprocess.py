"""Turn workspace/images/<category>/ into numpy arrays split into train, validation and test.

    python scripts/preprocess.py --categories cat,dog,horse

Training runs this itself when its arrays are missing or stale; run it alone to check a folder first.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from image_classifier import cli
from image_classifier.images import RESIZE_MODES
from image_classifier.preprocess import DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE, PreprocessOptions, prepare_dataset


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.make_parser(__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--categories", type=cli.categories_arg, required=True, help="2 or more, like cat,dog,horse"
    )
    parser.add_argument(
        "--images-dir", type=Path, help="one subfolder per category (default: WORKSPACE/images)"
    )
    parser.add_argument(
        "--image-size", type=cli.positive_int, default=DEFAULT_IMAGE_SIZE, help="side in pixels"
    )
    parser.add_argument(
        "--resize", choices=RESIZE_MODES, default=DEFAULT_RESIZE, help="how photos become square"
    )
    parser.add_argument("--split", type=cli.fractions_arg, default=(0.8, 0.1, 0.1), metavar="TRAIN,VAL,TEST")
    parser.add_argument("--seed", type=int, default=0, help="for the split")
    parser.add_argument(
        "--dedupe", choices=("exact", "near"), default="exact", help="'near' drops look-alikes too"
    )
    parser.add_argument(
        "--workers", type=cli.non_negative_int, default=0, help="decoding processes (0: all cores)"
    )
    args = parser.parse_args(argv)
    workspace = cli.workspace_of(args)
    options = PreprocessOptions(
        categories=tuple(args.categories),
        images_dir=args.images_dir or workspace.images,
        image_size=args.image_size,
        resize=args.resize,
        split=args.split,
        seed=args.seed,
        dedupe=args.dedupe,
        workers=args.workers,
    )
    prepare_dataset(options, workspace)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
