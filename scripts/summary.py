"""Print a model's layers and parameter counts, and draw its architecture diagram.

python scripts/summary.py --model mobilenet_v2 --categories cat,dog,horse
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from image_classifier import cli
from image_classifier.models import DEFAULT_MODEL, REGISTRY, check_image_size, get_spec, show_architecture


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.make_parser(__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--model",
        choices=list(REGISTRY),
        default=DEFAULT_MODEL,
        metavar="NAME",
        help=f"one of: {', '.join(REGISTRY)}",
    )
    parser.add_argument(
        "--categories",
        type=cli.categories_type(minimum=2),
        default=["cat", "dog"],
        help="only their number matters: the size of the output layer",
    )
    parser.add_argument(
        "--image-size", type=cli.positive_int, help="side in pixels (default: the model's own)"
    )
    parser.add_argument(
        "--dense-units", type=cli.int_list_arg, metavar="N,N", help="hidden layers of the head"
    )
    parser.add_argument("--output", type=Path, help="diagram file (default: WORKSPACE/summaries/<model>.png)")
    args = parser.parse_args(argv)
    spec = get_spec(args.model)
    image_size = args.image_size or spec.default_image_size
    check_image_size(spec, image_size)
    diagram = args.output or cli.workspace_of(args).root / "summaries" / f"{spec.name}.png"
    show_architecture(spec, len(args.categories), image_size, diagram, dense_units=args.dense_units)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
