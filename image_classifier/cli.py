"""What every stage script shares: the parser, the --workspace option, and how errors end a run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .categories import CategoryError, parse_categories
from .config import Workspace, default_workspace
from .errors import UserError
from .splits import parse_fractions


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one and the help text does not already explain it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or "(default" in text
        ):
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like every other bad input in the project."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(description: str) -> ArgumentParser:
    parser = ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument(
        "--workspace",
        type=Path,
        default=default_workspace(),
        help="the data folder every stage reads and writes ($WORKSPACE when set)",
    )
    return parser


def categories_type(minimum: int = 2) -> Callable[[str], list[str]]:
    """An argparse type for --categories: at least `minimum` safe, distinct folder names."""

    def parse(text: str) -> list[str]:
        try:
            return parse_categories(text, minimum)
        except CategoryError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def int_list_arg(text: str) -> list[int]:
    """`1024,512` -> [1024, 512]; an empty string means none."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers like 1024,512, got {text!r}") from None
    if any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return values


def fractions_arg(text: str) -> tuple[float, float, float]:
    try:
        return parse_fractions(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _number(convert: Callable[[str], float], accept: Callable[[float], bool], expected: str):
    """An argparse type: `convert` the text, then check it, both failing with `expected` in the message."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


positive_int = _number(int, lambda value: value > 0, "a whole number above 0")
non_negative_int = _number(int, lambda value: value >= 0, "a whole number, 0 or more")
positive_float = _number(float, lambda value: value > 0, "a number above 0")
probability_arg = _number(float, lambda value: 0 <= value < 1, "a number from 0 up to (not including) 1")


def add_data_arguments(
    parser,
    image_size_default: int | None = None,
    image_size_help: str = "side in pixels",
    categories_required: bool = True,
) -> None:
    """The options that decide the arrays, shared by preprocessing and training so they never disagree."""
    from .images import RESIZE_MODES
    from .preprocess import DEFAULT_RESIZE, DEFAULT_SPLIT

    parser.add_argument(
        "--categories",
        type=categories_type(minimum=2),
        required=categories_required,
        help="2 or more, like cat,dog,horse",
    )
    parser.add_argument(
        "--images-dir",
        type=Path,
        help="one subfolder of photos per category; with train/, validation/ and test/ subfolders those splits "
        "are used as given (default: WORKSPACE/images)",
    )
    parser.add_argument("--image-size", type=positive_int, default=image_size_default, help=image_size_help)
    parser.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default=DEFAULT_RESIZE,
        help="fit photos to a square: centre crop, squash (stretch), or pad with black",
    )
    parser.add_argument(
        "--split",
        type=fractions_arg,
        default=DEFAULT_SPLIT,
        metavar="TRAIN,VAL,TEST",
        help="shares for train, validation and test, stratified per category (default: 0.8,0.1,0.1)",
    )
    parser.add_argument(
        "--dedupe",
        choices=("exact", "near"),
        default="exact",
        help="identical files are always kept once; 'near' also drops look-alikes",
    )
    parser.add_argument(
        "--workers", type=non_negative_int, default=0, help="processes decoding images (0: one per CPU core)"
    )


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict:
    """Only the options typed on the command line, not their defaults, by destination name."""
    defaults = {action: action.default for action in parser._actions}
    try:
        for action in defaults:
            action.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for action, default in defaults.items():
            action.default = default


def workspace_of(args: argparse.Namespace) -> Workspace:
    return Workspace(Path(args.workspace))


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a stage; a UserError or Ctrl-C becomes one line on stderr and a non-zero exit status."""
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except PermissionError as error:
        print(
            f"error: permission denied on {error.filename or 'a file'}; the workspace must be writable by this user "
            "(with Docker, put UID=$(id -u) and GID=$(id -g) in .env and rebuild: see the README)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as error:
        print(f"\ninterrupted: {error or 'stopped by Ctrl-C'}", file=sys.stderr)
        return 130
    return 0
