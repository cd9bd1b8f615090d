"""The "none of these" check: does a photo belong to any of the run's categories at all?

A classifier always answers with one of its categories; shown a cup, a cat/dog/horse model says "horse,
97%". This module keeps what it needs to judge, fitted on the training photos, and a threshold chosen on the
validation photos so that `--known-rate` of the known photos pass.
"""

from __future__ import annotations

import argparse

DEFAULT_KNOWN_RATE = 0.95


def known_rate_arg(text: str) -> float:
    """An argparse type: the share of known photos the check keeps, above 0 and at most 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 0 and at most 1, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number above 0 and at most 1, got {value}")
    return value
