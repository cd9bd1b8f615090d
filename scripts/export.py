"""Export a trained run's model for deployment as a TensorFlow SavedModel, TFLite or ONNX file, checked
against the Keras model on the run's test images.

python scripts/export.py --format tflite --quantize float16
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from image_classifier import cli
from image_classifier.export import FORMATS, QUANTIZATIONS, ExportOptions, export_run


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser(__doc__.strip().split("\n\n")[0].replace("\n", " "))
    parser.add_argument(
        "--run",
        default="latest",
        help="which training run: latest, a folder name in WORKSPACE/runs, or a path",
    )
    parser.add_argument("--format", choices=FORMATS, required=True, help="written to RUN/export/")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default="none",
        help="tflite only: float16 weights (half the size) or dynamic-range int8 (a quarter)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    export_run(
        ExportOptions(format=args.format, run=args.run, quantize=args.quantize), cli.workspace_of(args)
    )


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
