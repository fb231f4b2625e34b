"""The operator's storage reads: the budget and its schedule (pure, a fake clock), the
fresh-read stuck rule, the job-scoped identity's refusals, and the poller on a real store."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest

from embedjob import layout
from embedjob.liveness import Beat, judge_read, seen
from embedjob.operator.config import OperatorSettings, Security
from embedjob.operator.heartbeats import fold, stuck
from embedjob.operator.poller import Poller
from embedjob.operator.read_schedule import HEARTBEAT, LISTING, PROGRESS, ReadSchedule
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


def drain(schedule: ReadSchedule, start: float, seconds: float, step: float = 0.5,
          moving: bool = False) -> list:
    """Run the schedule on a fake clock: every request takes no time. ``moving``: every
    listing finds all the job's heartbeats changed (every worker beating)."""
    reads, t = [], start
    while t < start + seconds:
        for read in schedule.take(t, 10_000):
            reads.append((t, read))
            schedule.done(read, t)
            if moving and read.kind == LISTING:
                schedule.changed(read.job, [s for j, s in schedule.running if j == read.job])
        t += step
    return reads


# --- the budget -----------------------------------------------------------------------------


def test_listing_interval_adapts_to_the_pages_within_half_the_budget() -> None:
    schedule = ReadSchedule(per_minute=12, min_interval=30, now=0)  # 0.2 requests a second
    schedule.track("a", {s: 0 for s in range(100)})
    assert schedule.interval() == 30  # few pages: every progressPollSeconds
    schedule.track("b", {s: 0 for s in range(10_000)})  # 1 + 10 pages, half of 0.2/s
    assert schedule.interval() == pytest.approx(11 / 0.1)
    assert schedule.planned_per_minute() == pytest.approx(12)
    roomy = ReadSchedule(per_minute=6000, min_interval=30, now=0)
    roomy.track("b", {s: 0 for s in range(10_000)})  # 10^4 shards: 10 LISTs per 30 s
    assert roomy.interval() == 30


def test_requests_stay_within_budget_and_every_moving_shard_gets_its_turn() -> None:
    schedule = ReadSchedule(per_minute=600, min_interval=1, now=0)  # 10 requests a second
    schedule.track("big", {s: 0 for s in range(90)})
    schedule.track("small", {s: 0 for s in range(10)})
    reads = drain(schedule, 0, 60, moving=True)
    # 10 a second, plus at most the bucket's one second's worth at once
    for start in range(0, 60, 5):
        window = [t for t, _ in reads if start <= t < start + 10]
        assert len(window) <= 10 * 10 + 10
    assert 590 <= len(reads) <= 610
    listings = [r for _, r in reads if r.kind == LISTING]
    assert 100 <= len(listings) <= 122  # each job about once a second
    shards = Counter((r.job, r.shard) for _, r in reads if r.kind == HEARTBEAT)
    assert len(shards) == 100 and max(shards.values()) - min(shards.values()) <= 1


def test_a_listing_per_interval_and_a_get_only_for_what_changed() -> None:
    schedule = ReadSchedule(per_minute=60_000, min_interval=30, now=0)
    schedule.track("j", {s: 0 for s in range(5)})
    reads = drain(schedule, 0, 100)
    assert [(t, r.kind) for t, r in reads] == [(t, LISTING) for t in (0, 30, 60, 90)]
    schedule.changed("j", [1, 3, 7])  # 7 does not run: nothing to read
    got = schedule.take(100, 10)
    assert [(r.kind, r.shard, r.attempt) for r in got] == [(HEARTBEAT, 1, 0), (HEARTBEAT, 3, 0)]
    schedule.changed("j", [1])  # in flight: not read twice
    assert schedule.take(100, 10) == []


def test_a_heartbeat_that_stopped_changing_is_read_before_the_moving_ones() -> None:
    """A worker that beat and then hung: its last ETag is unread, and no verdict comes
    before that GET — so it does not wait behind every moving shard's."""
    schedule = ReadSchedule(per_minute=60_000, min_interval=30, now=0)
    schedule.track("j", {s: 0 for s in range(5)})
    drain(schedule, 0, 1)
    schedule.changed("j", [1, 2, 3])
    schedule.settled("j", [3, 9])
    assert [r.shard for r in schedule.take(1, 10)] == [3, 1, 2]


def test_a_listing_of_many_pages_costs_as_many_requests() -> None:
    schedule = ReadSchedule(per_minute=600, min_interval=30, now=0)  # 10 a second
    schedule.track("j", {s: 0 for s in range(2_500)})
    [listing] = schedule.take(0, 10)
    assert listing.kind == LISTING and listing.cost == 3
    schedule.done(listing, 0)
    schedule.changed("j", range(20))
    assert len(schedule.take(0, 100)) == 7  # the bucket held 10
    assert schedule.wait(0) == pytest.approx(0.1)


