"""What every stage script shares: the parser, the --workspace option, and how errors end a run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import Workspace, default_workspace
from .errors import UserError
from .splits import parse_fractions


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like every other bad input in the project."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(description: str) -> ArgumentParser:
    parser = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--workspace",
        type=Path,
        default=default_workspace(),
        help="the data folder every stage reads and writes ($WORKSPACE when set)",
    )
    return parser


def categories_arg(text: str) -> list[str]:
    """`cat,dog,horse` -> ['cat', 'dog', 'horse'], rejecting empties and repeats."""
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise argparse.ArgumentTypeError(f"empty category name in {text!r}; write them like cat,dog,horse")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"category listed twice: {', '.join(repeated)}")
    if len(names) < 2:
        raise argparse.ArgumentTypeError(
            f"a classifier needs at least 2 categories, got {len(names)}; write them like cat,dog"
        )
    return names


def int_list_arg(text: str) -> list[int]:
    """`1024,512` -> [1024, 512]; an empty string means none."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers like 1024,512, got {text!r}") from None
    if any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def fractions_arg(text: str) -> tuple[float, float, float]:
    try:
        return parse_fractions(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def probability_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 up to (not including) 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value}")
    return value


def workspace_of(args: argparse.Namespace) -> Workspace:
    return Workspace(Path(args.workspace))


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a stage; a UserError or Ctrl-C becomes one line on stderr and a non-zero exit status."""
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: stopped by Ctrl-C", file=sys.stderr)
        return 130
    return 0
