"""Is a worker stuck? Judged from its heartbeat, never from how often it commits.

A worker beats once per forward pass (at most once every few seconds on the store) and,
from a background thread, while it loads the model, resumes or publishes. "Stuck" means the
heartbeat stopped moving for longer than the slowest pass seen so far could explain, so a
slow but moving worker is never replaced. Pure: both runners can call :func:`verdict`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT_STUCK_AFTER = 600.0
"""The floor of the threshold: no heartbeat for this long (or k x the slowest pass) is stuck."""
SLOW_PASS_FACTOR = 5.0
"""A beat may be this many times the slowest forward pass seen late before it is suspicious."""
MISSED_BEATS = 4
"""Beats written at most every ``beat_interval``: allow this many to go missing (slow store)."""
LOAD_ALLOWANCE_SECONDS = 1800.0
"""Loading a model (downloading a 15B checkpoint), resuming or publishing may take this long."""
SLOW_STAGES = frozenset({"starting", "loading", "resuming", "publishing"})
"""Stages the worker spends in one long call; a background thread beats meanwhile."""


def beat_interval(uri: str) -> float:
    """Seconds between heartbeat writes: cheap on a disk, one small PUT per 10 s on S3."""
    return 10.0 if uri.startswith("s3://") else 1.0


@dataclass(frozen=True)
class Beat:
    """What the runner last saw of a worker's heartbeat (times on the runner's clock)."""

    stage: str = "starting"
    seen_at: float = 0.0
    """When the heartbeat last changed (the process start if never)."""
    stage_since: float = 0.0
    """When the worker entered ``stage`` (first seen by the runner)."""
    slowest_pass: float = 0.0
    """Slowest forward pass the worker reported, in seconds."""
    value: int = -1
    """The beat counter last read (-1: none of this attempt yet)."""
    read_at: float = 0.0
    """When the reader last read the heartbeat (0: never). A reader that looks seldom (the
    operator, within its storage budget) judges only as of this read: :func:`judge_read`."""


@dataclass(frozen=True)
class Verdict:
    stuck: bool
    reason: str = ""
    threshold: float = 0.0


def threshold(stuck_after: float, slowest_pass: float, beat_interval: float) -> float:
    """Seconds without a new beat that make a working worker stuck: grows with the pass time."""
    return max(stuck_after, SLOW_PASS_FACTOR * slowest_pass, MISSED_BEATS * beat_interval)


def verdict(
    beat: Beat, now: float, *, stuck_after: float, beat_interval: float,
    load_allowance: float = LOAD_ALLOWANCE_SECONDS,
) -> Verdict:
    """Decide from the last heartbeat whether to replace the worker, with a one-line reason."""
    limit = threshold(stuck_after, beat.slowest_pass, beat_interval)
    if beat.stage in SLOW_STAGES:
        # The background thread keeps beating during a long call; cap the stage itself.
        limit = max(limit, load_allowance)
        in_stage = now - beat.stage_since
        if in_stage > limit:
            return Verdict(True, f"still {beat.stage} after {in_stage:.0f}s "
                                 f"(allowance {limit:.0f}s)", limit)
    idle = now - beat.seen_at
    if idle > limit:
        return Verdict(True, f"no heartbeat for {idle:.0f}s while {beat.stage} "
                             f"(limit {limit:.0f}s)", limit)
    return Verdict(False, "", limit)


def seen(beat: Beat, at: float, *, value: int | None, stage: str | None = None,
         slowest_pass: float | None = None) -> Beat:
    """Fold one read of the heartbeat into what the reader knows, on the reader's clock ``at``
    (``value`` None: no beat of this attempt there yet). The worker's own timestamps are
    never compared with the reader's, so clock skew cannot make a worker look stuck."""
    out = replace(beat, read_at=at)
    if value is not None and value != beat.value:
        out = replace(out, value=value, seen_at=at)
    if stage is not None and stage != beat.stage:
        out = replace(out, stage=stage, stage_since=at)
    if slowest_pass is not None:
        out = replace(out, slowest_pass=slowest_pass)
    return out


def judge_read(
    beat: Beat, now: float, *, stuck_after: float, beat_interval: float, max_age: float,
    load_allowance: float = LOAD_ALLOWANCE_SECONDS,
) -> Verdict:
    """:func:`verdict` as of the last read, for a reader that looks seldom: "stuck" only when
    that read itself came after the threshold elapsed (the reader looked and the beat had not
    moved), and only while that read is at most ``max_age`` old. No read, no verdict."""
    if beat.read_at <= 0 or now - beat.read_at > max_age:
        return Verdict(False, "")
    return verdict(beat, beat.read_at, stuck_after=stuck_after, beat_interval=beat_interval,
                   load_allowance=load_allowance)
