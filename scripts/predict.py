"""Predict the category of new images with a trained run: files, folders (recursively) or http(s) URLs.

python scripts/predict.py photo.jpg holiday/ https://example.org/cat.jpg
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from image_classifier import cli
from image_classifier.predict import DEFAULT_BATCH_SIZE, DEFAULT_TOP_K, PredictOptions, run_predict


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser(__doc__.strip().splitlines()[0])
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE_OR_FOLDER_OR_URL",
        help="image files, folders (read recursively, in batches) or http(s) URLs",
    )
    parser.add_argument(
        "--run",
        default="latest",
        help="which training run: latest, a folder name in WORKSPACE/runs, or a path",
    )
    parser.add_argument(
        "--top-k", type=cli.positive_int, default=DEFAULT_TOP_K, help="labels shown per image"
    )
    parser.add_argument(
        "--threshold",
        type=cli.probability_arg,
        default=0.0,
        metavar="P",
        help="mark predictions whose top probability is below P (like 0.6) as uncertain",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--json",
        dest="output",
        action="store_const",
        const="json",
        help="JSON for programs (default: an aligned table for people)",
    )
    output.add_argument(
        "--csv",
        dest="output",
        action="store_const",
        const="csv",
        help="CSV, one row per input (default: the table)",
    )
    parser.set_defaults(output="table")
    parser.add_argument(
        "--batch-size", type=cli.positive_int, default=DEFAULT_BATCH_SIZE, help="images per model call"
    )
    parser.add_argument(
        "--explain",
        metavar="DIR",
        help="write a Grad-CAM heatmap over each photo into DIR (made if missing): where the model looked",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    options = PredictOptions(
        inputs=tuple(args.inputs),
        run=args.run,
        top_k=args.top_k,
        threshold=args.threshold,
        output=args.output,
        batch_size=args.batch_size,
        explain=args.explain,
    )
    run_predict(options, cli.workspace_of(args))


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
