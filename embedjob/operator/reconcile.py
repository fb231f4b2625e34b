"""The operator's brain: one pure function from the observed world to a plan.

``reconcile(job, pods, progress, now, settings, index)`` has JobSet's shape: **observe**
(:func:`embedjob.operator.observe.observe` sorts the pods into buckets once), **decide** (one
small function per step: suspend, index, shards, finalize; each unit through
:func:`embedjob.operator.steps.step` and the shared lifecycle core), then one :class:`Plan`
with the status built once (:mod:`embedjob.status`) and the Events after it. It keeps no
state of its own: what it must remember is in the status and in the pods (each carries the
policy history it was started with), so running it twice, or after a restart, changes
nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from embedjob.failures import ConfigError
from embedjob.operator import heartbeats
from embedjob.operator.config import OperatorSettings
from embedjob.operator.heartbeats import Observed
from embedjob.operator.incremental import UnitMemo
from embedjob.operator.names import ROLE_FINALIZE, ROLE_INDEX, ROLE_WORKER
from embedjob.operator.observe import World, observe
from embedjob.operator.requests import WAIT_SECONDS, Taken, epoch
from embedjob.operator.requests import take as take_requests
from embedjob.operator.steps import Event, Unit, step
from embedjob.operator.views import IndexInfo, IndexUnreadable, JobView, PodView
from embedjob.operator.waits import Verdict, judge
from embedjob.policy import ShardHistory
from embedjob.progress import ShardProgress
from embedjob.ranges import format_ranges
from embedjob.spec import Phase, Progress, ShardEntry, ShardState
from embedjob.status import (
    MANIFEST_CAP,
    TERMINAL,
    Count,
    Outline,
    condition_key,
    dump_status,
    job_progress,
    job_status,
    set_conditions,
    shard_entry,
)

__all__ = ["MANIFEST_CAP", "Event", "Plan", "dump_status", "reconcile", "refused"]

PROGRESS_FRESH_SECONDS = 600.0
"""A shard's rate counts toward the job's only if its progress.json is this recent."""


@dataclass(frozen=True)
class Plan:
    pods_to_create: list[dict[str, Any]] = field(default_factory=list)
    pods_to_delete: list[str] = field(default_factory=list)
    status: dict[str, Any] | None = None  # the whole status (camelCase), None: leave it
    status_urgent: bool = False  # a transition: patch now, not at the bounded rate
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    forget_reads: bool = False  # a restart or reset: what the shell read is stale


@dataclass(frozen=True)
class Decided:
    """What the decide functions concluded for the job this pass."""

    phase: Phase
    done: frozenset[int]
    failed: frozenset[int]
    message: str = ""
    units: tuple[Unit, ...] = ()
    entries: tuple[ShardEntry, ...] = ()
    stop: tuple[str, ...] = ()
    """Pods to stop besides the units' own (suspend, a failed job)."""
    requeue: float | None = None
    reason: str | None = None
    """The Failed condition's reason when the job fails for a wait (None: the default)."""


