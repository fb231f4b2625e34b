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
from embedjob.spec import EmbeddingJobStatus, Phase, ShardState
from embedjob.status import expand_manifest, history_from_entry
from embedjob.store import Store

JOB_PREFIXES = ("index/", "shards/", layout.HEARTBEATS)
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
    status = _status(previous)
    if status is None:
        return shards
    entries = expand_manifest(status, lambda shard, attempt: "")
    failed = sorted((e for e in entries.values() if e.state == ShardState.failed),
                    key=lambda e: e.shard)
    if status.phase == Phase.failed and failed and not retry_failed:
        first = failed[0]
        reason = (first.last_failure.message if first.last_failure else "") or status.message
        raise ConfigError(
            f"this job failed earlier ({len(failed)} failed shard(s), first: shard "
            f"{first.shard}: {reason[:200]}): run again with --retry-failed to retry "
            "those shards, or --restart to start over"
        )
    for k, entry in entries.items():
        if 0 <= k < len(shards) and shards[k].state != ShardState.succeeded:
            history = history_from_entry(entry)
            if retry_failed and entry.state == ShardState.failed:
                history = replace(history, failures=MappingProxyType({}))
            shards[k].history = history
    return shards


def _status(previous: dict[str, Any] | None) -> EmbeddingJobStatus | None:
    """The earlier status, leniently: one this version cannot read is no status."""
    if previous is None:
        return None
    manifest = [_entry(e) for e in previous.get("manifest") or [] if isinstance(e, dict)]
    try:
        return EmbeddingJobStatus.model_validate({**previous, "manifest": manifest})
    except ValueError:
        return None


def _entry(raw: dict[str, Any]) -> dict[str, Any]:
    """An entry written before failures carried their time still tells its story."""
    last = raw.get("lastFailure")
    return {**raw, "lastFailure": {"time": "", **last}} if isinstance(last, dict) else raw


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

