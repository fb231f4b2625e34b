"""Compact index sets as range strings, like a Job's ``completedIndexes``: ``"0-41,43"``."""

from __future__ import annotations

from collections.abc import Iterable


def format_ranges(indexes: Iterable[int]) -> str:
    values = sorted(set(indexes))
    runs: list[str] = []
    start = prev = None
    for v in values:
        if prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = v
    if start is not None:
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(runs)


def parse_ranges(text: str | None) -> list[int]:
    """'0-3,5' -> [0, 1, 2, 3, 5]; empty or None -> []."""
    out: list[int] = []
    for run in filter(None, (r.strip() for r in (text or "").split(","))):
        lo, _, hi = run.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def range_set(text: str | None) -> set[int]:
    """The indexes of a range string as a set (what membership tests want)."""
    return set(parse_ranges(text))