def reconcile(
    job: JobView,
    pods: list[PodView],
    progress: Mapping[int, ShardProgress],
    now: datetime,
    settings: OperatorSettings,
    index: IndexInfo | IndexUnreadable | None = None,
    beats: Mapping[int, Observed] | None = None,
    memo: UnitMemo | None = None,
    max_creates: int | None = None,
) -> Plan:
    """Decide everything for one job from what is observed now.

    ``index`` is the index step's summary once it exists: the effective shard count (it
    can be below spec.shards) and the sequence total come from it, never from the spec;
    :class:`IndexUnreadable` when the shell could not read it (why, in one line).
    ``beats``: each running shard's heartbeat as the poller last read it ("stuck" from it).
    ``memo`` (the caller's, one per job) lets unchanged shards reuse their last quiet
    decision; the plan is the same without it. ``max_creates`` caps the shards this pass
    starts (replacements of lost pods excepted), shards already started first: the status
    then tells only what was created, and ``requeue_after`` 0 asks for the next chunk.
    """
    taken = take_requests(job, pods, progress, now)  # restart, retry-failed, reset shards
    if taken.hold or (taken.changed and taken.job.status.phase in TERMINAL):
        return _requested(taken)
    job = taken.job
    old = job.status
    if old.phase in TERMINAL and old.observed_generation == job.generation:
        return Plan()
    if job.spec is None:
        return _invalid(job, job.spec_error or "invalid spec", now)
    try:
        info = index if isinstance(index, IndexInfo) else None
        world = replace(observe(job, pods, progress, now, settings, info, beats), memo=memo,
                        max_creates=max_creates)
        if memo is not None:
            memo.start((job.uid, job.name, job.namespace, job.generation, job.spec, settings,
                        info, job.status.phase == Phase.suspended, job.status.requests))
        verdict = judge(world, index.message if isinstance(index, IndexUnreadable) else None)
        decided = _past_deadline(world, _decide(world), verdict)
    except ConfigError as err:  # e.g. an unusable spec.template
        return _invalid(job, str(err), now)
    plan = _plan(world, decided, verdict)
    if not taken.changed:
        return plan
    return replace(plan, events=[*taken.events, *plan.events], status_urgent=True,
                   pods_to_delete=[*taken.stop, *plan.pods_to_delete],
                   forget_reads=taken.forget_reads)


def _requested(taken: Taken) -> Plan:
    """Only what the requests decided: a restart waiting for pods, or a request ignored
    on a finished job."""
    return Plan(pods_to_delete=list(taken.stop), status=dump_status(taken.job.status),
                status_urgent=True, events=list(taken.events),
                requeue_after=WAIT_SECONDS if taken.hold else None,
                forget_reads=taken.forget_reads)


# --- decide: one function per step -------------------------------------------------------


def _decide(w: World) -> Decided:
    if w.spec.suspend:
        return _suspend(w)
    if not w.indexed:
        return _index(w)
    if w.shards is None and not w.failed:
        # The index pod has finished; its summary (the shard count) is not read yet.
        # Started shards keep their entries (a request may have set their next attempt).
        kept = tuple(e for s, e in w.entries.items() if s >= 0)
        return Decided(Phase.running, w.done, w.failed, entries=kept, requeue=1.0)
    if w.shards is not None and len(w.done) < w.shards and not w.failed:
        return _shards(w, w.shards)
    if w.failed:
        message = w.job.status.message or f"shard(s) {format_ranges(w.failed)} failed"
        return Decided(Phase.failed, w.done, w.failed, message)
    return _finalize(w)


def _past_deadline(w: World, d: Decided, verdict: Verdict) -> Decided:
    """A wait that outlived its deadline fails the job (its other pods stop); the units'
    entries stay, their pod creates are dropped."""
    if verdict.failure is None or d.phase in (*TERMINAL, Phase.suspended):
        return d
    reason, message = verdict.failure
    units = tuple(replace(u, create=()) for u in d.units)
    return replace(d, phase=Phase.failed, message=message, units=units, reason=reason,
                   stop=w.stoppable)


def _suspend(w: World) -> Decided:
    """Stop every pod; remember which attempt each shard was at, so resuming starts the
    next one."""
    entries = {s: e for s, e in w.entries.items() if s >= 0 and s not in w.done}
    for (role, shard), pod in w.latest.items():
        if role == ROLE_WORKER and shard not in w.done:
            prog = w.progress.get(shard)
            entries[shard] = shard_entry(
                entries.get(shard), shard, ShardState.pending, attempt=pod.attempt,
                name=pod.name, history=ShardHistory.from_json(pod.history),
                done=prog.done if prog else None, total=prog.total if prog else None)
    return Decided(Phase.suspended, w.done, w.failed, entries=tuple(entries.values()),
                   stop=w.stoppable)


