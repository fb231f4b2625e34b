"""The kopf operator: thin handlers around :func:`embedjob.operator.reconcile.reconcile`.

One daemon per EmbeddingJob runs its loop (so reconciles of a job never overlap); pod
changes land in our own informer (:mod:`embedjob.operator.informer`: server-side label
selector, paginated list) keyed by the job's uid and only wake that loop.
Start it as a module (``embedjob operator`` or ``kopf run -m embedjob.operator.main``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import kopf

from embedjob import layout
from embedjob.operator import kube, metrics, pacing, poller, retention
from embedjob.operator.config import OperatorSettings, load_settings
from embedjob.operator.heartbeats import Observed
from embedjob.operator.incremental import UnitMemo
from embedjob.operator.informer import PodInformer
from embedjob.operator.observe import ended_attempts, past_index
from embedjob.operator.reconcile import Plan, reconcile, refused
from embedjob.operator.steps import Event
from embedjob.operator.storage_access import JobStorage, StorageRefused, Stores, job_storage
from embedjob.operator.views import (
    ROLE_INDEX,
    ROLE_WORKER,
    IndexInfo,
    IndexUnreadable,
    JobView,
    PodView,
    ShardProgress,
    index_info,
    job_view,
    pod_view,
    status_view,
)
from embedjob.ranges import range_set
from embedjob.spec import API_GROUP, API_VERSION, PLURAL
from embedjob.status import shard_state_counts

log = logging.getLogger("embedjob.operator")
LOOPS: dict[str, JobLoop] = {}
PHASES: dict[str, str] = {}
SHARD_STATES: dict[str, dict[str, int]] = {}
READ_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="embedjob-index")
"""Index summaries (one GET per job); heartbeats and progress go through the poller."""
INDEX_RETRY_SECONDS = 10.0
"""How often an unreadable index summary is read again (reconcile says why it waits)."""
ENDED_READ_SECONDS = 10.0
"""How long a pass waits for the progress of attempts that just ended (read first)."""
PASS_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedjob-reconcile")
"""Reconcile passes run here, off the event loop: one thread (the GIL would serialise more),
so jobs' passes queue instead of contending, and the pure code's caches see one caller."""
WAKE_KEYS: dict[str, tuple[Any, ...]] = {}
LAG_PROBE = pacing.LagProbe(metrics.loop_lag)
API_CONCURRENCY = 16
"""Pod creates/deletes in flight at once for one job (matches the client's pool size)."""
API_RETRY_SECONDS = 2.0
EXPECT_SECONDS = 60.0
"""How long a pod we created counts as existing before the watch shows it."""


# --- kopf handlers (thin) -----------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.scanning.disabled = True  # no CRD/namespace watching: see rbac.py
    settings.posting.enabled = False  # our own Events, one per decision
    settings.watching.server_timeout = 300
    kube.kopf_timeouts(settings)  # kopf's own requests get the same limits as ours
    metrics.serve(memo.settings.metrics_port)


@kopf.on.startup()
async def loop_health(**_: Any) -> None:
    """The event-loop lag probe (metrics), and a garbage collector tuned for big passes."""
    pacing.tune_gc()
    LAG_PROBE.start()


PODS: PodInformer | None = None


@kopf.on.startup()
async def start_pods(memo: kopf.Memo, **_: Any) -> None:
    """Our pod informer (kopf sends no labelSelector for an index's labels filter)."""
    global PODS
    PODS = PodInformer(memo.get("namespaces") or [], _wake)
    PODS.start()


@kopf.on.cleanup()
async def stop_pods(**_: Any) -> None:
    if PODS is not None:
        PODS.stop()


def _wake(uids: set[str]) -> None:
    for uid in uids:
        loop = LOOPS.get(uid)
        if loop is not None:
            loop.wake.set()


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
async def job_changed(uid: str, body: kopf.Body, **_: Any) -> None:
    # Not for our own status patches: only what someone else changed wakes the loop.
    wake, WAKE_KEYS[uid] = pacing.wakes(WAKE_KEYS.get(uid), body)
    loop = LOOPS.get(uid)
    if wake and loop is not None:
        loop.wake.set()


@kopf.daemon(API_GROUP, API_VERSION, PLURAL, cancellation_timeout=10.0)
async def job_daemon(
    body: kopf.Body, uid: str, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any
) -> None:
    loop = LOOPS.setdefault(uid, JobLoop(uid, memo.settings))
    assert PODS is not None  # started before any daemon (kopf runs startup handlers first)
    try:
        await PODS.synced()  # no pass before the first list: a missing pod looks vanished
        await loop.run(body, PODS, stopped)
    finally:
        LOOPS.pop(uid, None)
        WAKE_KEYS.pop(uid, None)
        PHASES.pop(uid, None)
        SHARD_STATES.pop(uid, None)
        loop.poller.forget(uid)


# --- the per-job loop (the imperative shell around reconcile) -----------------------------


class JobLoop:
    def __init__(self, uid: str, settings: OperatorSettings) -> None:
        self.uid, self.settings = uid, settings
        self.wake = asyncio.Event()
        self.posted: set[str] = set()
        self.patched: dict[str, Any] | None = None
        self.patched_at = 0.0
        self.progress: dict[int, ShardProgress] = {}
        self.beats: dict[int, Observed] = {}
        self.index: IndexInfo | IndexUnreadable | None = None
        self.ended_read: set[str] = set()  # ended attempts whose progress was read after
        self.poller = poller.shared(settings, lambda: Stores(settings, kube.read_secret_data))
        self.removed: set[str] = set()  # recorded pods this process deleted (retention)
        self.done_read: set[int] = set()  # done shards whose final progress was asked for
        self.index_read_at = 0.0
        self.done_seen: str | None = None  # shardsDone when done_read was last brought up
        # Pods created by this process that the watch may not have shown yet (like the
        # "expectations" of Kubernetes' own controllers): without them a lagging index
        # could make a pod look vanished and be replaced twice.
        self.expected: dict[str, tuple[float, PodView]] = {}
        self.memo = UnitMemo()  # quiet decisions of earlier passes (operator.incremental)
        self.cost = 0.0  # CPU seconds of the last pass: the pause after it scales with it
        self.counts: tuple[Plan, dict[str, int]] | None = None  # shard states of a plan

    async def run(self, body: kopf.Body, index: PodInformer, stopped: Any) -> None:
        while not stopped:
            self.wake.clear()  # before the step: an event during the step wakes the next one
            try:
                timeout = await self.step(body, index)
            except (kube.ApiException, OSError) as err:
                # An API hiccup must not park the job's loop for kopf's daemon backoff.
                text = kube.describe(err) if isinstance(err, kube.ApiException) else str(err)
                log.warning(json.dumps({"job": body.get("metadata", {}).get("name"),
                                        "event": "api_error", "error": text}))
                timeout = API_RETRY_SECONDS
            # Let a burst of pod events land first, and leave the CPU to other jobs.
            await asyncio.sleep(pacing.pass_gap(self.cost))
            deadline = time.monotonic() + timeout
            while not stopped and not self.wake.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(asyncio.TimeoutError, ValueError):
                    await asyncio.wait_for(self.wake.wait(), min(1.0, deadline - time.monotonic()))

    async def step(self, body: kopf.Body, index: PodInformer) -> float:
        started = time.perf_counter()
        # kopf swaps a live body's dict for a new one, never edits it: these stay as read.
        raw = {key: body.get(key) for key in ("metadata", "spec", "status")}
        job = await _off_loop(lambda: self.own_status(job_view(raw)))
        pods = self.with_expected(list(index.get(self.uid)))
        if job.spec is not None and job.status.phase.value not in ("Succeeded", "Failed"):
            await self.read_index(job, pods)
            await self.read_storage(job, pods)
        now = datetime.now(timezone.utc)
        plan = await _off_loop(self.decide, job, pods, dict(self.progress),
                               dict(self.beats), now)
        if plan.forget_reads:  # a restart or a reset: what was read before is stale
            self.forget_reads()
        refusal = await self.apply(job, plan)
        if refusal is not None:  # no retry can fix it: the job fails, saying why
            log.error(json.dumps({"job": job.name, "event": "pod_refused", "error": refusal}))
            plan = refused(job, pods, refusal, now)
            await self.apply(job, plan)
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        wait = plan.requeue_after if plan.requeue_after is not None else 3600.0
        wait = min(wait, await self.tidy(raw, pods))
        if self.pending_status is not None:
            wait = min(wait, max(0.0, self.settings.status_interval_seconds - self.since_patch()))
        return max(wait, 0.05)

    pending_status: dict[str, Any] | None = None

    def decide(self, job: JobView, pods: list[PodView], progress: dict[int, ShardProgress],
               beats: dict[int, Observed], now: datetime) -> Plan:
        """One pure pass, in :data:`PASS_POOL`'s thread: at most ``createChunk`` pods, the
        quiet shards' decisions reused from the memo. Its CPU time paces the next pass."""
        cpu = time.thread_time()
        plan = reconcile(job, pods, progress, now, self.settings, self.index, beats,
                         memo=self.memo, max_creates=self.settings.create_chunk)
        if plan.status is not None:  # O(shards): counted here, off the loop
            self.counts = (plan, shard_state_counts(plan.status))
        self.cost = time.thread_time() - cpu
        metrics.RECONCILE_PASS_SECONDS.observe(self.cost)
        return plan

    def forget_reads(self) -> None:
        """Drop the index, progress and heartbeats read so far; the next pass reads anew."""
        self.index, self.progress, self.beats = None, {}, {}
        self.ended_read, self.done_read, self.done_seen = set(), set(), None
        self.poller.forget(self.uid)

    def retained(self, raw: dict[str, Any], pods: list[PodView]
                 ) -> tuple[JobView, list[str], float | None]:
        """What :meth:`tidy` acts on, from the status as written (parsed off the loop)."""
        job = job_view(raw)
        written = status_view(self.patched) if self.patched is not None else job.status
        doomed = [n for n in retention.recorded_pods(pods, written) if n not in self.removed]
        return job, doomed, retention.ttl_left(job, written, datetime.now(timezone.utc))

    async def tidy(self, raw: dict[str, Any], pods: list[PodView]) -> float:
        """Delete worker pods the written status records, and the job once its
        ttlSecondsAfterFinished is over (:mod:`retention`); seconds until that TTL."""
        job, doomed, left = await _off_loop(self.retained, raw, pods)
        limit = asyncio.Semaphore(API_CONCURRENCY)

        async def delete(name: str) -> None:
            async with limit:
                await kube.delete_pod(job.namespace, name)
            self.removed.add(name)

        await asyncio.gather(*(delete(n) for n in doomed))
        if doomed:
            log.info(json.dumps({"job": job.name, "event": "pods_removed", "count": len(doomed),
                                 "message": "finished worker pods recorded in the status"}))
        if left is not None and left <= 0:
            log.info(json.dumps({"job": job.name, "event": "ttl_expired",
                                 "message": "ttlSecondsAfterFinished is over: deleting the job"}))
            await kube.delete_job(job.namespace, job.name)
            return 3600.0  # the deletion stops this loop
        return left if left is not None else 3600.0

    def since_patch(self) -> float:
        return time.monotonic() - self.patched_at

    def own_status(self, job: JobView) -> JobView:
        """This process is the status' only writer: its latest status beats a lagging body."""
        latest = self.pending_status or self.patched
        if latest is None or job.spec is None:
            return job
        return dataclasses.replace(job, status=status_view(latest))

    def with_expected(self, pods: list[PodView]) -> list[PodView]:
        seen = {p.name for p in pods}
        now = time.monotonic()
        for name, (at, _) in list(self.expected.items()):
            if name in seen or now - at > EXPECT_SECONDS:
                del self.expected[name]
        return pods + [view for _, view in self.expected.values()]

    async def apply(self, job: JobView, plan: Plan) -> str | None:
        """Carry out the plan; the first permanent refusal of a pod create, if any."""
        errors = await self.create_pods(job, plan.pods_to_create)
        refusals = [str(e) for e in errors if isinstance(e, kube.PodRefused)]
        if len(errors) > len(refusals):
            raise next(e for e in errors if not isinstance(e, kube.PodRefused))
        limit = asyncio.Semaphore(API_CONCURRENCY)

        async def delete(name: str) -> None:
            async with limit:
                await kube.delete_pod(job.namespace, name)

        await asyncio.gather(*(delete(n) for n in plan.pods_to_delete))
        for event in plan.events:
            if event.key in self.posted:
                continue
            self.posted.add(event.key)
            _count_decision(event)
            if event.gpu_seconds_lost:
                metrics.PREEMPTED_GPU_SECONDS.inc(event.gpu_seconds_lost)
            log.info(json.dumps({"job": job.name, "event": event.reason,
                                 "message": event.message}))
            await kube.post_event(job, event)
        if plan.status is not None:
            self.pending_status = plan.status
            PHASES[self.uid] = plan.status.get("phase", "Pending")
            counted = self.counts
            SHARD_STATES[self.uid] = counted[1] if counted and counted[0] is plan else (
                shard_state_counts(plan.status))
            metrics.set_job_phases(PHASES)
            metrics.set_shard_states(SHARD_STATES)
        if self.pending_status is not None and (
            plan.status_urgent or self.since_patch() >= self.settings.status_interval_seconds
        ):
            await self.flush(job)
        return refusals[0] if refusals else None

    async def create_pods(self, job: JobView, manifests: list[dict[str, Any]]
                          ) -> list[BaseException]:
        """Create pods, API_CONCURRENCY at a time, and expect them until the watch shows them;
        one log line per batch (10^4 lines would cost the event loop more than the creates).
        Returns the errors."""
        if not manifests:
            return []
        views = await _off_loop(lambda: [pod_view(m) for m in manifests])
        limit = asyncio.Semaphore(API_CONCURRENCY)

        async def create(manifest: dict[str, Any]) -> bool:
            async with limit:
                return await kube.create_pod(job.namespace, manifest)

        results = await asyncio.gather(*map(create, manifests), return_exceptions=True)
        now, created = time.monotonic(), Counter[str]()
        names = [m["metadata"]["name"] for m, r in zip(manifests, results, strict=True)
                 if r is True]
        for view, result in zip(views, results, strict=True):
            if view is not None and not isinstance(result, BaseException):
                self.expected[view.name] = (now, view)
                created[view.role] += result is True
        for role, count in created.items():
            metrics.PODS_CREATED.labels(role=role).inc(count)
        if names:
            shown = names if len(names) <= 4 else [names[0], "...", names[-1]]
            log.info(json.dumps({"job": job.name, "event": "pods_created", "count": len(names),
                                 "pods": shown}))
        return [r for r in results if isinstance(r, BaseException)]

    async def flush(self, job: JobView) -> None:
        new = self.pending_status
        assert new is not None
        old = self.patched
        patch = await _off_loop(lambda: merge_patch(
            old if old is not None else job_status_dict(job), new))
        self.pending_status = None
        if patch:
            await kube.patch_status(job.namespace, job.name, patch)
            self.patched_at = time.monotonic()
        self.patched = new

    async def read_index(self, job: JobView, pods: list[PodView]) -> None:
        """The index summary once the index step has finished: from the index pod's
        termination message, else one GET (with the job's identity), then cached; an
        unreadable one is read again next pass, and reconcile says why it waits."""
        if isinstance(self.index, IndexInfo) or not past_index(job, pods):
            return
        if self.index is not None and time.monotonic() - self.index_read_at < INDEX_RETRY_SECONDS:
            return  # unreadable a moment ago: not one GET per pass while it stays so
        assert job.spec is not None
        self.index_read_at = time.monotonic()
        self.index = next((i for p in pods if p.role == ROLE_INDEX and p.phase == "Succeeded"
                           and (i := index_info(p.termination_message or "")) is not None), None)
        if self.index is not None:
            return
        where = job_storage(job.namespace, job.name, job.spec, self.settings)
        loop = asyncio.get_running_loop()
        read = await loop.run_in_executor(READ_POOL, _read_index, self.poller.stores, self.uid,
                                          where)
        if isinstance(read, StorageRefused):  # and the index pod did not say it either
            await self.not_read(job, read.message)
            why = read.message.split(" — ")[0]  # the Event above has the rest
            read = IndexUnreadable(f"cannot read the index summary: the index pod reported "
                                   f"none, and {why}")
        self.index = read

    async def read_storage(self, job: JobView, pods: list[PodView]) -> None:
        """Hand the running shards to the poller, wait (briefly) for the progress of
        attempts that just ended, and take the latest reads for this pass."""
        assert job.spec is not None
        wake = _waker(self.wake)
        reads = self.poller.job(self.uid, job.name,
                                job_storage(job.namespace, job.name, job.spec, self.settings),
                                wake)
        running = {p.shard: p.attempt for p in pods
                   if p.role == ROLE_WORKER and p.phase == "Running" and not p.deleting}
        self.poller.track(self.uid, running)
        # The replacement must start from what an ended attempt committed, not from the
        # last round's read: those reads go first, and this pass waits for them. A shard that
        # succeeded is read once too, for its final count.
        succeeded = {p.name: p.shard for p in pods
                     if p.role == ROLE_WORKER and p.phase == "Succeeded"}
        ended = {n: s for n, s in (ended_attempts(job, pods) | succeeded).items()
                 if n not in self.ended_read}
        if ended:
            self.ended_read |= ended.keys()
            attempts = {s: _attempt_of(n) for n, s in ended.items()}
            futures = self.poller.ended(self.uid, attempts)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, futures)),
                                       ENDED_READ_SECONDS)
        self.progress, self.beats = reads.snapshot()
        self.read_done(job)
        if reads.refused is not None:
            await self.not_read(job, reads.refused)

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

    async def not_read(self, job: JobView, message: str) -> None:
        """The operator may not read this job's output: say so once (a log line and a
        Warning Event); the job runs on, its progress unknown, no stuck detection."""
        key = f"storage-refused/{self.uid}"
        if key in self.posted:
            return
        self.posted.add(key)
        log.warning(json.dumps({"job": job.name, "event": "storage_not_read", "error": message}))
        await kube.post_event(job, Event("Warning", "StorageNotRead", message[:1000], key))


