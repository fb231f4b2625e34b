"""The local runner's bookkeeping, as plain data and pure functions.

The process handling lives in :mod:`embedjob.local.runner`; here are the decisions: which
shard starts next, what a finished attempt means, and the status document.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from enum import Enum

from embedjob.failures import Failure
from embedjob.policy import ShardHistory, decide
from embedjob.ranges import format_ranges
from embedjob.spec import (
    Condition,
    EmbeddingJobSpec,
    EmbeddingJobStatus,
    LastFailure,
    Phase,
    Progress,
    ShardEntry,
    ShardState,
)


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


def finish(spec: EmbeddingJobSpec, shard: Shard, failure: Failure | None,
           made_progress: bool, now: float) -> tuple[Outcome, str]:
    """Apply the policy to a finished attempt (``failure`` None: exit 0)."""
    if failure is None:
        shard.state, shard.done = ShardState.succeeded, shard.total
        return Outcome.succeeded, "shard complete"
    shard.last_failure = LastFailure(
        type=failure.type.value, message=failure.message[:300],
        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
    )
    decision = decide(spec, shard.history, failure, made_progress)
    shard.history, shard.reason = decision.history, decision.reason
    if not decision.retry:
        shard.state = ShardState.failed
        return Outcome.failed, decision.reason
    shard.state = ShardState.backoff if decision.delay_seconds > 0 else ShardState.pending
    shard.not_before = now + decision.delay_seconds
    return Outcome.retry, decision.reason


def _eta(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def progress_of(shards: list[Shard]) -> Progress:
    total = sum(s.total for s in shards)
    done = sum(s.done for s in shards)
    rate = sum(s.rate for s in shards if s.state == ShardState.running)
    left = max(0, total - done - sum(s.in_flight for s in shards))
    eta = left / rate if rate > 0 else None
    return Progress(
        done=done, total=total, percent=round(100.0 * done / total, 2) if total else 0.0,
        rate=round(rate, 2), eta_seconds=round(eta, 1) if eta is not None else None, eta=_eta(eta),
    )


def status_of(shards: list[Shard], phase: Phase, message: str = "") -> EmbeddingJobStatus:
    """The EmbeddingJob status the operator would report for the same state."""
    done = [s.index for s in shards if s.state == ShardState.succeeded]
    failed = [s.index for s in shards if s.state == ShardState.failed]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    finished = phase in (Phase.succeeded, Phase.failed)
    conditions = [
        Condition(type="Complete", status="True" if phase == Phase.succeeded else "False",
                  reason=phase.value, message=message, last_transition_time=now),
        Condition(type="Failed", status="True" if phase == Phase.failed else "False",
                  reason=phase.value, message=message if phase == Phase.failed else "",
                  last_transition_time=now),
    ]
    return EmbeddingJobStatus(
        phase=phase,
        conditions=conditions if finished else [],
        progress=progress_of(shards),
        shards_ready=f"{len(done)}/{len(shards)}",
        shards_done=format_ranges(done),
        shards_failed=format_ranges(failed),
        shard_count=len(shards),
        manifest=[
            ShardEntry(
                shard=s.index, state=s.state, attempt=s.attempt, done=s.done, total=s.total,
                batch_tokens=s.history.max_tokens, precision=s.history.precision,
                failures=dict(s.history.failures), last_failure=s.last_failure,
                quarantined=len(s.history.quarantined),
            )
            for s in shards
            if s.state != ShardState.succeeded
        ],
        message=message,
    )
