"""Turn workspace/images/<category>/ into numpy arrays split into train, validation and test.

    python scripts/preprocess.py --categories cat,dog,horse

Training runs this itself when its arrays are missing or stale; run it alone to check a folder first.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from image_classifier import cli
from image_classifier.preprocess import DEFAULT_IMAGE_SIZE, PreprocessOptions, prepare_dataset


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.make_parser(__doc__.strip().splitlines()[0])
    cli.add_data_arguments(parser, image_size_default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=0, help="for the split")
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
