"""What the operator has read of one job's output: the index summary, and each shard's
progress and heartbeat through the operator-wide poller (:mod:`embedjob.operator.poller`).

The job's loop calls :meth:`StorageReads.refresh` before each pass and hands the results to
the pure reconcile; blocking reads never run on the event loop. Reads use the job's own
identity (:mod:`embedjob.operator.storage_access`); a refusal is returned for the loop to
say once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from embedjob import layout
from embedjob.operator import metrics, pacing, poller
from embedjob.operator.config import OperatorSettings
from embedjob.operator.heartbeats import Observed
from embedjob.operator.observe import ended_attempts, past_index
from embedjob.operator.poller import JobReads
from embedjob.operator.read_process import ReadProcess
from embedjob.operator.storage_access import JobStorage, Reads, StorageRefused, job_storage
from embedjob.operator.views import (
    ROLE_INDEX,
    ROLE_WORKER,
    IndexInfo,
    IndexUnreadable,
    JobView,
    PodView,
    ShardProgress,
    index_info,
)
from embedjob.ranges import range_set

READ_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="embedjob-index")
"""Index summaries (one GET per job); heartbeats and progress go through the poller."""
INDEX_RETRY_SECONDS = 10.0
"""How often an unreadable index summary is read again (reconcile says why it waits)."""
ENDED_READ_SECONDS = 10.0
"""How long a pass waits for the progress of attempts that just ended (read first)."""


class StorageReads:
    """One job's reads: what the next reconcile pass decides from."""

    def __init__(self, uid: str, settings: OperatorSettings) -> None:
        self.uid, self.settings = uid, settings
        self.index: IndexInfo | IndexUnreadable | None = None
        self.progress: dict[int, ShardProgress] = {}
        self.beats: dict[int, Observed] = {}
        self.ended_read: set[str] = set()  # ended attempts whose progress was asked for
        self.done_read: set[int] = set()  # done shards whose final progress was asked for
        self.done_seen: str | None = None  # shardsDone when done_read was last brought up
        self.index_read_at = 0.0
        self.poller = poller.shared(settings, lambda: ReadProcess(settings).start())

    async def refresh(self, job: JobView, pods: list[PodView], wake: asyncio.Event
                      ) -> list[str]:
        """Read what this pass needs; the refusals (one line each) when the operator may
        not read the job's output."""
        refusals = [await self.read_index(job, pods), await self.read_shards(job, pods, wake)]
        return [r for r in refusals if r is not None]

    def forget(self) -> None:
        """Drop everything read so far (a restart, a reset): the next pass reads anew."""
        self.index, self.progress, self.beats = None, {}, {}
        self.ended_read, self.done_read, self.done_seen = set(), set(), None
        self.poller.forget(self.uid)

    def close(self) -> None:
        self.poller.forget(self.uid)

    async def read_index(self, job: JobView, pods: list[PodView]) -> str | None:
        """The index summary once the index step has finished: from the index pod's
        termination message, else one GET (with the job's identity), then cached; an
        unreadable one is read again every INDEX_RETRY_SECONDS, and reconcile says why
        it waits."""
        if isinstance(self.index, IndexInfo) or not past_index(job, pods):
            return None
        if self.index is not None and time.monotonic() - self.index_read_at < INDEX_RETRY_SECONDS:
            return None
        assert job.spec is not None
        self.index_read_at = time.monotonic()
        self.index = next((i for p in pods if p.role == ROLE_INDEX and p.phase == "Succeeded"
                           and (i := index_info(p.termination_message or "")) is not None), None)
        if self.index is not None:
            return None
        where = job_storage(job.namespace, job.name, job.spec, self.settings)
        read = await asyncio.get_running_loop().run_in_executor(
            READ_POOL, read_index_summary, self.poller.stores, self.uid, where)
        if not isinstance(read, StorageRefused):
            self.index = read
            return None
        why = read.message.split(" — ")[0]  # the refusal, said once by the loop, has the rest
        self.index = IndexUnreadable("cannot read the index summary: the index pod reported "
                                     f"none, and {why}")
        return read.message

    async def read_shards(self, job: JobView, pods: list[PodView], wake: asyncio.Event
                          ) -> str | None:
        """Hand the running shards to the poller, wait (briefly) for the progress of
        attempts that just ended, and take the latest reads for this pass. What is O(pods)
        runs off the loop; only the wait is on it."""
        reads, futures = await pacing.off_loop(self.hand_over, job, pods, _waker(wake))
        if futures:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, futures)),
                                       ENDED_READ_SECONDS)
        await pacing.off_loop(self.take, reads, job)
        return reads.refused

    def hand_over(self, job: JobView, pods: list[PodView], wake: Callable[[], object]
                  ) -> tuple[JobReads, list[Future[None]]]:
        """Tell the poller which shards run, and ask it for the progress of attempts that
        ended first: the replacement must start from what an ended attempt committed, not
        from the last round's read. A shard that succeeded is read once too, for its final
        count. Returns the job's reads and the futures of those first reads."""
        assert job.spec is not None
        reads = self.poller.job(self.uid, job.name,
                                job_storage(job.namespace, job.name, job.spec, self.settings),
                                wake)
        running = {p.shard: p.attempt for p in pods
                   if p.role == ROLE_WORKER and p.phase == "Running" and not p.deleting}
        self.poller.track(self.uid, running)
        succeeded = {p.name: p.shard for p in pods
                     if p.role == ROLE_WORKER and p.phase == "Succeeded"}
        ended = {n: s for n, s in (ended_attempts(job, pods) | succeeded).items()
                 if n not in self.ended_read}
        if not ended:
            return reads, []
        self.ended_read |= ended.keys()
        return reads, self.poller.ended(self.uid, {s: _attempt_of(n) for n, s in ended.items()})

    def take(self, reads: JobReads, job: JobView) -> None:
        """The latest reads, for this pass (copies: the readers go on writing)."""
        self.progress, self.beats = reads.snapshot()
        self.read_done(job)

    def read_done(self, job: JobView) -> None:
        """Shards recorded done before this process started have no pod left (retention
        deletes them): their final counts are read once, in the budget, not waited for."""
        if job.status.shards_done == self.done_seen:
            return
        self.done_seen = job.status.shards_done
        missing = range_set(job.status.shards_done) - self.progress.keys() - self.done_read
        if missing:
            self.done_read |= missing
            self.poller.ended(self.uid, dict.fromkeys(missing, -1))


