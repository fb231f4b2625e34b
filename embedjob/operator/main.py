"""The kopf operator: thin handlers around :func:`embedjob.operator.reconcile.reconcile`.

One daemon per EmbeddingJob runs its loop (so reconciles of a job never overlap); pod
changes land in our own informer (:mod:`embedjob.operator.informer`: server-side label
selector, paginated list) keyed by the job's uid and only wake that loop.
Start it with ``embedjob operator`` (:mod:`embedjob.operator.entry`); what it has read of
each job's storage is :mod:`embedjob.operator.storage_reads`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import kopf

from embedjob.operator import kube, metrics, pacing, rest, retention
from embedjob.operator.config import OperatorSettings
from embedjob.operator.heartbeats import Observed
from embedjob.operator.incremental import UnitMemo
from embedjob.operator.informer import PodInformer
from embedjob.operator.reconcile import Plan, reconcile, refused
from embedjob.operator.steps import Event
from embedjob.operator.storage_reads import StorageReads
from embedjob.operator.views import (
    JobView,
    PodView,
    ShardProgress,
    job_view,
    pod_view,
    status_view,
)
from embedjob.spec import API_GROUP, API_VERSION, PLURAL
from embedjob.status import shard_state_counts

log = logging.getLogger("embedjob.operator")
LOOPS: dict[str, JobLoop] = {}
PHASES: dict[str, str] = {}
SHARD_STATES: dict[str, dict[str, int]] = {}
WAKE_KEYS: dict[str, tuple[Any, ...]] = {}
LAG_PROBE = pacing.LagProbe(metrics.loop_lag)
API_CONCURRENCY = 16
"""Pod creates/deletes in flight at once for one job (as many as kube.CONNECTIONS)."""
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
    """The event-loop lag probe (metrics)."""
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
    await kube.close()


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
        loop.reads.close()


# --- the per-job loop (the imperative shell around reconcile) -----------------------------


class JobLoop:
    def __init__(self, uid: str, settings: OperatorSettings) -> None:
        self.uid, self.settings = uid, settings
        self.wake = asyncio.Event()
        self.posted: set[str] = set()
        self.patched: dict[str, Any] | None = None
        self.patched_at = 0.0
        self.reads = StorageReads(uid, settings)  # the index, progress and heartbeats
        self.removed: set[str] = set()  # recorded pods this process deleted (retention)
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
        job, pods = await pacing.off_loop(self.observe, raw, index.get(self.uid))
        if job.spec is not None and job.status.phase.value not in ("Succeeded", "Failed"):
            for refusal in await self.reads.refresh(job, pods, self.wake):
                await self.not_read(job, refusal)
        now = datetime.now(timezone.utc)
        plan, creations = await pacing.off_loop(self.decide, job, pods, self.reads.progress,
                                                self.reads.beats, now)
        if plan.forget_reads:  # a restart or a reset: what was read before is stale
            self.reads.forget()
        refusal = await self.apply(job, plan, creations)
        if refusal is not None:  # no retry can fix it: the job fails, saying why
            log.error(json.dumps({"job": job.name, "event": "pod_refused", "error": refusal}))
            plan = refused(job, pods, refusal, now)
            await self.apply(job, plan, [])
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        wait = plan.requeue_after if plan.requeue_after is not None else 3600.0
        wait = min(wait, await self.tidy(raw, pods))
        if self.pending_status is not None:
            wait = min(wait, max(0.0, self.settings.status_interval_seconds - self.since_patch()))
        return max(wait, 0.05)

    pending_status: dict[str, Any] | None = None

    def decide(self, job: JobView, pods: list[PodView], progress: dict[int, ShardProgress],
               beats: dict[int, Observed], now: datetime) -> tuple[Plan, list[Creation]]:
        """One pure pass, off the loop (:func:`pacing.off_loop`): at most ``createChunk``
        pods, the quiet shards' decisions reused from the memo, the pods to create encoded
        (the plan returned has none left). Its CPU time paces the next pass."""
        cpu = time.thread_time()
        plan = reconcile(job, pods, progress, now, self.settings, self.reads.index, beats,
                         memo=self.memo, max_creates=self.settings.create_chunk)
        creations = [creation(m) for m in plan.pods_to_create]
        plan = dataclasses.replace(plan, pods_to_create=[])  # the manifests die here
        if plan.status is not None:  # O(shards): counted here, off the loop
            self.counts = (plan, shard_state_counts(plan.status))
        self.cost = time.thread_time() - cpu
        metrics.RECONCILE_PASS_SECONDS.observe(self.cost)
        return plan, creations

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
        job, doomed, left = await pacing.off_loop(self.retained, raw, pods)

        async def delete(name: str) -> None:
            await kube.delete_pod(job.namespace, name)
            self.removed.add(name)

        _raise_first(await pacing.each(delete, doomed, API_CONCURRENCY))
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

    def observe(self, raw: dict[str, Any], seen: tuple[PodView, ...]
                ) -> tuple[JobView, list[PodView]]:
        """The job as this pass sees it: the body parsed, our own latest status over a lagging
        one, the watched pods plus those created and not yet watched. Off the loop: O(pods)."""
        return self.own_status(job_view(raw)), self.with_expected(list(seen))

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

    async def apply(self, job: JobView, plan: Plan, creations: list[Creation]
                    ) -> str | None:
        """Carry out the plan and its pods to create; the first permanent refusal of a pod
        create, if any."""
        errors = await self.create_pods(job, creations)
        refusals = [str(e) for e in errors if isinstance(e, kube.PodRefused)]
        if len(errors) > len(refusals):
            raise next(e for e in errors if not isinstance(e, kube.PodRefused))

        async def delete(name: str) -> bool:
            return await kube.delete_pod(job.namespace, name)

        _raise_first(await pacing.each(delete, plan.pods_to_delete, API_CONCURRENCY))
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

    async def create_pods(self, job: JobView, creations: list[Creation]) -> list[Exception]:
        """Create pods, API_CONCURRENCY at a time, and expect them until the watch shows them;
        one log line per batch (10^4 lines would cost the event loop more than the creates).
        Returns the errors."""
        if not creations:
            return []

        async def create(pod: Creation) -> bool:
            return await kube.create_pod(job.namespace, pod.name, pod.body)

        results = await pacing.each(create, creations, API_CONCURRENCY)
        now, created = time.monotonic(), Counter[str]()
        names = [c.name for c, r in zip(creations, results, strict=True) if r is True]
        for pod, result in zip(creations, results, strict=True):
            if pod.view is not None and not isinstance(result, Exception):
                self.expected[pod.name] = (now, pod.view)
                created[pod.view.role] += result is True
        for role, count in created.items():
            metrics.PODS_CREATED.labels(role=role).inc(count)
        if names:
            shown = names if len(names) <= 4 else [names[0], "...", names[-1]]
            log.info(json.dumps({"job": job.name, "event": "pods_created", "count": len(names),
                                 "pods": shown}))
        return [r for r in results if isinstance(r, Exception)]

    async def flush(self, job: JobView) -> None:
        new = self.pending_status
        assert new is not None
        old = self.patched
        patch = await pacing.off_loop(lambda: merge_patch(
            old if old is not None else job_status_dict(job), new))
        self.pending_status = None
        if patch:
            await kube.patch_status(job.namespace, job.name, patch)
            self.patched_at = time.monotonic()
        self.patched = new

    async def not_read(self, job: JobView, message: str) -> None:
        """The operator may not read this job's output: say so once (a log line and a
        Warning Event); the job runs on, its progress unknown, no stuck detection."""
        key = f"storage-refused/{self.uid}"
        if key in self.posted:
            return
        self.posted.add(key)
        log.warning(json.dumps({"job": job.name, "event": "storage_not_read", "error": message}))
        await kube.post_event(job, Event("Warning", "StorageNotRead", message[:1000], key))


@dataclasses.dataclass(frozen=True, slots=True)
class Creation:
    """A pod to create, encoded in the pass: its manifest as bytes, which the collector
    never walks. As dicts, a chunk of 1,000 manifests is ~30,000 containers that every
    middle collection walked while the creates lasted (up to 90 ms, stopping the loop)."""

    name: str
    body: bytes
    view: PodView | None  # what the pod is expected to look like until the watch shows it


def creation(manifest: dict[str, Any]) -> Creation:
    return Creation(manifest["metadata"]["name"], rest.encode(manifest), pod_view(manifest))


def _raise_first(results: list[Any]) -> None:
    """As a plain gather would: the first error, once every call has ended."""
    for result in results:
        if isinstance(result, Exception):
            raise result


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
