"""The operator's storage reads: the budget and its schedule (pure, a fake clock), the
fresh-read stuck rule, the job-scoped identity's refusals, and the poller on a real store."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from embedjob import layout
from embedjob.liveness import Beat, judge_read, seen
from embedjob.operator.config import OperatorSettings, Security
from embedjob.operator.heartbeats import fold, stuck
from embedjob.operator.poller import Poller
from embedjob.operator.read_schedule import HEARTBEAT, PROGRESS, ReadSchedule
from embedjob.operator.storage_access import (
    ALLOW_OPERATOR_IDENTITY,
    StorageRefused,
    Stores,
    job_storage,
    open_job_store,
)
from embedjob.operator.views import PodView
from embedjob.progress import HeartbeatRecord, heartbeat_document
from embedjob.spec import parse_spec
from embedjob.store import open_store

S = OperatorSettings()


def drain(schedule: ReadSchedule, start: float, seconds: float, step: float = 0.5) -> list:
    """Run the schedule on a fake clock: every read takes no time."""
    reads, t = [], start
    while t < start + seconds:
        for read in schedule.take(t, 10_000):
            reads.append((t, read))
            schedule.done(read, t)
        t += step
    return reads


# --- the budget -----------------------------------------------------------------------------


def test_interval_adapts_to_running_shards_within_the_budget() -> None:
    schedule = ReadSchedule(per_minute=6000, min_interval=30, now=0)
    schedule.track("a", {s: 0 for s in range(100)})
    assert schedule.interval() == 30  # few shards: every progressPollSeconds
    schedule.track("b", {s: 0 for s in range(10_000)})
    assert schedule.interval() == pytest.approx(10_100 / 100)  # shards / (budget per second)
    assert schedule.planned_per_minute() == pytest.approx(6000)


def test_reads_stay_within_budget_and_every_shard_gets_its_turn() -> None:
    schedule = ReadSchedule(per_minute=600, min_interval=1, now=0)  # 10 reads a second
    schedule.track("big", {s: 0 for s in range(90)})
    schedule.track("small", {s: 0 for s in range(10)})
    reads = drain(schedule, 0, 60)
    # 10 a second, plus at most the bucket's one second's worth at once
    for start in range(0, 60, 5):
        window = [t for t, _ in reads if start <= t < start + 10]
        assert len(window) <= 10 * 10 + 10
    assert 590 <= len(reads) <= 610
    shards = Counter((r.job, r.shard) for _, r in reads)
    assert len(shards) == 100 and max(shards.values()) - min(shards.values()) <= 1


def test_each_shard_read_once_per_interval_when_budget_is_ample() -> None:
    schedule = ReadSchedule(per_minute=60_000, min_interval=30, now=0)
    schedule.track("j", {0: 0, 1: 0})
    reads = drain(schedule, 0, 100)
    times = [t for t, r in reads if r.shard == 0]
    assert times == [0, 30, 60, 90]


def test_ended_attempts_first_then_new_shards_then_least_recently_read() -> None:
    schedule = ReadSchedule(per_minute=60, min_interval=1, now=0)  # one read a second
    schedule.track("j", {0: 0, 1: 0})
    drain(schedule, 0, 2, step=1)  # both read once
    schedule.track("j", {0: 0, 1: 0, 2: 0})
    schedule.ended("j", [(5, 3)])
    order = [schedule.take(t, 10) for t in (10, 11, 12, 13)]
    got = [(r.kind, r.shard) for batch in order for r in batch]
    assert got[:2] == [(PROGRESS, 5), (HEARTBEAT, 2)]
    for batch, t in zip(order, (10, 11, 12, 13), strict=True):
        for r in batch:
            schedule.done(r, t)
    assert got[2:] == [(HEARTBEAT, 0), (HEARTBEAT, 1)]


def test_stopped_shards_are_dropped_and_a_new_attempt_is_read_first() -> None:
    schedule = ReadSchedule(per_minute=6000, min_interval=10, now=0)
    schedule.track("j", {0: 0, 1: 0})
    drain(schedule, 0, 1)
    schedule.track("j", {1: 1})
    assert schedule.interval() == 10 and set(schedule.running) == {("j", 1)}
    [read] = schedule.take(2, 10)
    assert (read.shard, read.attempt) == (1, 1)
    schedule.forget("j")
    assert schedule.take(100, 10) == [] and schedule.running == {}


# --- stuck only from a fresh read, on the operator's clock ----------------------------------


def test_judge_read_needs_a_read_after_the_threshold() -> None:
    beat = seen(Beat(seen_at=0, stage_since=0), 0, value=5, stage="embedding")
    # Read at 100 (beat unchanged): asked at 10,000 s, the read is too old to judge by.
    old = seen(beat, 100, value=5)
    assert not judge_read(old, 10_000, stuck_after=600, beat_interval=10, max_age=60).stuck
    # A read at 700 saw it unchanged since 0: stuck, as of that read.
    late = seen(beat, 700, value=5)
    judged = judge_read(late, 710, stuck_after=600, beat_interval=10, max_age=60)
    assert judged.stuck and "no heartbeat for 700s" in judged.reason
    # The beat moved at the last read: not stuck, however long ago it moved before.
    moved = seen(beat, 700, value=6)
    assert not judge_read(moved, 710, stuck_after=600, beat_interval=10, max_age=60).stuck


def _pod(attempt: int = 0, phase: str = "Running") -> PodView:
    return PodView(name=f"j-0-{attempt}", role="worker", shard=0, attempt=attempt, phase=phase)


def test_slow_but_beating_worker_is_never_stuck_and_skew_does_not_matter() -> None:
    """A pass of 400 s: the threshold grows to 5 x 400 s; the worker's clock is a day off."""
    t0 = 1_700_000_000.0
    skew = 86_400.0
    obs, value = None, 0
    for i in range(20):  # one read every 300 s, the beat moves every 400 s
        at = t0 + 300 * i
        value = int(300 * i // 400)
        record = HeartbeatRecord(attempt=0, stage="embedding", beat=value, slowest_pass=400,
                                 time=at - skew)
        obs = fold(obs, 0, record, at, "s3://b/o/")
        now = datetime.fromtimestamp(at + 1, tz=timezone.utc)
        assert stuck(_pod(), obs, now, S) is None


def test_silent_worker_is_stuck_from_a_fresh_read_only() -> None:
    t0 = 1_700_000_000.0
    record = HeartbeatRecord(attempt=2, stage="embedding", beat=9, slowest_pass=1.0)
    obs = fold(None, 2, record, t0, "s3://b/o/")
    at = t0 + S.stuck_after_seconds + 5
    obs = fold(obs, 2, record, at, "s3://b/o/")
    now = datetime.fromtimestamp(at + 1, tz=timezone.utc)
    got = stuck(_pod(2), obs, now, S)
    assert got is not None and got.type.value == "stuck"
    assert stuck(_pod(1), obs, now, S) is None  # another attempt's pod
    assert stuck(_pod(2, "Pending"), obs, now, S) is None
    later = now + timedelta(hours=1)  # no read since: no verdict
    assert stuck(_pod(2), obs, later, S) is None


def test_a_new_attempt_counts_from_its_first_read_not_the_old_beat() -> None:
    """The old attempt's beat (unchanged for long) says nothing about the new one."""
    t0 = 1_700_000_000.0
    settings = S.model_copy(update={"stuck_after_seconds": 60.0})
    old = HeartbeatRecord(attempt=0, stage="embedding", beat=50)
    obs = fold(None, 0, old, t0, "s3://b/o/")
    obs = fold(obs, 1, old, t0 + 3000, "s3://b/o/")  # attempt 1 started, not beating yet
    obs = fold(obs, 1, old, t0 + 3100, "s3://b/o/")
    assert obs.beat.stage == "starting" and obs.beat.seen_at == t0 + 3000
    # "starting" gets the load allowance (30 min), counted from attempt 1's first read.
    assert stuck(_pod(1), obs, datetime.fromtimestamp(t0 + 3101, tz=timezone.utc),
                 settings) is None
    obs = fold(obs, 1, None, t0 + 3000 + 1801, "s3://b/o/")
    got = stuck(_pod(1), obs, datetime.fromtimestamp(t0 + 4802, tz=timezone.utc), settings)
    assert got is not None and "starting" in got.message


# --- the job's identity ---------------------------------------------------------------------


def _spec(uri: str = "s3://bucket/out/", **storage: str) -> object:
    return parse_spec({"input": {"uri": "s3://bucket/in.fa"}, "output": {"uri": uri},
                       "storage": storage})


def test_irsa_job_is_not_read_with_the_operators_identity_by_default() -> None:
    where = job_storage("ns", "j", _spec(), S)  # type: ignore[arg-type]
    with pytest.raises(StorageRefused, match=r"security\.operatorStorageIdentity"):
        open_job_store(where, S, lambda ns, name: {})
    allowed = S.model_copy(update={"security": Security(
        operator_storage_identity=ALLOW_OPERATOR_IDENTITY)})
    assert open_job_store(where, allowed, lambda ns, name: {}).uri == "s3://bucket/out/"


def test_secret_comes_from_the_jobs_namespace_and_defaults_apply() -> None:
    asked = []
    settings = OperatorSettings.model_validate({"workerDefaults": {"storage": {
        "endpointUrl": "http://minio:9000", "credentialsSecret": "team-s3"}}})
    where = job_storage("team-a", "j", _spec(), settings)  # type: ignore[arg-type]
    assert where.storage.endpoint_url == "http://minio:9000" and where.secret == "team-s3"

    def read(ns: str, name: str) -> dict[str, str]:
        asked.append((ns, name))
        return {"AWS_ACCESS_KEY_ID": "QUtJQQ=="}  # no secret key: refused, named
    with pytest.raises(StorageRefused, match="team-a/team-s3 has no") as err:
        open_job_store(where, settings, read)
    assert asked == [("team-a", "team-s3")] and "QUtJQQ" not in str(err.value)

    def forbidden(ns: str, name: str) -> dict[str, str]:
        raise PermissionError("nope")
    with pytest.raises(StorageRefused, match="cannot read Secret team-a/team-s3"):
        open_job_store(where, settings, forbidden)


# --- the poller on a real store ------------------------------------------------------------


def test_poller_reads_heartbeats_into_the_jobs_map(tmp_path) -> None:
    out = tmp_path / "out"
    store = open_store(str(out))
    record = HeartbeatRecord(attempt=1, stage="embedding", beat=4, done=7, total=20,
                             rate=2.0, updated=time.time())
    store.write_bytes(layout.shard_heartbeat(3), heartbeat_document(record))
    store.write_bytes(layout.shard_progress(5), b'{"attempt":0,"total":9,"done":9}')
    settings = OperatorSettings(progress_poll_seconds=0.2)
    poller = Poller(settings, Stores(settings, lambda ns, name: {})).start()
    woken = []
    reads = poller.job("uid", "j", job_storage("ns", "j", _spec(str(out)), settings),
                       lambda: woken.append(1))  # type: ignore[arg-type]
    poller.track("uid", {3: 1})
    [ended] = poller.ended("uid", {5: 0})
    ended.result(timeout=10)
    deadline = time.monotonic() + 10
    while 3 not in reads.snapshot()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    progress, beats = reads.snapshot()
    assert progress[5].done == 9 and progress[3].done == 7 and progress[3].total == 20
    assert beats[3].attempt == 1 and beats[3].beat.value == 4 and not woken
    poller.forget("uid")


def test_a_secret_that_could_not_be_read_is_looked_at_again_soon() -> None:
    """A missing Secret (or the API away) is retried after 30 s; the settings' refusal of an
    IRSA job stands for 5 min; a store opened with the Secret is kept, not reopened per read."""
    now = [0.0]
    calls = []

    def read(ns: str, name: str) -> dict[str, str]:
        calls.append(now[0])
        if len(calls) == 1:
            raise LookupError("404")
        return {"AWS_ACCESS_KEY_ID": "QUtJQQ==", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}
    stores = Stores(S, read, clock=lambda: now[0])
    where = job_storage("ns", "j", _spec(credentialsSecret="s3"), S)  # type: ignore[arg-type]
    with pytest.raises(StorageRefused, match="cannot read Secret ns/s3"):
        stores.get("uid", where)
    now[0] = 10.0
    with pytest.raises(StorageRefused):
        stores.get("uid", where)
    now[0] = 31.0
    assert stores.get("uid", where).uri == "s3://bucket/out/"
    now[0] = 100.0
    stores.get("uid", where)
    assert calls == [0.0, 31.0]
    irsa = job_storage("ns", "k", _spec(), S)  # type: ignore[arg-type]
    with pytest.raises(StorageRefused) as err:
        stores.get("uid2", irsa)
    assert err.value.lasting


def test_heartbeat_carries_what_the_operator_needs_of_progress() -> None:
    """One GET per shard per round: the heartbeat round-trips progress.json's fields."""
    from embedjob.progress import parse_heartbeat, progress_of_heartbeat

    record = HeartbeatRecord(attempt=2, stage="embedding", beat=9, rate=3.5, time=5.0,
                             done=40, total=90, updated=1_700_000_000.5, interval=10.0)
    back = parse_heartbeat(heartbeat_document(record))
    assert back == record
    prog = progress_of_heartbeat(4, back)
    assert prog is not None and (prog.shard, prog.attempt, prog.done, prog.total) == (4, 2, 40, 90)
    assert prog.updated is not None and prog.updated.timestamp() == 1_700_000_000.5
    old = HeartbeatRecord(attempt=2)  # a worker that predates it: no progress from it
    assert progress_of_heartbeat(4, parse_heartbeat(heartbeat_document(old))) is None
