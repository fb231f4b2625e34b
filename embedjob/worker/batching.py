"""Length-sorted batches under a token budget (pure)."""

from __future__ import annotations

from collections.abc import Sequence


def make_batches(costs: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into batches whose padded size ``max(cost) * n`` fits ``max_tokens``.

    ``costs[i]`` is the padded tokens sequence ``i`` occupies (``Embedder.tokens_for``).
    Batches run longest first, so a budget too large for the device fails on the first batch
    rather than hours in. A sequence over the budget on its own gets a batch of its own.
    Ties are broken by index, so the result is deterministic.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0  # the first (longest) member's cost sets the batch's padded width
    for i in order:
        if current and width * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        if not current:
            width = costs[i]
        current.append(i)
    if current:
        batches.append(current)
    return batches
