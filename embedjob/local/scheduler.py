"""The local runner's bookkeeping: its shards as records, on the shared lifecycle core.

What an ended attempt means is :func:`embedjob.attempts.settle`'s (the operator's too), and
the status document is :func:`embedjob.status.job_status`'s; here is only what is the local
runner's own: which shard starts next, and its shard records (which the runner owns and
updates in place: :func:`start` and :func:`record` are the only writers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from embedjob.attempts import Ended, Settled, settle
from embedjob.failures import Failure
from embedjob.policy import ShardHistory
from embedjob.spec import (
    EmbeddingJobSpec,
    EmbeddingJobStatus,
    LastFailure,
    Phase,
    Progress,
    ShardEntry,
    ShardState,
)
from embedjob.status import Count, Outline, attempt_name, job_progress, job_status, shard_entry
from embedjob.times import from_epoch


class Outcome(str, Enum):
    succeeded = "succeeded"
    retry = "retry"
    failed = "failed"


@dataclass
class Shard:
    index: int
    total: int = 0
    done: int = 0
    rate: float = 0.0
    state: ShardState = ShardState.pending
    history: ShardHistory = field(default_factory=ShardHistory)
    not_before: float = 0.0
    last_failure: LastFailure | None = None
    reason: str = ""
    in_flight: int = 0
    """Embedded by the running attempt but not committed yet (from its heartbeat)."""
    stage: str = ""
    """The running attempt's stage: starting, loading, resuming, embedding, publishing."""
    resumed_at: int = 0
    """Sequences already committed when the running attempt started (its resume position)."""

    @property
    def attempt(self) -> int:
        return max(self.history.attempts - 1, 0)


def ready(shards: list[Shard], now: float, free_slots: int) -> list[Shard]:
    """Shards to start now, lowest index first."""
    waiting = [
        s for s in shards
        if s.state in (ShardState.pending, ShardState.backoff) and s.not_before <= now
    ]
    return waiting[: max(free_slots, 0)]


def start(shard: Shard) -> int:
    """Mark a shard running; returns the attempt number to give the worker."""
    attempt = shard.history.attempts
    shard.history = replace(shard.history, attempts=attempt + 1)
    shard.state = ShardState.running
    return attempt


def record(spec: EmbeddingJobSpec, shard: Shard, ended: Ended, now: float) -> Settled:
    """Settle an ended attempt (the shared core) and write the answer into the shard."""
    settled = settle(spec, shard.history, ended, from_epoch(now))
    if settled.state == ShardState.succeeded:
        shard.state, shard.done = ShardState.succeeded, shard.total
        return settled
    shard.history, shard.reason, shard.state = settled.history, settled.reason, settled.state
    shard.last_failure = settled.last_failure
    shard.not_before = settled.not_before.timestamp() if settled.not_before else now
    return settled


def finish(spec: EmbeddingJobSpec, shard: Shard, failure: Failure | None,
           made_progress: bool, now: float) -> tuple[Outcome, str]:
    """:func:`record` for a failure already classified (``None``: exit 0)."""
    ended = Ended(shard.attempt, failure, from_epoch(now), committed=int(made_progress))
    settled = record(spec, shard, ended, now)
    return _OUTCOMES[settled.state], settled.reason


_OUTCOMES = {ShardState.succeeded: Outcome.succeeded, ShardState.failed: Outcome.failed,
             ShardState.pending: Outcome.retry, ShardState.backoff: Outcome.retry}


def progress_of(shards: Sequence[Shard]) -> Progress:
    return job_progress(
        Count(done=s.done, total=s.total, in_flight=s.in_flight,
              rate=s.rate if s.state == ShardState.running else 0.0)
        for s in shards
    )


def entry_of(job: str, shard: Shard) -> ShardEntry | None:
    """The shard's status entry, as the operator writes it for the same events: a retry
    due now names the attempt about to start (the operator has created its pod)."""
    if shard.state == ShardState.succeeded:
        return None
    started = shard.history.attempts
    if shard.state == ShardState.pending and not started:
        return None  # not started yet: no entry (the operator has none before its pod)
    attempt = started if shard.state == ShardState.pending else max(started - 1, 0)
    entry = shard_entry(None, shard.index, shard.state, attempt=attempt,
                        name=attempt_name(job, "worker", shard.index, attempt) if started
                        else None, history=shard.history, done=shard.done, total=shard.total,
                        last_failure=shard.last_failure)
    if shard.state == ShardState.backoff:
        return entry.model_copy(update={"not_before": _rfc3339(shard.not_before)})
    return entry


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def status_of(shards: list[Shard], phase: Phase, message: str = "", *, job: str = "",
              old: EmbeddingJobStatus | None = None,
              now: float | None = None) -> EmbeddingJobStatus:
    """The EmbeddingJob status the operator would report for the same state."""
    entries = tuple(e for e in (entry_of(job, s) for s in shards) if e is not None)
    outline = Outline(
        phase=phase, message=message, shard_count=len(shards),
        done=frozenset(s.index for s in shards if s.state == ShardState.succeeded),
        failed=frozenset(s.index for s in shards if s.state == ShardState.failed),
        entries=entries, progress=progress_of(shards),
    )
    when = from_epoch(now if now is not None else time.time())
    return job_status(outline, old or EmbeddingJobStatus(), when)