def _waker(event: asyncio.Event) -> Callable[[], object]:
    """A callable for other threads that sets ``event`` on this event loop."""
    loop = asyncio.get_running_loop()
    return lambda: loop.call_soon_threadsafe(event.set)


def _attempt_of(pod_name: str) -> int:
    """Worker pod names end with the attempt (``<job>-<shard>-<attempt>``)."""
    try:
        return int(pod_name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def read_index_summary(
    stores: Reads, uid: str, where: JobStorage
) -> IndexInfo | IndexUnreadable | StorageRefused:
    """The summary; the refusal when the job's identity does not allow a read; else one
    line saying what could not be read, where, and why (read again later)."""
    path = f"{where.uri.rstrip('/')}/{layout.SUMMARY}"
    try:
        data = stores.read(uid, where, layout.SUMMARY)
    except StorageRefused as err:
        metrics.STORAGE_REQUESTS.labels(kind="index", outcome="refused").inc()
        return err
    except Exception as err:  # storage trouble: a condition says so; read again later
        metrics.STORAGE_REQUESTS.labels(kind="index", outcome="error").inc()
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return IndexUnreadable(text if text.startswith("cannot ") else
                               f"cannot read {path}: {text}")
    metrics.STORAGE_REQUESTS.labels(kind="index", outcome="ok").inc()
    info = index_info(data)
    return info if info is not None else IndexUnreadable(
        f"cannot read {path}: not an index summary (JSON with shards and sequences); "
        "something else wrote it: use a fresh output prefix")