def _waker(event: asyncio.Event) -> Any:
    """A callable for other threads that sets ``event`` on this event loop."""
    loop = asyncio.get_running_loop()
    return lambda: loop.call_soon_threadsafe(event.set)


async def _off_loop(func: Any, *args: Any) -> Any:
    """Run pure, CPU-bound work (parsing a 10^4-shard status, a reconcile pass, a status
    diff) in :data:`PASS_POOL`, so the event loop keeps serving watches and /healthz."""
    return await asyncio.get_running_loop().run_in_executor(PASS_POOL, func, *args)


def _attempt_of(pod_name: str) -> int:
    """Worker pod names end with the attempt (``<job>-<shard>-<attempt>``)."""
    try:
        return int(pod_name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _read_index(
    stores: Stores, uid: str, where: JobStorage
) -> IndexInfo | IndexUnreadable | StorageRefused:
    """The summary; the refusal when the job's identity does not allow a read; else one
    line saying what could not be read, where, and why (read again next pass)."""
    try:
        store = stores.get(uid, where)
    except StorageRefused as err:
        metrics.STORAGE_REQUESTS.labels(kind="index", outcome="refused").inc()
        return err
    path = f"{store.uri.rstrip('/')}/{layout.SUMMARY}"
    try:
        data = store.read_bytes(layout.SUMMARY)
    except Exception as err:  # storage trouble: a condition says so; read again next pass
        metrics.STORAGE_REQUESTS.labels(kind="index", outcome="error").inc()
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return IndexUnreadable(text if text.startswith("cannot ") else
                               f"cannot read {path}: {text}")
    metrics.STORAGE_REQUESTS.labels(kind="index", outcome="ok").inc()
    info = index_info(data)
    return info if info is not None else IndexUnreadable(
        f"cannot read {path}: not an index summary (JSON with shards and sequences); "
        "something else wrote it: use a fresh output prefix")


def _count_decision(event: Event) -> None:
    """Metrics read the failure type from the decision, never from the Event's words."""
    if event.failure_type is None:
        return
    if event.reason == "ShardFailed":
        metrics.FAILED_SHARDS.labels(failure_type=event.failure_type.value).inc()
    elif event.reason.startswith("Retry"):
        metrics.RETRIES.labels(failure_type=event.failure_type.value).inc()


def job_status_dict(job: JobView) -> dict[str, Any]:
    return job.status.model_dump(mode="json", by_alias=True, exclude_none=True)


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 diff: changed keys, nested dicts recursively, null for removed keys."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


# --- entry point ---------------------------------------------------------------------------


def run_operator(namespaces: list[str] | None, config_path: str | None) -> int:
    """Run the operator until interrupted; cluster-wide unless namespaces are given."""
    settings = load_settings(config_path)
    _json_logs()
    names = list(namespaces or settings.namespaces)
    port = settings.liveness_port
    liveness = f"http://0.0.0.0:{port}/healthz" if port else None
    kube.connect()
    kopf.run(
        standalone=True,
        clusterwide=not names,
        namespaces=names,
        liveness_endpoint=liveness,
        memo=kopf.Memo(settings=settings, namespaces=names),
    )
    return 0


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"time": self.formatTime(record), "level": record.levelname,
                "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            data["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(data)


def _json_logs() -> None:
    handler = logging.StreamHandler(sys.stderr)
    if not sys.stderr.isatty():
        handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
