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


def names_arg(text: str) -> list[str]:
    """`block_6_expand_relu,final` -> ['block_6_expand_relu', 'final']; at least one name."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            f"expected names separated by commas, like block_13_expand_relu,final, got {text!r}"
        )
    return names


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
