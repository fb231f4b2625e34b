"""What the operator knows of each worker attempt's heartbeat, and "stuck" from it. Pure.

The poller (the shell) reads ``heartbeat.json`` within a storage budget and folds each read
into an :class:`Observed` with :func:`fold`; reconcile's World carries them, and
:func:`stuck` judges a running worker with the shared rule (:func:`embedjob.liveness.verdict`,
the local runner's too) *as of the last read*: "stuck" only when that read came after the
threshold elapsed and is recent (:func:`embedjob.liveness.judge_read`). All times are on the
operator's clock (epoch seconds) — when it saw the beat change, never the worker's own stamps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from embedjob.failures import Failure, FailureType
from embedjob.liveness import Beat, Verdict, beat_interval, judge_read, seen
from embedjob.operator.config import OperatorSettings
from embedjob.operator.views import PodView
from embedjob.progress import HeartbeatRecord

FRESH_MIN_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Observed:
    """One attempt's heartbeat as the operator has read it."""

    attempt: int
    beat: Beat
    interval: float
    """The worker's heartbeat write interval (from its record, else the store's default)."""


def fold(prev: Observed | None, attempt: int, record: HeartbeatRecord | None, at: float,
         uri: str) -> Observed:
    """Fold one read made at ``at`` for ``attempt``: a new attempt starts from its first read
    (never from the pod's start on another clock); a record of another attempt, or none, is
    "no beat of this attempt yet"."""
    if prev is None or prev.attempt != attempt:
        prev = Observed(attempt, Beat(seen_at=at, stage_since=at), beat_interval(uri))
    if record is None or record.attempt != attempt:
        return replace(prev, beat=seen(prev.beat, at, value=None))
    beat = seen(prev.beat, at, value=record.beat, stage=record.stage,
                slowest_pass=record.slowest_pass)
    return Observed(attempt, beat, record.interval or prev.interval)


def fresh_seconds(settings: OperatorSettings) -> float:
    """How old the last read may be for a verdict: the job's loop looks at least every
    progressPollSeconds, and the poller wakes it when a read finds a silent worker."""
    return max(2 * settings.progress_poll_seconds, FRESH_MIN_SECONDS)


def judge(observed: Observed, now: float, settings: OperatorSettings) -> Verdict:
    """The shared rule, floor ``stuckAfterSeconds``, as of the last read."""
    return judge_read(observed.beat, now, stuck_after=settings.stuck_after_seconds,
                      beat_interval=observed.interval, max_age=fresh_seconds(settings))


def stuck(pod: PodView, observed: Observed | None, now: datetime,
          settings: OperatorSettings) -> Failure | None:
    """A running worker whose heartbeat stopped, seen so by a recent read; else None (also
    when its heartbeat has not been read recently: no read, no verdict)."""
    if pod.phase != "Running" or pod.deleting or observed is None:
        return None
    if observed.attempt != pod.attempt:
        return None
    verdict = judge(observed, now.timestamp(), settings)
    if not verdict.stuck:
        return None
    return Failure(FailureType.stuck, verdict.reason, node=pod.node)