def _index(w: World) -> Decided:
    unit = step(w, ROLE_INDEX, -1, 1, resuming=False)
    phase = Phase.failed if unit.state == ShardState.failed else Phase.indexing
    message = f"index failed: {unit.failed_reason}" if unit.failed_reason else ""
    own = (unit.entry,) if phase == Phase.indexing and unit.entry is not None else ()
    return Decided(phase, w.done, w.failed, message, (unit,), own)


def _finalize(w: World) -> Decided:
    unit = step(w, ROLE_FINALIZE, -1, 1, resuming=False)
    phase = {ShardState.succeeded: Phase.succeeded, ShardState.failed: Phase.failed}.get(
        unit.state, Phase.merging)
    message = f"finalize failed: {unit.failed_reason}" if unit.failed_reason else ""
    own = (unit.entry,) if phase == Phase.merging and unit.entry is not None else ()
    return Decided(phase, w.done, w.failed, message, (unit,), own)


def _shards(w: World, shards: int) -> Decided:
    """Every unfinished shard within spec.parallelism (and the pass's create budget):
    started shards first (their replacements go out before fresh starts), lowest first."""
    slots = max(0, w.spec.effective_parallelism - w.active_workers)
    creates = w.max_creates
    resuming = w.job.status.phase == Phase.suspended
    units: list[Unit] = []
    done, failed, message = set(w.done), set(w.failed), ""
    for shard in _shard_order(w, shards):
        avail = slots if creates is None else min(slots, max(creates, 0))
        unit = _step(w, ROLE_WORKER, shard, avail, resuming)
        slots -= unit.slots_used
        if creates is not None:
            creates -= len(unit.create)
        units.append(unit)
        if unit.state == ShardState.succeeded:
            done.add(shard)
        elif unit.state == ShardState.failed:
            failed.add(shard)
            message = f"shard {shard} failed: {unit.failed_reason}"
    entries = tuple(u.entry for u in units
                    if u.entry is not None and u.state != ShardState.succeeded)
    if not failed:
        more = 0.0 if creates is not None and creates <= 0 else None  # the next chunk
        return Decided(Phase.running, frozenset(done), frozenset(failed), "", tuple(units),
                       entries, requeue=more)
    # Stop the rest (they checkpoint); a new job with the same output resumes them.
    message = message or f"shard(s) {format_ranges(failed)} failed"
    return Decided(Phase.failed, frozenset(done), frozenset(failed), message, tuple(units),
                   entries, stop=w.stoppable)


def _shard_order(w: World, shards: int) -> list[int]:
    """Unfinished shards, those with an attempt (a pod, or an entry naming one) first."""
    todo = [s for s in range(shards) if s not in w.done]
    started = [s for s in todo if (ROLE_WORKER, s) in w.latest or s in w.entries]
    if len(started) == len(todo):
        return todo
    begun = set(started)
    return started + [s for s in todo if s not in begun]


def _step(w: World, role: str, shard: int, slots: int, resuming: bool) -> Unit:
    """:func:`step`, or its quiet decision of an earlier pass when nothing it reads changed."""
    memo = w.memo
    if memo is None:
        return step(w, role, shard, slots, resuming)
    pod = w.latest.get((role, shard))
    prog = w.progress.get(shard) if role == ROLE_WORKER else None
    beat = w.beats.get(shard) if role == ROLE_WORKER else None  # "stuck" reads it
    key = memo.unit_key(pod, prog, w.entries.key(shard), slots, resuming)
    unit = memo.get(role, shard, key, w.now, beat, lambda b: _not_stuck(w, pod, b))
    if unit is None:
        unit = step(w, role, shard, slots, resuming)
        memo.put(role, shard, key, unit, pod, w.now,
                 w.settings.unschedulable_after_seconds, beat)
    return unit


def _not_stuck(w: World, pod: PodView | None, beat: Observed | None) -> bool:
    """A quiet unit's pod was not stuck; with this observation it is still not (the verdict
    is as of the read, so it cannot turn with time alone: :func:`heartbeats.stuck`)."""
    return pod is None or heartbeats.stuck(pod, beat, w.now, w.settings) is None


