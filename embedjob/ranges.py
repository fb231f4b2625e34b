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


def parse_ranges(text: str) -> list[int]:
    out: list[int] = []
    for run in filter(None, (r.strip() for r in text.split(","))):
        lo, _, hi = run.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out
