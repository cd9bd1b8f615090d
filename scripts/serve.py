"""Serve a trained run: a page to try photos in a browser, and an HTTP API for other programs.

    python scripts/serve.py [--run latest] [--port 8501]

Then open http://127.0.0.1:8501/, or: curl -F file=@photo.jpg http://127.0.0.1:8501/predict
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from image_classifier import cli
from image_classifier.options import add_options, coerce


def main(argv: Sequence[str] | None = None) -> None:
    from image_classifier.serving import ServeOptions, serve

    parser = cli.make_parser(__doc__.strip().splitlines()[0])
    add_options(parser, ServeOptions)
    args = parser.parse_args(argv)
    serve(ServeOptions(**coerce(ServeOptions, vars(args))), cli.workspace_of(args))


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
