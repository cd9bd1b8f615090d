"""Turn workspace/images/<category>/ into numpy arrays split into train, validation and test.

    python scripts/preprocess.py --categories cat,dog,horse

Training runs this itself when its arrays are missing or stale; run it alone to check a folder first.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from image_classifier import cli
from image_classifier.options import add_options, coerce
from image_classifier.preprocess import PreprocessOptions, prepare_dataset


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.make_parser(__doc__.strip().splitlines()[0])
    add_options(parser, PreprocessOptions)
    args = parser.parse_args(argv)
    if not hasattr(args, "categories"):
        parser.error("the following arguments are required: --categories")
    workspace = cli.workspace_of(args)
    options = coerce(PreprocessOptions, vars(args))
    options.setdefault("images_dir", workspace.images)
    prepare_dataset(PreprocessOptions(**options), workspace)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
