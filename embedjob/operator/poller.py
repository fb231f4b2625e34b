"""One operator-wide reader of the shards' heartbeats, off the reconcile path.

Each job's loop tells the poller which of its shards run (:meth:`Poller.track`) and which
attempts just ended (:meth:`Poller.ended`); a thread takes requests from the
:class:`~embedjob.operator.read_schedule.ReadSchedule` (the budget, the order) and a pool of
reader threads makes them: per job and round, one LIST of ``heartbeats/`` (1,000 shards a
request, with their ETags), then one GET of each heartbeat whose ETag changed since it was
last read (it carries progress.json's ``done``/``total``/``rate``/``updated`` too);
``progress.json`` for an attempt that ended. An unchanged ETag is a fresh look at a beat that
did not move, without a GET. Results land in the job's :class:`JobReads`, which the job's
reconcile takes a snapshot of; blocking storage calls never run on the event loop. A read
that finds a silent worker wakes its job's loop, so the verdict comes from a fresh read.
Stores are opened with the job's identity (:mod:`embedjob.operator.storage_access`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Literal, TypeVar

from embedjob import layout
from embedjob.failures import StorageError
from embedjob.operator import metrics
from embedjob.operator.config import OperatorSettings
from embedjob.operator.heartbeats import Observed, fold, judge
from embedjob.operator.read_schedule import HEARTBEAT, LISTING, PROGRESS, Read, ReadSchedule
from embedjob.operator.storage_access import JobStorage, Reads, StorageRefused
from embedjob.progress import (
    HeartbeatRecord,
    ShardProgress,
    parse_heartbeat,
    parse_progress,
    progress_of_heartbeat,
)
from embedjob.store import ObjectNotFound

log = logging.getLogger("embedjob.operator.poller")
T = TypeVar("T")
READERS = 8
"""Reads in flight at once (S3 GETs take 10-50 ms: 8 threads carry 160+ reads/s, above the
default budget of 100/s; more threads only fight over the GIL with the event loop)."""


class JobReads:
    """One job's latest reads, shared between the reader threads and the job's loop."""

    def __init__(self, uid: str, name: str, where: JobStorage, wake: Callable[[], None]) -> None:
        self.uid, self.name, self.where, self.wake = uid, name, where, wake
        self.progress: dict[int, ShardProgress] = {}
        self.beats: dict[int, Observed] = {}
        self.running: dict[int, int] = {}  # shard -> attempt, as the job's loop last said
        self.tags: dict[int, str] = {}
        """Each heartbeat's ETag when it was last read (reader threads only)."""
        self.listed: dict[int, str] = {}
        """Each heartbeat's ETag in the last listing (the listing reader only)."""
        self.refused: str | None = None
        """Why nothing of this job is read (said once), None while reads are allowed."""
        self.failing: str | None = None
        self._waiters: dict[int, list[Future[None]]] = {}
        self._lock = threading.Lock()

    def snapshot(self) -> tuple[dict[int, ShardProgress], dict[int, Observed]]:
        with self._lock:
            return dict(self.progress), dict(self.beats)

    def put_progress(self, prog: ShardProgress | None) -> None:
        """Keep the highest committed count seen: a lagging record never lowers it."""
        if prog is None:
            return
        with self._lock:
            old = self.progress.get(prog.shard)
            self.progress[prog.shard] = prog if old is None or prog.done >= old.done else (
                replace(prog, done=old.done))

    def look(self) -> tuple[dict[int, int], dict[int, Observed], dict[int, str]]:
        """Copies of the running shards, their beats and tags, for a listing to compare."""
        with self._lock:
            return dict(self.running), dict(self.beats), dict(self.tags)

    def put_looked(self, before: Mapping[int, Observed], observed: Mapping[int, Observed]
                   ) -> None:
        """Keep what a listing saw, but not over a beat a GET folded in meanwhile (the
        listing was compared with older tags) nor for an attempt no longer running."""
        with self._lock:
            for shard, seen in observed.items():
                if (self.beats.get(shard) is before.get(shard)
                        and self.running.get(shard) == seen.attempt):
                    self.beats[shard] = seen

    def put_read(self, shard: int, attempt: int, record: HeartbeatRecord | None,
                 tag: str | None, at: float) -> Observed:
        """Fold a GET of the heartbeat (``tag``: its ETag, None when it did not exist)."""
        with self._lock:
            observed = fold(self.beats.get(shard), attempt, record, at, self.where.uri)
            if tag is None:
                self.tags.pop(shard, None)
            else:
                self.tags[shard] = tag
            if self.running.get(shard) == attempt:
                self.beats[shard] = observed
            return observed

    def keep_only(self, running: Mapping[int, int]) -> None:
        """Forget heartbeats of shards that no longer run (their progress stays)."""
        with self._lock:
            self.running = dict(running)
            self.beats = {s: o for s, o in self.beats.items() if running.get(s) == o.attempt}

    def waiter(self, shard: int) -> Future[None]:
        future: Future[None] = Future()
        with self._lock:
            self._waiters.setdefault(shard, []).append(future)
        return future

    def settle(self, shard: int) -> None:
        with self._lock:
            waiting = self._waiters.pop(shard, [])
        for future in waiting:
            if not future.done():
                future.set_result(None)


