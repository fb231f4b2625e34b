"""The kopf operator: thin handlers around :func:`embedjob.operator.reconcile.reconcile`.

One daemon per EmbeddingJob runs its loop (so reconciles of a job never overlap); pod
changes land in a kopf index keyed by the job's uid and only wake that loop.
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
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import kopf

from embedjob import layout
from embedjob.operator import kube, metrics
from embedjob.operator.config import OperatorSettings, load_settings
from embedjob.operator.observe import ended_attempts, past_index
from embedjob.operator.reconcile import Plan, reconcile, refused
from embedjob.operator.steps import Event
from embedjob.operator.views import (
    LABEL_JOB_UID,
    ROLE_WORKER,
    IndexInfo,
    JobView,
    PodView,
    ShardProgress,
    index_info,
    job_view,
    pod_view,
    progress_view,
    status_view,
)
from embedjob.ranges import range_set
from embedjob.spec import API_GROUP, API_VERSION, PLURAL
from embedjob.status import shard_state_counts

log = logging.getLogger("embedjob.operator")
LOOPS: dict[str, JobLoop] = {}
PHASES: dict[str, str] = {}
SHARD_STATES: dict[str, dict[str, int]] = {}
READ_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="embedjob-progress")
API_CONCURRENCY = 16
"""Pod creates/deletes in flight at once for one job (matches the client's pool size)."""
API_RETRY_SECONDS = 2.0
DEBOUNCE_SECONDS = 0.05
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


@kopf.index("pods", labels={LABEL_JOB_UID: kopf.PRESENT})
async def pods_by_job(body: kopf.Body, labels: Mapping[str, str], **_: Any) -> dict[str, PodView]:
    view = pod_view(body)
    uid = labels[LABEL_JOB_UID]
    loop = LOOPS.get(uid)
    if loop is not None:
        loop.wake.set()
    return {uid: view} if view is not None else {}


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def job_changed(uid: str, **_: Any) -> None:
    loop = LOOPS.get(uid)
    if loop is not None:
        loop.wake.set()


@kopf.daemon(API_GROUP, API_VERSION, PLURAL, cancellation_timeout=10.0)
async def job_daemon(
    body: kopf.Body, uid: str, stopped: kopf.DaemonStopped, pods_by_job: kopf.Index,
    memo: kopf.Memo, **_: Any
) -> None:
    loop = LOOPS.setdefault(uid, JobLoop(uid, memo.settings))
    try:
        await loop.run(body, pods_by_job, stopped)
    finally:
        LOOPS.pop(uid, None)
        PHASES.pop(uid, None)
        SHARD_STATES.pop(uid, None)


# --- the per-job loop (the imperative shell around reconcile) -----------------------------


class JobLoop:
    def __init__(self, uid: str, settings: OperatorSettings) -> None:
        self.uid, self.settings = uid, settings
        self.wake = asyncio.Event()
        self.posted: set[str] = set()
        self.patched: dict[str, Any] | None = None
        self.patched_at = 0.0
        self.progress: dict[int, ShardProgress] = {}
        self.progress_at = 0.0
        self.index: IndexInfo | None = None
        self.finished_cache: set[int] = set()
        self.ended_read: set[str] = set()  # ended attempts whose progress was read after
        # Pods created by this process that the watch may not have shown yet (like the
        # "expectations" of Kubernetes' own controllers): without them a lagging index
        # could make a pod look vanished and be replaced twice.
        self.expected: dict[str, tuple[float, PodView]] = {}

    async def run(self, body: kopf.Body, index: kopf.Index, stopped: Any) -> None:
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
            await asyncio.sleep(DEBOUNCE_SECONDS)  # let a burst of pod events land first
            deadline = time.monotonic() + timeout
            while not stopped and not self.wake.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(asyncio.TimeoutError, ValueError):
                    await asyncio.wait_for(self.wake.wait(), min(1.0, deadline - time.monotonic()))

    async def step(self, body: kopf.Body, index: kopf.Index) -> float:
        started = time.perf_counter()
        job = self.own_status(job_view(body))
        pods = self.with_expected([p for p in index.get(self.uid, ()) if p is not None])
        if job.spec is not None and job.status.phase.value not in ("Succeeded", "Failed"):
            await self.read_index(job, pods)
            await self.read_progress(job, pods)
            await self.read_ended(job, pods)
        now = datetime.now(timezone.utc)
        plan = reconcile(job, pods, self.progress, now, self.settings, self.index)
        if plan.forget_reads:  # a restart: the earlier run's index and progress are stale
            self.index, self.progress, self.finished_cache = None, {}, set()
        refusal = await self.apply(job, plan)
        if refusal is not None:  # no retry can fix it: the job fails, saying why
            log.error(json.dumps({"job": job.name, "event": "pod_refused", "error": refusal}))
            plan = refused(job, pods, refusal, now)
            await self.apply(job, plan)
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        wait = plan.requeue_after if plan.requeue_after is not None else 3600.0
        if self.pending_status is not None:
            wait = min(wait, max(0.0, self.settings.status_interval_seconds - self.since_patch()))
        return max(wait, 0.05)

    pending_status: dict[str, Any] | None = None

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
        limit = asyncio.Semaphore(API_CONCURRENCY)

        async def create(manifest: dict[str, Any]) -> None:
            async with limit:
                created = await kube.create_pod(job.namespace, manifest)
            name = manifest["metadata"]["name"]
            view = pod_view(manifest)
            if view is not None:
                self.expected[name] = (time.monotonic(), view)
            if created:
                role = manifest["metadata"]["labels"].get("embedjob.io/role", "?")
                metrics.PODS_CREATED.labels(role=role).inc()
                log.info(json.dumps({"job": job.name, "event": "pod_created", "pod": name}))

        async def delete(name: str) -> None:
            async with limit:
                await kube.delete_pod(job.namespace, name)

        results = await asyncio.gather(*(create(m) for m in plan.pods_to_create),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        refusals = [str(e) for e in errors if isinstance(e, kube.PodRefused)]
        if len(errors) > len(refusals):
            raise next(e for e in errors if not isinstance(e, kube.PodRefused))
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
            SHARD_STATES[self.uid] = shard_state_counts(plan.status)
            metrics.set_job_phases(PHASES)
            metrics.set_shard_states(SHARD_STATES)
        if self.pending_status is not None and (
            plan.status_urgent or self.since_patch() >= self.settings.status_interval_seconds
        ):
            await self.flush(job)
        return refusals[0] if refusals else None

    async def flush(self, job: JobView) -> None:
        new = self.pending_status
        assert new is not None
        old = self.patched if self.patched is not None else job_status_dict(job)
        patch = merge_patch(old, new)
        self.pending_status = None
        if patch:
            await kube.patch_status(job.namespace, job.name, patch)
            self.patched_at = time.monotonic()
        self.patched = new

    async def read_index(self, job: JobView, pods: list[PodView]) -> None:
        """Read index/summary.json once the index step has finished (one GET, then cached)."""
        if self.index is not None:
            return
        if not past_index(job, pods):
            return
        assert job.spec is not None
        loop = asyncio.get_running_loop()
        self.index = await loop.run_in_executor(READ_POOL, _read_index, job.spec)

    async def read_ended(self, job: JobView, pods: list[PodView]) -> None:
        """Read progress once more for attempts that just ended or vanished: the replacement
        must start from what they committed, not from the last timed poll."""
        ended = {n: s for n, s in ended_attempts(job, pods).items() if n not in self.ended_read}
        if not ended:
            return
        self.ended_read |= ended.keys()
        await self.read_progress(job, pods, sorted(set(ended.values())))

    async def read_progress(
        self, job: JobView, pods: list[PodView], only: list[int] | None = None
    ) -> None:
        poll = self.settings.progress_poll_seconds
        if only is None and time.monotonic() - self.progress_at < poll:
            return
        self.progress_at = time.monotonic()
        assert job.spec is not None
        done = range_set(job.status.shards_done)
        self.finished_cache &= done  # a shard reset by finalize is polled again
        wanted = only if only is not None else sorted(
            {p.shard for p in pods if p.role == ROLE_WORKER} - self.finished_cache)
        try:
            from embedjob.store import open_store

            store = open_store(job.spec.output.uri, job.spec.storage)
        except Exception as err:
            log.warning("cannot open %s for progress: %s", job.spec.output.uri, err)
            return
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(READ_POOL, _read_progress, store, s) for s in wanted)
        )
        for shard, prog in zip(wanted, results, strict=True):
            if prog is not None:
                self.progress[shard] = prog
                if shard in done:
                    self.finished_cache.add(shard)


def _read_progress(store: Any, shard: int) -> ShardProgress | None:
    try:
        return progress_view(shard, store.read_bytes(layout.shard_progress(shard)))
    except Exception:
        return None


def _read_index(spec: Any) -> IndexInfo | None:
    try:
        from embedjob.store import open_store

        return index_info(open_store(spec.output.uri, spec.storage).read_bytes(layout.SUMMARY))
    except Exception:  # not written yet, or storage trouble: look again next pass
        return None


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
        memo=kopf.Memo(settings=settings),
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
