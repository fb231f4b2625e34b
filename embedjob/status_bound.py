"""The status held to a size in bytes, not in entries. Pure.

A status is one etcd object, patched whole on the first write and read by every watcher:
it must stay small however many shards fail, with whatever messages, node names and
quarantined ids. What is always kept is the record the next pass decides from (the range
strings: shards done, failed, running, and every started shard's attempt in shardAttempts).
Manifest entries are kept whole, most important first (status.compact_manifest's order),
while they fit :data:`STATUS_BUDGET_BYTES`; an entry is never cut short (a truncated
quarantine list would silently run a crashing sequence again). What is left out is counted
in ``manifestOmitted`` and stays derivable: the shard's attempt from shardAttempts, its
policy history from its pod's history annotation (the pod of a running, pending or failed
attempt carries the history it was started with; the policy settles an ended attempt
from that pod again, with the same answer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from embedjob.spec import ShardEntry

STATUS_MAX_BYTES = 256 * 1024
"""The promise (docs/operator.md): a status never exceeds this, as the patch sends it."""
STATUS_BUDGET_BYTES = 200 * 1024
"""What the status is built to: the range strings first, manifest entries in what is left
(below the promise: the patch's wrapper and the next pass's small changes fit)."""
ENTRY_MAX_BYTES = 16 * 1024
"""A single entry larger than this (hundreds of quarantined ids) is left to its pod's
annotation rather than crowding out dozens of others."""
SKIP_MAX = 64
"""Entries tried and skipped before the fitting stops (bounded work in the worst case)."""
MESSAGE_MAX = 1000
"""status.message (the job's one line) is cut to this."""


def dump_entry(entry: ShardEntry) -> dict[str, Any]:
    """One manifest entry as the status holds it (defaults left out, the shard always in)."""
    return entry.model_dump(mode="json", by_alias=True, exclude_none=True,
                            exclude_defaults=True) | {"shard": entry.shard}


def json_size(data: Any) -> int:
    """Bytes of ``data`` as JSON (json.dumps' default separators, as the client sends it)."""
    return len(json.dumps(data).encode())


def fit_entries(ordered: Iterable[ShardEntry], budget: int, cap: int) -> list[ShardEntry]:
    """The first entries of ``ordered`` (most important first) that fit ``budget`` bytes,
    at most ``cap``; an entry that does not fit is skipped and a smaller later one may take
    its place. At most :data:`SKIP_MAX` are skipped, so the work stays bounded too."""
    kept: list[ShardEntry] = []
    used = skipped = 0
    for entry in ordered:
        if len(kept) >= cap or skipped >= SKIP_MAX:
            break
        size = json_size(dump_entry(entry)) + 2  # ", " between entries
        if size > ENTRY_MAX_BYTES or used + size > budget:
            skipped += 1
            continue
        kept.append(entry)
        used += size
    return kept
