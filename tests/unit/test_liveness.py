"""Stuck is judged from the heartbeat: a slow but moving worker is never replaced."""

from __future__ import annotations

from embedjob.liveness import LOAD_ALLOWANCE_SECONDS, Beat, threshold, verdict

NOW = 10_000.0


def judged(beat: Beat, now: float = NOW, stuck_after: float = 60.0, interval: float = 1.0):
    return verdict(beat, now, stuck_after=stuck_after, beat_interval=interval)


def test_a_recent_beat_is_alive() -> None:
    assert not judged(Beat("embedding", seen_at=NOW - 10, stage_since=NOW - 500)).stuck


def test_no_beat_past_the_threshold_is_stuck_with_a_reason() -> None:
    v = judged(Beat("embedding", seen_at=NOW - 61, stage_since=NOW - 500))
    assert v.stuck and "no heartbeat for 61s while embedding" in v.reason


def test_the_threshold_grows_with_the_slowest_pass() -> None:
    # A 60,000-residue windowed sequence: passes of 40 s; the floor of 60 s would kill it.
    slow = Beat("embedding", seen_at=NOW - 150, stage_since=NOW - 900, slowest_pass=40.0)
    assert threshold(60.0, 40.0, 1.0) == 200.0
    assert not judged(slow).stuck
    assert judged(Beat("embedding", seen_at=NOW - 201, slowest_pass=40.0)).stuck


def test_a_slow_store_gets_missed_beats_allowed() -> None:
    # Beats go out at most every 30 s on a slow S3: four of them may be late.
    assert not judged(Beat("embedding", seen_at=NOW - 100), stuck_after=10, interval=30).stuck
    assert judged(Beat("embedding", seen_at=NOW - 121), stuck_after=10, interval=30).stuck


def test_model_load_gets_its_allowance_then_is_stuck() -> None:
    loading = Beat("loading", seen_at=NOW - 70, stage_since=NOW - 1000)
    assert not judged(loading).stuck  # 70 s without a beat: fine while loading
    v = judged(Beat("loading", seen_at=NOW, stage_since=NOW - LOAD_ALLOWANCE_SECONDS - 1))
    assert v.stuck and "still loading" in v.reason  # beating, but the load never ends


def test_a_process_that_never_beat_is_judged_from_its_start() -> None:
    started = Beat("starting", seen_at=NOW - 100, stage_since=NOW - 100)
    assert not judged(started).stuck
    assert judged(Beat("starting", seen_at=NOW - LOAD_ALLOWANCE_SECONDS - 5,
                       stage_since=NOW - LOAD_ALLOWANCE_SECONDS - 5)).stuck
