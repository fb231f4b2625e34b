"""Where a sequence sits in its shard's batch order: how poison bisection names suspects.

The worker batches a shard's pending sequences longest first (padded cost descending, ties by
input position: :func:`embedjob.worker.batching.make_batches`). Ranking *every* sequence of
the shard that way gives each one a fixed position, which depends only on the shard's input
and the model's cost function, and each batch covers one contiguous run of positions among
the sequences still pending. A batch that crashes is named by that run (``"120-134"``): a few
bytes however many sequences it holds and however long their ids, in the termination message
(4 KiB at most) and in the policy's history (``suspects``, ``isolate``). Only a sequence that
crashes on its own is named by id, to be quarantined.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the operator image has no numpy: policy.py imports the run helpers
    import numpy as np

__all__ = ["isolated_mask", "parse_run", "positions", "run_of", "within"]


def positions(costs: Sequence[int] | np.ndarray) -> np.ndarray:
    """Each row's position in the batch order: cost descending, ties by row."""
    import numpy as np

    cost = np.asarray(costs, dtype=np.int64)
    order = np.lexsort((np.arange(len(cost)), -cost))  # last key is the primary one
    where = np.empty(len(cost), dtype=np.int64)
    where[order] = np.arange(len(cost))
    return where


def run_of(where: Iterable[int]) -> str:
    """The run covering some positions: ``"lo-hi"`` (inclusive), ``"k"`` for one, or ``""``."""
    values = [int(v) for v in where]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def parse_run(text: str | None) -> tuple[int, int] | None:
    """``"lo-hi"`` or ``"k"`` -> (lo, hi) inclusive; None for anything else (e.g. an id
    from a history written before positions were used)."""
    lo, dash, hi = (text or "").strip().partition("-")
    if not lo.isdigit() or (dash and not hi.isdigit()):
        return None
    first, last = int(lo), int(hi) if dash else int(lo)
    return (first, last) if first <= last else None


def within(run: str, runs: Iterable[str]) -> bool:
    """Does ``run`` lie inside one of ``runs``?"""
    inner = parse_run(run)
    if inner is None:
        return False
    return any(outer is not None and outer[0] <= inner[0] and inner[1] <= outer[1]
               for outer in map(parse_run, runs))


def isolated_mask(runs: Iterable[str], count: int) -> np.ndarray:
    """A boolean mask over positions ``0..count-1``: True inside one of ``runs``."""
    import numpy as np

    mask = np.zeros(count, dtype=bool)
    for span in map(parse_run, runs):
        if span is not None:
            mask[span[0] : span[1] + 1] = True
    return mask
