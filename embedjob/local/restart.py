"""``embedjob run --restart`` and ``--retry-failed``: what an earlier run left, and what to keep.

Pure where it can be: :func:`plan_restore` turns the earlier status.json into per-shard
histories; :func:`job_keys` lists what ``--restart`` deletes (only the job's own layout,
never other files that happen to share the output).
"""

from __future__ import annotations

import json
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from embedjob import layout
from embedjob.failures import ConfigError, EmbedjobError
from embedjob.local.scheduler import Shard
from embedjob.spec import Phase, ShardState
from embedjob.store import Store

JOB_PREFIXES = ("index/", "shards/")
JOB_FILES = (layout.STATUS, layout.MANIFEST, layout.MERGED, layout.QUARANTINE)


def previous_status(store: Store) -> dict[str, Any] | None:
    """The earlier run's status.json, or None if there is none or it cannot be read."""
    try:
        doc = json.loads(store.read_bytes(layout.STATUS))
    except (ValueError, EmbedjobError):
        return None
    return doc if isinstance(doc, dict) else None


def plan_restore(shards: list[Shard], previous: dict[str, Any] | None,
                 retry_failed: bool) -> list[Shard]:
    """Carry attempt numbers (part names never collide), failure counts and learned
    overrides over from an earlier run. A Failed job is refused unless ``retry_failed``,
    which gives its failed shards a fresh failure budget."""
    if previous is None:
        return shards
    failed = [e for e in previous.get("manifest", []) if e.get("state") == ShardState.failed]
    if previous.get("phase") == Phase.failed and failed and not retry_failed:
        first = failed[0]
        reason = (first.get("lastFailure") or {}).get("message", "") or previous.get("message", "")
        raise ConfigError(
            f"this job failed earlier ({len(failed)} failed shard(s), first: shard "
            f"{first.get('shard')}: {reason[:200]}): run again with --retry-failed to retry "
            "those shards, or --restart to start over"
        )
    for entry in previous.get("manifest", []):
        k = entry.get("shard")
        if not isinstance(k, int) or not 0 <= k < len(shards):
            continue
        s = shards[k]
        if s.state == ShardState.succeeded:
            continue
        reset = retry_failed and entry.get("state") == ShardState.failed
        failures = {} if reset else {str(a): int(b) for a, b in
                                     (entry.get("failures") or {}).items()}
        s.history = replace(
            s.history, attempts=int(entry.get("attempt", 0)) + 1,
            failures=MappingProxyType(failures),
            max_tokens=entry.get("batchTokens") or s.history.max_tokens,
            precision=entry.get("precision") or s.history.precision,
        )
    return shards


def job_keys(store: Store) -> list[str]:
    """Every key of the job's own layout in the output (what ``--restart`` deletes)."""
    keys = [k for prefix in JOB_PREFIXES for k in store.list(prefix)]
    return keys + [k for k in JOB_FILES if store.exists(k)]


def discard(store: Store) -> str:
    """Delete the job's index, checkpoints and outputs; returns the line to show."""
    keys = job_keys(store)
    if not keys:
        return f"restart: nothing to discard in {store.uri}; starting from scratch"
    shard_dirs = {k.split("/")[1] for k in keys if k.startswith("shards/")}
    for key in keys:
        store.delete(key)
    return (f"restart: deleted {len(keys)} files in {store.uri} (the index, checkpoints and "
            f"outputs of {len(shard_dirs)} shard(s), status and manifest); starting over")