def test_ended_attempts_first_then_listings_then_changed_heartbeats() -> None:
    schedule = ReadSchedule(per_minute=60, min_interval=5, now=0)  # one request a second
    schedule.track("j", {0: 0, 1: 0})
    drain(schedule, 0, 2, step=1)  # listed once
    schedule.changed("j", [1, 0])
    schedule.ended("j", [(5, 3)])
    got = []
    for t in range(10, 15):
        for r in schedule.take(t, 10):
            got.append((r.kind, r.shard))
            schedule.done(r, t)
    assert got == [(PROGRESS, 5), (LISTING, -1), (HEARTBEAT, 1), (HEARTBEAT, 0)]


def test_stopped_shards_are_dropped_and_a_new_attempt_is_read_as_such() -> None:
    schedule = ReadSchedule(per_minute=6000, min_interval=10, now=0)
    schedule.track("j", {0: 0, 1: 0})
    drain(schedule, 0, 1)
    schedule.changed("j", [0, 1])
    schedule.track("j", {1: 1})
    assert schedule.interval() == 10 and set(schedule.running) == {("j", 1)}
    [read] = schedule.take(2, 10)
    assert (read.kind, read.shard, read.attempt) == (HEARTBEAT, 1, 1)
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


class CountingStores(Stores):
    """The real stores, counting each kind of request the poller makes."""

    def __init__(self, settings: OperatorSettings) -> None:
        super().__init__(settings, lambda ns, name: {})
        self.asked: Counter[str] = Counter()

    def read_tagged(self, uid, where, key):  # type: ignore[no-untyped-def]
        self.asked["get"] += 1
        return super().read_tagged(uid, where, key)

    def listing(self, uid, where, prefix):  # type: ignore[no-untyped-def]
        self.asked["list"] += 1
        return super().listing(uid, where, prefix)


def _wait_for(check, seconds: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_unchanged_heartbeat_is_looked_at_by_listings_without_a_get(tmp_path) -> None:
    out = tmp_path / "out"
    store = open_store(str(out))
    record = HeartbeatRecord(attempt=0, stage="embedding", beat=4, interval=0.05)
    store.write_bytes(layout.shard_heartbeat(3), heartbeat_document(record))
    settings = OperatorSettings(progress_poll_seconds=0.1, stuck_after_seconds=1.0)
    stores = CountingStores(settings)
    poller = Poller(settings, stores).start()
    woken = []
    reads = poller.job("uid", "j", job_storage("ns", "j", _spec(str(out)), settings),
                       lambda: woken.append(1))  # type: ignore[arg-type]
    poller.track("uid", {3: 0, 4: 0})  # shard 4 has written no heartbeat yet
    _wait_for(lambda: 3 in reads.snapshot()[1] and stores.asked["list"] >= 4)
    first = reads.snapshot()[1][3]
    assert stores.asked["get"] == 1 and first.beat.value == 4
    assert reads.snapshot()[1][4].beat.value == -1  # looked at: no beat of it yet
    _wait_for(lambda: reads.snapshot()[1][3].beat.read_at > first.beat.read_at)
    assert stores.asked["get"] == 1  # later looks were listings only
    # Silent past the threshold: a listing, no GET, is the fresh read that wakes the loop.
    _wait_for(lambda: bool(woken))
    assert stores.asked["get"] == 1
    assert stuck(_pod(), reads.snapshot()[1][3], datetime.now(tz=timezone.utc),
                 settings) is not None
    # It beats again: the changed ETag gets one GET, and the beat moved.
    store.write_bytes(layout.shard_heartbeat(3), heartbeat_document(
        HeartbeatRecord(attempt=0, stage="embedding", beat=5, interval=0.05)))
    _wait_for(lambda: reads.snapshot()[1][3].beat.value == 5)
    assert stores.asked["get"] == 2
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


def test_jobs_that_share_a_secret_share_one_client() -> None:
    keys = {"s3": {"AWS_ACCESS_KEY_ID": "QUtJQQ==", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"},
            "other": {"AWS_ACCESS_KEY_ID": "QUtJQg==", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}}
    stores = Stores(S, lambda ns, name: keys[name])

    def client(uid: str, secret: str) -> object:
        where = job_storage("ns", uid, _spec(credentialsSecret=secret), S)  # type: ignore[arg-type]
        return stores.get(uid, where).client  # type: ignore[attr-defined]

    first = client("a", "s3")
    assert client("b", "s3") is first and client("c", "other") is not first
    assert len(stores._clients) == 2
    for uid in ("a", "b"):
        stores.forget(uid)
    client("d", "other")  # nobody uses the first identity's client any more: dropped
    assert len(stores._clients) == 1


def test_readers_that_want_a_closed_store_at_once_read_its_secret_once() -> None:
    asked = []

    def read(ns: str, name: str) -> dict[str, str]:
        asked.append(name)
        time.sleep(0.2)  # every reader arrives while the first one reads
        return {"AWS_ACCESS_KEY_ID": "QUtJQQ==", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}

    stores = Stores(S, read)
    where = job_storage("ns", "j", _spec(credentialsSecret="s3"), S)  # type: ignore[arg-type]
    with ThreadPoolExecutor(8) as pool:
        opened = list(pool.map(lambda _: stores.get("uid", where), range(8)))
    assert asked == ["s3"] and all(store is opened[0] for store in opened)


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
