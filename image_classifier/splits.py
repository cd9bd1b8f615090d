"""Train/validation/test assignment: stratified per class, seeded, and stable when files are added.

Each image's place in the order comes from a hash of the seed and its content hash, not from a shuffle
of a list, so adding a few photos moves few others between splits. Near-duplicate images share a group
and a group always lands in one split, so no picture leaks into test through a resized copy.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

SPLITS: tuple[str, ...] = ("train", "validation", "test")
MIN_IMAGES_PER_CLASS = 5


@dataclass(frozen=True)
class SplitItem:
    label: int
    key: str
    """A stable identity, the content hash."""
    group: int
    """Items with the same group (near-duplicates) are kept together."""


def parse_fractions(text: str) -> tuple[float, float, float]:
    """`0.8,0.1,0.1` (or `80,10,10`) -> fractions summing to 1; ValueError with a readable message."""
    try:
        parts = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"expected three numbers like 0.8,0.1,0.1, got {text!r}") from None
    if len(parts) != 3 or any(part < 0 for part in parts) or sum(parts) <= 0:
        raise ValueError(f"expected three non-negative numbers like 0.8,0.1,0.1, got {text!r}")
    total = sum(parts)
    train, validation, test = (part / total for part in parts)
    if train <= 0 or validation <= 0 or test <= 0:
        raise ValueError(f"train, validation and test each need a share above 0, got {text!r}")
    return train, validation, test


def _order_key(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_counts(total: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """How many of `total` images go to train, validation and test (each at least 1)."""
    validation = max(1, round(total * fractions[1]))
    test = max(1, round(total * fractions[2]))
    return total - validation - test, validation, test


def assign_splits(items: Sequence[SplitItem], fractions: Sequence[float], seed: int) -> list[str]:
    """The split name for each item, in the order given."""
    by_label: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index, item in enumerate(items):
        by_label[item.label][item.group].append(index)
    result = [""] * len(items)
    for groups in by_label.values():
        total = sum(len(members) for members in groups.values())
        _, n_validation, n_test = split_counts(total, fractions)
        ordered = sorted(
            groups.values(), key=lambda members: min(_order_key(seed, items[i].key) for i in members)
        )
        filled = {"test": 0, "validation": 0}
        for members in ordered:
            if filled["test"] < n_test:
                name = "test"
            elif filled["validation"] < n_validation:
                name = "validation"
            else:
                name = "train"
            if name in filled:
                filled[name] += len(members)
            for index in members:
                result[index] = name
    return result