class Poller:
    """The reader: a scheduling thread and :data:`READERS` reader threads."""

    def __init__(self, settings: OperatorSettings, stores: Reads,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.settings, self.stores, self.clock, self.wall = settings, stores, clock, wall
        self.schedule = ReadSchedule(settings.storage_requests_per_minute,
                                     settings.progress_poll_seconds, clock())
        self.jobs: dict[str, JobReads] = {}
        self._lock = threading.Lock()
        self._kick = threading.Event()
        self._free = READERS
        self._pool = ThreadPoolExecutor(READERS, thread_name_prefix="embedjob-storage")
        self._thread = threading.Thread(target=self._run, name="embedjob-poller", daemon=True)
        metrics.STORAGE_BUDGET.set(settings.storage_requests_per_minute)

    def start(self) -> Poller:
        self._thread.start()
        return self

    # --- what the job loops call (from the event loop: nothing here blocks)

    def job(self, uid: str, name: str, where: JobStorage, wake: Callable[[], None]) -> JobReads:
        with self._lock:
            reads = self.jobs.get(uid)
            if reads is None:
                reads = self.jobs[uid] = JobReads(uid, name, where, wake)
            reads.where = where
            return reads

    def track(self, uid: str, running: Mapping[int, int]) -> None:
        """The job's running shards (shard -> attempt) now."""
        with self._lock:
            self.schedule.track(uid, running)
            reads = self.jobs.get(uid)
        if reads is not None:
            reads.keep_only(running)
        self._kick.set()

    def ended(self, uid: str, attempts: Mapping[int, int]) -> list[Future[None]]:
        """Read progress.json of attempts that ended (shard -> attempt) before any other
        read; each future is done once its read finished, whatever the outcome."""
        reads = self.jobs.get(uid)
        if reads is None or not attempts:
            return []
        futures = [reads.waiter(s) for s in attempts]
        with self._lock:
            self.schedule.ended(uid, attempts.items())
        self._kick.set()
        return futures

    def forget(self, uid: str) -> None:
        with self._lock:
            self.schedule.forget(uid)
            self.jobs.pop(uid, None)
        self.stores.forget(uid)

    # --- the scheduling thread

    def _run(self) -> None:
        while True:
            with self._lock:
                now = self.clock()
                reads = self.schedule.take(now, self._free)
                self._free -= len(reads)
                wait = self.schedule.wait(now) if self._free else 1.0
                metrics.set_read_schedule(self.schedule.interval(),
                                          self.schedule.planned_per_minute(),
                                          len(self.schedule.running))
            for read in reads:
                self._pool.submit(self._read, read)
            if not reads:
                self._kick.wait(min(max(wait, 0.01), 1.0))
                self._kick.clear()

    # --- the reader threads

    def _read(self, read: Read) -> None:
        try:
            self._read_one(read)
        except Exception:  # a reader thread must never die silently
            log.exception("unexpected error reading %s of shard %d", read.kind, read.shard)
        finally:
            with self._lock:
                self.schedule.done(read, self.clock())
                self._free += 1
            self._kick.set()
            reads = self.jobs.get(read.job)
            if reads is not None and read.kind == PROGRESS:
                reads.settle(read.shard)

    def _read_one(self, read: Read) -> None:
        reads = self.jobs.get(read.job)
        if reads is None:
            return
        if read.kind == LISTING:
            self._listed(read, reads)
        elif read.kind == HEARTBEAT:
            self._heartbeat(read, reads)
        else:
            prog = self._progress(reads, read.shard)
            if prog is not False:
                reads.put_progress(prog)

    def _listed(self, read: Read, reads: JobReads) -> None:
        """Compare the listing with the tags last read: an unchanged or missing heartbeat is
        a fresh look at a beat that did not move; a changed one is read next."""
        listing = self._ask(reads, LISTING, lambda: self.stores.listing(
            reads.uid, reads.where, layout.HEARTBEATS), count=read.cost)
        if listing is False:
            return  # storage trouble or a refusal: no observation (and so no verdict)
        at = self.wall()
        tags = {shard: tag for key, tag in (listing or {}).items()
                if (shard := layout.heartbeat_shard(key)) is not None}
        running, beats, held = reads.look()
        still: dict[int, Observed] = {}
        changed: list[int] = []
        settled: list[int] = []
        for shard, attempt in running.items():
            tag = tags.get(shard)
            if tag is None or tag == held.get(shard):
                still[shard] = fold(beats.get(shard), attempt, None, at, reads.where.uri)
            elif tag == reads.listed.get(shard):
                settled.append(shard)  # unread, and no longer moving: a verdict waits for it
            else:
                changed.append(shard)
        reads.listed = tags
        reads.put_looked(beats, still)
        if changed or settled:
            with self._lock:
                self.schedule.changed(read.job, changed)
                self.schedule.settled(read.job, settled)
            self._kick.set()
        if any(judge(observed, at, self.settings).stuck for observed in still.values()):
            reads.wake()  # a fresh look found a worker silent: let the job's loop decide now

    def _heartbeat(self, read: Read, reads: JobReads) -> None:
        found = self._ask(reads, HEARTBEAT, lambda: self.stores.read_tagged(
            reads.uid, reads.where, layout.shard_heartbeat(read.shard)))
        if found is False:
            return
        data, tag = found or (b"", None)
        record = parse_heartbeat(data) if data else None
        at = self.wall()
        observed = reads.put_read(read.shard, read.attempt, record, tag, at)
        if record is not None:
            prog = progress_of_heartbeat(read.shard, record)
            if prog is None and record.stage == "embedding":  # a worker that predates it
                prog = self._progress(reads, read.shard) or None
            reads.put_progress(prog)
        if judge(observed, at, self.settings).stuck:
            reads.wake()

    def _progress(self, reads: JobReads, shard: int) -> ShardProgress | Literal[False] | None:
        """The shard's progress.json (None: none yet; False: it could not be read)."""
        data = self._ask(reads, PROGRESS, lambda: self.stores.read(
            reads.uid, reads.where, layout.shard_progress(shard)))
        if data is False:
            return False
        return parse_progress(shard, data) if data else None

    def _ask(self, reads: JobReads, kind: str, call: Callable[[], T], count: int = 1
             ) -> T | Literal[False] | None:
        """What ``call`` returns; None when the object does not exist yet; False on storage
        trouble or when the job's identity does not allow the read. ``count``: requests."""
        try:
            answer = call()
        except StorageRefused as err:
            metrics.STORAGE_REQUESTS.labels(kind=kind, outcome="refused").inc(count)
            reads.refused = err.message  # the job's loop says it, once
            return False
        except ObjectNotFound:
            metrics.STORAGE_REQUESTS.labels(kind=kind, outcome="missing").inc(count)
            reads.refused = None
            return None
        except StorageError as err:
            metrics.STORAGE_REQUESTS.labels(kind=kind, outcome="error").inc(count)
            reads.refused = None
            if reads.failing != err.message:  # each new trouble once, not once per read
                reads.failing = err.message
                log.warning(json.dumps({"job": reads.name, "event": "storage_read_failed",
                                        "error": err.message}))
            return False
        metrics.STORAGE_REQUESTS.labels(kind=kind, outcome="ok").inc(count)
        reads.refused = reads.failing = None
        return answer


_POLLER: Poller | None = None
_POLLER_LOCK = threading.Lock()


def shared(settings: OperatorSettings, stores: Callable[[], Reads]) -> Poller:
    """The operator's one poller, started on first use."""
    global _POLLER
    with _POLLER_LOCK:
        if _POLLER is None:
            _POLLER = Poller(settings, stores()).start()
        return _POLLER
