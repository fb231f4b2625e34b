"""The one schema of a shard's progress.json and heartbeat.json.

The worker writes both (:func:`progress_document`, :func:`heartbeat_document`); the operator
and the local runner read them back (:func:`parse_progress`, :func:`parse_heartbeat`).
Readers are lenient: an unreadable record is no record, never an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from embedjob.times import format_time, from_epoch, parse_time


@dataclass(frozen=True, slots=True)
class ShardProgress:
    """A shard's progress.json (written by the worker after each committed part)."""

    shard: int
    attempt: int = 0
    total: int = 0
    done: int = 0
    parts: int = 0
    rate: float = 0.0
    updated: datetime | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def progress_document(
    progress: ShardProgress, *, batch_tokens: int, precision: str, quarantined: int,
    extra: Mapping[str, object],
) -> bytes:
    """progress.json as the worker writes it (``extra``: e.g. GPU memory, last)."""
    updated = format_time(progress.updated) if progress.updated else None
    doc = {
        "shard": progress.shard,
        "attempt": progress.attempt,
        "total": progress.total,
        "done": progress.done,
        "parts": progress.parts,
        "rate": round(progress.rate, 3),
        "batchTokens": batch_tokens,
        "precision": precision,
        "quarantined": quarantined,
        "updated": updated,
        **extra,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_progress(shard: int, data: bytes | str | Mapping[str, Any]) -> ShardProgress | None:
    """Parse progress.json leniently: an unreadable record is no record."""
    try:
        raw = json.loads(data) if isinstance(data, (bytes, str)) else dict(data)
        return ShardProgress(
            shard=shard,
            attempt=int(raw.get("attempt") or 0),
            total=int(raw.get("total") or 0),
            done=int(raw.get("done") or 0),
            parts=_count(raw.get("parts")),
            rate=float(raw.get("rate") or 0.0),
            updated=_updated(raw.get("updated")),
        )
    except (ValueError, TypeError, AttributeError):
        return None


def _count(parts: Any) -> int:
    return len(parts) if isinstance(parts, (list, dict)) else int(parts or 0)


def _updated(value: Any) -> datetime | None:
    if isinstance(value, (int, float)):
        return from_epoch(float(value))
    return parse_time(value)


@dataclass(frozen=True, slots=True)
class HeartbeatRecord:
    """A worker's heartbeat.json: it moves once per forward pass and during long stages."""

    attempt: int
    stage: str = "starting"
    beat: int = 0
    passes: int = 0
    slowest_pass: float = 0.0
    embedded: int = 0
    """Sequences embedded by this attempt (committed or not)."""
    committed_at_start: int = 0
    """The attempt's resume position."""
    rate: float = 0.0
    time: float = 0.0
    done: int | None = None
    """Sequences committed (progress.json's ``done``); None from a worker that predates it."""
    total: int = 0
    updated: float | None = None
    """When the worker last reported progress (epoch, its clock; progress.json's ``updated``)."""
    interval: float | None = None
    """Seconds between the worker's heartbeat writes (EMBEDJOB_HEARTBEAT_SECONDS)."""

    @property
    def in_flight_total(self) -> int:
        """Sequences the attempt holds, committed before it or embedded by it."""
        return self.committed_at_start + self.embedded


def heartbeat_document(record: HeartbeatRecord) -> bytes:
    doc = {
        "attempt": record.attempt, "stage": record.stage, "beat": record.beat,
        "passes": record.passes, "slowestPass": round(record.slowest_pass, 3),
        "embedded": record.embedded, "committedAtStart": record.committed_at_start,
        "rate": round(record.rate, 3), "time": round(record.time, 3),
    }
    if record.done is not None:  # what the operator needs of progress.json: one read a round
        doc |= {"done": record.done, "total": record.total,
                "updated": round(record.updated, 3) if record.updated else None}
    if record.interval is not None:
        doc["interval"] = record.interval
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_heartbeat(data: bytes | str) -> HeartbeatRecord | None:
    """Parse heartbeat.json leniently: an unreadable record is no record."""
    try:
        raw = json.loads(data)
        return HeartbeatRecord(
            attempt=int(raw["attempt"]),
            stage=str(raw.get("stage") or "starting"),
            beat=int(raw.get("beat") or 0),
            passes=int(raw.get("passes") or 0),
            slowest_pass=float(raw.get("slowestPass") or 0.0),
            embedded=int(raw.get("embedded") or 0),
            committed_at_start=int(raw.get("committedAtStart") or 0),
            rate=float(raw.get("rate") or 0.0),
            time=float(raw.get("time") or 0.0),
            done=int(raw["done"]) if raw.get("done") is not None else None,
            total=int(raw.get("total") or 0),
            updated=float(raw["updated"]) if raw.get("updated") else None,
            interval=float(raw["interval"]) if raw.get("interval") else None,
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def progress_of_heartbeat(shard: int, record: HeartbeatRecord) -> ShardProgress | None:
    """The progress.json view a heartbeat carries (None from a worker that predates it)."""
    if record.done is None:
        return None
    return ShardProgress(shard=shard, attempt=record.attempt, total=record.total,
                         done=record.done, rate=record.rate,
                         updated=from_epoch(record.updated) if record.updated else None)