# --- the plan: status written once, Events after -----------------------------------------


def _plan(w: World, d: Decided, verdict: Verdict) -> Plan:
    old, job = w.job.status, w.job
    count = w.shards or old.shard_count or w.spec.shards
    message = f"{count} shard(s) embedded" if d.phase == Phase.succeeded else d.message
    outline = Outline(
        phase=d.phase, message=message, shard_count=count, done=d.done, failed=d.failed,
        entries=d.entries, progress=_progress(w, count, d.done), generation=job.generation,
        unschedulable=tuple(u.unschedulable for u in d.units if u.unschedulable),
    )
    status = job_status(outline, old, w.now).model_copy(update={"requests": old.requests})
    failed = {"Failed": ("True", d.reason, message)} if d.reason else {}
    status = status.model_copy(update={"conditions": set_conditions(
        status.conditions, w.now, {**verdict.conditions, **failed})})
    events = [e for u in d.units for e in u.events] + list(verdict.events)
    if status.phase != old.phase:
        kind = "Warning" if status.phase == Phase.failed else "Normal"
        events.append(Event(kind, status.phase.value,
                            (status.message or f"phase {status.phase.value}")[:1000],
                            f"phase/{status.phase.value}/{job.generation}/{epoch(old.requests)}"))
    return Plan(
        pods_to_create=[m for u in d.units for m in u.create],
        pods_to_delete=[*w.stale, *(n for u in d.units for n in u.delete), *d.stop],
        status=dump_status(status),
        status_urgent=status.phase != old.phase or condition_key(status) != condition_key(old),
        events=events,
        requeue_after=_requeue(w, d, status.phase, verdict),
    )


def _requeue(w: World, d: Decided, phase: Phase, verdict: Verdict) -> float | None:
    waits = [u.requeue for u in d.units if u.requeue is not None]
    waits += [d.requeue] if d.requeue is not None else []
    waits += [verdict.requeue] if verdict.requeue is not None else []
    requeue = min(waits) if waits else None
    if phase not in TERMINAL:
        poll = w.settings.progress_poll_seconds
        requeue = poll if requeue is None else min(requeue, poll)  # 0: at once
    return max(requeue, 0.0) if requeue is not None else None


def _progress(w: World, shards: int, done: frozenset[int]) -> Progress:
    """The job's progress: one sum over the shards' reports (no object per shard: at 10^4
    shards this runs every pass); job_progress only adds its counts up."""
    fresh = w.now - timedelta(seconds=PROGRESS_FRESH_SECONDS)
    sum_done = sum_total = 0
    rate = 0.0
    for s, p in w.progress.items():
        if s in done:
            sum_done += p.total or p.done
        else:
            sum_done += p.done
            rate += p.rate if p.updated and p.updated > fresh else 0.0
        sum_total += p.total
    total = w.index.sequences if w.index is not None else None
    return job_progress([Count(done=sum_done, total=sum_total, rate=rate)], total,
                        all_done=len(done) == shards)


def _invalid(job: JobView, message: str, now: datetime, reason: str = "InvalidSpec") -> Plan:
    status = job.status.model_copy(
        update={
            "phase": Phase.failed,
            "observed_generation": job.generation,
            "message": message,
            "conditions": set_conditions(
                job.status.conditions, now, {"Failed": ("True", reason, message)}
            ),
        }
    )
    event = Event("Warning", reason, message, f"{reason}/{job.generation}")
    return Plan(status=dump_status(status), status_urgent=True, events=[event])


def refused(job: JobView, pods: list[PodView], message: str, now: datetime) -> Plan:
    """The API server refused a pod for a reason no retry can fix (an invalid pod, no
    permission): the job fails with the server's words, and its other pods stop (they
    checkpoint; a new job with the same output resumes them)."""
    plan = _invalid(job, f"{message} — fix the spec and create the job again", now,
                    reason="PodRejected")
    return replace(plan, pods_to_delete=[p.name for p in pods if p.active and not p.deleting])
