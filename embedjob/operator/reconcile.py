"""The operator's brain: one pure function from the observed world to a plan.

``reconcile(job, pods, progress, now, settings)`` looks at the job (spec, stored status),
its pods and the shards' progress records, and returns what to do: pods to create and
delete, the status to write, Events to post, when to look again. It keeps no state of its
own: everything it needs to remember between runs is in the status and in the pods
(each pod carries the policy history it was started with, as an annotation), so running
it twice, or after an operator restart, changes nothing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from embedjob.failures import ConfigError, Failure, TerminationMessage
from embedjob.operator import classify as cls
from embedjob.operator.config import OperatorSettings
from embedjob.operator.pods import build_pod, pod_name
from embedjob.operator.views import (
    ROLE_FINALIZE,
    ROLE_INDEX,
    ROLE_WORKER,
    IndexInfo,
    JobView,
    PodView,
    ShardProgress,
    format_time,
)
from embedjob.policy import ShardHistory, decide
from embedjob.spec import (
    Condition,
    EmbeddingJobStatus,
    LastFailure,
    Phase,
    Progress,
    ShardEntry,
    ShardState,
)

TERMINAL = (Phase.succeeded, Phase.failed)
PROGRESS_FRESH_SECONDS = 600.0
"""A shard's rate counts toward the job's only if its progress.json is this recent."""
MANIFEST_CAP = 500
"""Most full entries in status.manifest: ~250 bytes each keeps a 10^4-shard status small."""


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str
    key: str  # the shell posts each key once per operator process
    gpu_seconds_lost: float = 0.0  # preemptions: GPU time since the last committed part


@dataclass(frozen=True)
class Plan:
    pods_to_create: list[dict[str, Any]] = field(default_factory=list)
    pods_to_delete: list[str] = field(default_factory=list)
    status: dict[str, Any] | None = None  # the whole status (camelCase), None: leave it
    status_urgent: bool = False  # a transition: patch now, not at the bounded rate
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None


@dataclass
class _Acc:
    """What one reconcile pass accumulates (local to the pass)."""

    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue: list[float] = field(default_factory=list)
    unschedulable: list[str] = field(default_factory=list)

    def event(self, type_: str, reason: str, message: str, key: str, lost: float = 0.0) -> None:
        self.events.append(Event(type_, reason, message[:1000], key, lost))


@dataclass(frozen=True)
class _Unit:
    """The outcome for one step (index, a shard, finalize)."""

    state: ShardState
    entry: ShardEntry | None = None
    failed_reason: str | None = None


# --- ranges ------------------------------------------------------------------------------


def format_ranges(numbers: Iterable[int]) -> str:
    """[0,1,2,3,5] -> '0-3,5' (like a Job's completedIndexes)."""
    out: list[str] = []
    ordered = sorted(set(numbers))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def parse_ranges(text: str | None) -> set[int]:
    result: set[int] = set()
    for chunk in (text or "").split(","):
        chunk = chunk.strip()
        if not chunk:
            continue
        lo, _, hi = chunk.partition("-")
        result.update(range(int(lo), int(hi or lo) + 1))
    return result


# --- the function ------------------------------------------------------------------------


def reconcile(
    job: JobView,
    pods: list[PodView],
    progress: Mapping[int, ShardProgress],
    now: datetime,
    settings: OperatorSettings,
    index: IndexInfo | None = None,
) -> Plan:
    """Decide everything for one job from what is observed now.

    ``index`` is the index step's summary once it exists: the effective shard count (it
    can be below spec.shards) and the sequence total come from it, never from the spec.
    """
    old = job.status
    if old.phase in TERMINAL and old.observed_generation == job.generation:
        return Plan()
    if job.spec is None:
        return _invalid(job, job.spec_error or "invalid spec", now)
    acc = _Acc()
    try:
        status = _run(job, pods, progress, now, settings, acc, index)
    except ConfigError as err:  # e.g. an unusable spec.template
        return _invalid(job, str(err), now)
    urgent = status.phase != old.phase or _conds(status) != _conds(old)
    if status.phase != old.phase:
        kind = "Warning" if status.phase == Phase.failed else "Normal"
        acc.event(kind, status.phase.value, status.message or f"phase {status.phase.value}",
                  f"phase/{status.phase.value}/{job.generation}")
    requeue = min(acc.requeue) if acc.requeue else None
    if status.phase not in TERMINAL:
        requeue = min(requeue or settings.progress_poll_seconds, settings.progress_poll_seconds)
    return Plan(
        pods_to_create=acc.create,
        pods_to_delete=acc.delete,
        status=dump_status(status),
        status_urgent=urgent,
        events=acc.events,
        requeue_after=max(requeue, 0.0) if requeue is not None else None,
    )


def dump_status(status: EmbeddingJobStatus) -> dict[str, Any]:
    """camelCase JSON; manifest entries leave defaults out (thousands of them add up)."""
    data = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["manifest"] = [
        e.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
        | {"shard": e.shard}
        for e in status.manifest
    ]
    return data


def _conds(status: EmbeddingJobStatus) -> list[tuple[str, str, str]]:
    return [(c.type, c.status, c.reason) for c in status.conditions]


def _invalid(job: JobView, message: str, now: datetime, reason: str = "InvalidSpec") -> Plan:
    status = job.status.model_copy(
        update={
            "phase": Phase.failed,
            "observed_generation": job.generation,
            "message": message,
            "conditions": _set_conditions(
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


def _run(
    job: JobView,
    pods: list[PodView],
    progress: Mapping[int, ShardProgress],
    now: datetime,
    settings: OperatorSettings,
    acc: _Acc,
    index: IndexInfo | None,
) -> EmbeddingJobStatus:
    spec = job.spec
    assert spec is not None
    old = job.status
    latest = _latest(pods)
    # Older attempts of a unit are history once a newer one exists: tidy them away.
    acc.delete += [p.name for p in pods if p is not latest.get((p.role, p.shard)) and p.terminated
                   and not p.deleting]
    done = parse_ranges(old.shards_done) | {
        p.shard for p in pods if p.role == ROLE_WORKER and p.phase == "Succeeded"
    }
    shards = index.shards if index is not None else None
    done = {s for s in done if s < (shards or spec.shards)}
    failed = parse_ranges(old.shards_failed) - done
    entries = expand_manifest(old, job.name)
    indexed = old.phase in (Phase.running, Phase.merging) or bool(done) or any(
        p.role in (ROLE_WORKER, ROLE_FINALIZE) for p in pods
    ) or any(p.role == ROLE_INDEX and p.phase == "Succeeded" for p in pods) or any(
        s >= 0 for s in entries  # shards started before a suspend, their pods gone since
    )
    suspended = spec.suspend
    manifest: list[ShardEntry] = []
    message = ""

    if suspended:
        acc.delete += [p.name for p in pods if p.active and not p.deleting]
        phase = Phase.suspended
    elif not indexed:
        unit = _step(job, ROLE_INDEX, -1, latest.get((ROLE_INDEX, -1)), None,
                     entries.get(-1), now, settings, acc, slots=[1], resuming=False)
        phase = Phase.failed if unit.state == ShardState.failed else Phase.indexing
        message = f"index failed: {unit.failed_reason}" if unit.failed_reason else ""
    elif shards is None and not failed:
        # The index pod has finished; its summary (the shard count) is not read yet.
        phase = Phase.running
        acc.requeue.append(1.0)
    elif shards is not None and len(done) < shards and not failed:
        active = sum(1 for p in pods if p.role == ROLE_WORKER and p.active)
        slots = [max(0, spec.effective_parallelism - active)]
        resuming = old.phase == Phase.suspended
        for shard in range(shards):
            if shard in done:
                continue
            unit = _step(job, ROLE_WORKER, shard, latest.get((ROLE_WORKER, shard)),
                         progress.get(shard), entries.get(shard), now, settings, acc, slots,
                         resuming)
            if unit.state == ShardState.succeeded:
                done.add(shard)
            elif unit.state == ShardState.failed:
                failed.add(shard)
                message = f"shard {shard} failed: {unit.failed_reason}"
            if unit.entry is not None and unit.state != ShardState.succeeded:
                manifest.append(unit.entry)
        phase = Phase.running
        if failed:
            phase = Phase.failed
            message = message or f"shard(s) {format_ranges(failed)} failed"
            # Stop the rest (they checkpoint); a new job with the same output resumes them.
            acc.delete += [p.name for p in pods if p.active and not p.deleting]
    elif failed:
        phase = Phase.failed
        message = old.message or f"shard(s) {format_ranges(failed)} failed"
    else:
        unit = _step(job, ROLE_FINALIZE, -1, latest.get((ROLE_FINALIZE, -1)), None,
                     entries.get(-1), now, settings, acc, slots=[1], resuming=False)
        phase = {ShardState.succeeded: Phase.succeeded, ShardState.failed: Phase.failed}.get(
            unit.state, Phase.merging
        )
        message = f"finalize failed: {unit.failed_reason}" if unit.failed_reason else ""
    count = shards or old.shard_count or spec.shards
    if phase == Phase.succeeded:
        message = f"{count} shard(s) embedded"
    if suspended:
        manifest = _suspended_manifest(entries, latest, progress, done)
    if phase in (Phase.indexing, Phase.merging) and unit.entry is not None:
        manifest = [unit.entry]  # the step's own entry (shard -1)
    conds = _job_conditions(old.conditions, phase, message, acc.unschedulable, now)
    full, omitted = compact_manifest(manifest, MANIFEST_CAP)
    return EmbeddingJobStatus(
        phase=phase,
        conditions=conds,
        observed_generation=job.generation,
        progress=_progress(count, done, progress, index.sequences if index else None, now),
        shards_ready=f"{len(done)}/{count}",
        shards_done=format_ranges(done),
        shards_failed=format_ranges(failed),
        shards_running=format_ranges(e.shard for e in manifest
                                     if e.shard >= 0 and e.state == ShardState.running),
        shard_attempts=_attempt_ranges(manifest),
        shard_count=count,
        manifest=full,
        manifest_omitted=omitted,
        message=message,
    )


def _suspended_manifest(
    old: Mapping[int, ShardEntry],
    latest: Mapping[tuple[str, int], PodView],
    progress: Mapping[int, ShardProgress],
    done: set[int],
) -> list[ShardEntry]:
    """Remember which attempt each shard was at, so that resuming starts the next one."""
    entries = {s: e for s, e in old.items() if s >= 0 and s not in done}
    for (role, shard), pod in latest.items():
        if role == ROLE_WORKER and shard not in done:
            entry = _entry(shard, pod, progress.get(shard), entries.get(shard),
                           ShardState.pending)
            entries[shard] = entry
    return list(entries.values())


# --- the compact manifest ------------------------------------------------------------------


def compact_manifest(entries: list[ShardEntry], cap: int) -> tuple[list[ShardEntry], int]:
    """The entries worth a full record, at most ``cap``, and how many were left out.

    An unremarkable shard (attempt and pod only) is summarised by status.shardAttempts;
    what a left-out entry held is also in its pod's history annotation, and the shard's
    attempt number (which keeps part names unique) is always in shardAttempts.
    """
    notable = [e for e in entries if _notable(e)]
    # Most recent failures first, then whatever changes the next attempt before the rest.
    notable.sort(key=lambda e: e.last_failure.time if e.last_failure else "", reverse=True)
    notable.sort(key=lambda e: not _essential(e))
    kept = notable[:cap]
    return sorted(kept, key=lambda e: e.shard), len(notable) - len(kept)


def _essential(entry: ShardEntry) -> bool:
    """Steps, failed or waiting shards, and overrides the next attempt must start with."""
    return (entry.shard < 0 or entry.state in (ShardState.failed, ShardState.backoff)
            or entry.not_before is not None or entry.batch_tokens is not None
            or entry.precision is not None
            or bool(entry.avoid_nodes or entry.isolate or entry.quarantine))


def _notable(entry: ShardEntry) -> bool:
    return entry.pod is None or _essential(entry) or bool(
        entry.failures or entry.last_failure or entry.quarantined
    )


def _attempt_ranges(entries: list[ShardEntry]) -> dict[str, str]:
    by_attempt: dict[int, list[int]] = {}
    for e in entries:
        if e.shard >= 0 and e.pod is not None:
            by_attempt.setdefault(e.attempt, []).append(e.shard)
    return {str(a): format_ranges(shards) for a, shards in sorted(by_attempt.items())}


def expand_manifest(status: EmbeddingJobStatus, job: str) -> dict[int, ShardEntry]:
    """Full entries plus one re-derived for each shard that shardAttempts summarises."""
    entries = {e.shard: e for e in status.manifest}
    running = parse_ranges(status.shards_running)
    for key, ranges in status.shard_attempts.items():
        with contextlib.suppress(ValueError):
            attempt = int(key)
            for shard in parse_ranges(ranges) - set(entries):
                state = ShardState.running if shard in running else ShardState.pending
                entries[shard] = ShardEntry(shard=shard, state=state, attempt=attempt,
                                            pod=pod_name(job, ROLE_WORKER, shard, attempt))
    return entries


def _latest(pods: list[PodView]) -> dict[tuple[str, int], PodView]:
    out: dict[tuple[str, int], PodView] = {}
    for pod in pods:
        key = (pod.role, pod.shard)
        if key not in out or pod.attempt > out[key].attempt:
            out[key] = pod
    return out


def _step(
    job: JobView,
    role: str,
    shard: int,
    pod: PodView | None,
    prog: ShardProgress | None,
    entry: ShardEntry | None,
    now: datetime,
    settings: OperatorSettings,
    acc: _Acc,
    slots: list[int],
    resuming: bool,
) -> _Unit:
    """One unit of work (index, a shard, finalize): start it, watch it, retry it."""
    label = "index" if role == ROLE_INDEX else "finalize" if role == ROLE_FINALIZE else (
        f"shard {shard}"
    )
    if pod is None:
        if entry is None or entry.pod is None:
            return _start(job, role, shard, 0, ShardHistory(attempts=1), prog, None, settings,
                          acc, slots, entry, label)
        history = _history_from_entry(entry)
        if resuming:
            return _start(job, role, shard, entry.attempt + 1, history, prog, None, settings,
                          acc, slots, entry, label)
        failure = cls.vanished(entry.pod)
        fake = PodView(name=entry.pod, role=role, shard=shard, attempt=entry.attempt,
                       phase="Failed", history=history.to_json(), finished=now)
        return _after_failure(job, role, shard, fake, failure, prog, entry, now, settings, acc,
                              slots, label)
    if pod.phase == "Succeeded":
        return _Unit(ShardState.succeeded, _entry(shard, pod, prog, entry, ShardState.succeeded))
    if pod.active:
        lost = cls.node_lost(pod, now)
        failure = lost or (
            cls.stuck(pod, prog, now, settings.stuck_after_seconds) if role == ROLE_WORKER
            else None
        )
        if failure is not None:
            slots[0] += 1  # the replaced pod's slot
            return _after_failure(job, role, shard, replace(pod, finished=now), failure, prog,
                                  entry, now, settings, acc, slots, label, kill=True)
        waiting = cls.unschedulable(pod, now, settings.unschedulable_after_seconds)
        if waiting is not None:
            acc.unschedulable.append(pod.name)
            acc.event("Warning", "Unschedulable", f"{label}: {waiting.message}",
                      f"unsched/{pod.name}")
        state = ShardState.running if pod.phase == "Running" else ShardState.pending
        return _Unit(state, _entry(shard, pod, prog, entry, state))
    return _after_failure(job, role, shard, pod, cls.classify(pod), prog, entry, now, settings,
                          acc, slots, label)


def _after_failure(
    job: JobView,
    role: str,
    shard: int,
    pod: PodView,
    failure: Failure,
    prog: ShardProgress | None,
    entry: ShardEntry | None,
    now: datetime,
    settings: OperatorSettings,
    acc: _Acc,
    slots: list[int],
    label: str,
    kill: bool = False,
) -> _Unit:
    assert job.spec is not None
    history = ShardHistory.from_json(pod.history)
    progressed = prog is not None and prog.attempt == pod.attempt and cls.made_progress(pod, prog)
    decision = decide(job.spec, history, failure, progressed)
    when = pod.finished or now
    last = LastFailure(type=failure.type.value, message=failure.message[:300],
                       time=format_time(when))
    key = f"decide/{role}/{shard}/{pod.attempt}"
    text = f"{label} attempt {pod.attempt}: {decision.reason}"
    base = _entry(shard, pod, prog, entry, ShardState.backoff)
    base = base.model_copy(update=_history_fields(decision.history) | {"last_failure": last})
    if not decision.retry:
        acc.event("Warning", "ShardFailed" if role == ROLE_WORKER else "StepFailed", text, key)
        if kill and not pod.deleting:
            acc.delete.append(pod.name)
        return _Unit(ShardState.failed, base.model_copy(update={"state": ShardState.failed}),
                     failed_reason=decision.reason)
    preempted = failure.type.value == "preempted"
    lost = _gpu_seconds_lost(job, pod, prog, when) if preempted and role == ROLE_WORKER else 0.0
    acc.event("Normal" if preempted else "Warning", f"Retry{_camel(failure.type.value)}", text,
              key, lost)
    not_before = when + timedelta(seconds=decision.delay_seconds)
    if now < not_before:
        acc.requeue.append((not_before - now).total_seconds())
        return _Unit(ShardState.backoff, base.model_copy(update={"not_before":
                                                                 format_time(not_before)}))
    nxt = replace(decision.history, attempts=pod.attempt + 2)
    prog = _with_final_commit(shard, pod, prog)
    started = _start(job, role, shard, pod.attempt + 1, nxt, prog, json.dumps(
        {"type": last.type, "message": last.message, "time": last.time}), settings, acc, slots,
        base, label)
    if started.state != ShardState.backoff and kill and not pod.deleting:
        acc.delete.append(pod.name)  # create first, then delete: a crash in between is safe
    return started


def _with_final_commit(
    shard: int, pod: PodView, prog: ShardProgress | None
) -> ShardProgress | None:
    """The attempt's last word beats a progress.json read before its final checkpoint."""
    message = TerminationMessage.from_json(pod.termination_message)
    if message is None or message.committed <= (prog.done if prog else 0):
        return prog
    return replace(prog or ShardProgress(shard=shard), done=message.committed)


def _start(
    job: JobView,
    role: str,
    shard: int,
    attempt: int,
    history: ShardHistory,
    prog: ShardProgress | None,
    last_failure: str | None,
    settings: OperatorSettings,
    acc: _Acc,
    slots: list[int],
    entry: ShardEntry | None,
    label: str,
) -> _Unit:
    if slots[0] <= 0:
        state = ShardState.backoff if entry and entry.last_failure else ShardState.pending
        return _Unit(state, entry.model_copy(update={"state": state}) if entry else None)
    slots[0] -= 1
    manifest = build_pod(job, role, shard, attempt, history, settings,
                         start_done=prog.done if prog else 0, last_failure=last_failure)
    acc.create.append(manifest)
    name = manifest["metadata"]["name"]
    update = {"state": ShardState.pending, "attempt": attempt, "pod": name, "not_before": None,
              **_history_fields(history)}
    new = (entry or ShardEntry(shard=shard)).model_copy(update=update)
    if prog is not None:
        new = new.model_copy(update={"done": prog.done, "total": prog.total})
    return _Unit(ShardState.pending, new)


def _entry(
    shard: int, pod: PodView, prog: ShardProgress | None, entry: ShardEntry | None,
    state: ShardState,
) -> ShardEntry:
    history = ShardHistory.from_json(pod.history)
    update: dict[str, Any] = {"state": state, "attempt": pod.attempt, "pod": pod.name,
                              **_history_fields(history)}
    if prog is not None:
        update |= {"done": prog.done, "total": prog.total}
    if pod.last_failure and (entry is None or entry.last_failure is None):
        with contextlib.suppress(ValueError):
            update["last_failure"] = LastFailure.model_validate(json.loads(pod.last_failure))
    return (entry or ShardEntry(shard=shard)).model_copy(update=update)


def _gpu_seconds_lost(
    job: JobView, pod: PodView, prog: ShardProgress | None, when: datetime
) -> float:
    """GPUs x seconds between the attempt's last committed part (or its start) and its end."""
    assert job.spec is not None
    since = pod.started or pod.created
    if prog is not None and prog.attempt == pod.attempt and prog.updated is not None:
        since = max(since, prog.updated) if since is not None else prog.updated
    if since is None:
        return 0.0
    return job.spec.resources.gpus * max(0.0, (when - since).total_seconds())


def _history_fields(history: ShardHistory) -> dict[str, Any]:
    return {
        "failures": {k: v for k, v in history.failures.items() if v},
        "batch_tokens": history.max_tokens,
        "precision": history.precision,
        "quarantined": len(history.quarantined),
        "avoid_nodes": list(history.avoid_nodes),
        "isolate": list(history.isolate),
        "quarantine": list(history.quarantined),
    }


def _history_from_entry(entry: ShardEntry) -> ShardHistory:
    """Best effort when the pod that carried the history is gone."""
    return ShardHistory(attempts=entry.attempt + 1, failures=dict(entry.failures),
                        max_tokens=entry.batch_tokens, precision=entry.precision,
                        avoid_nodes=tuple(entry.avoid_nodes), isolate=tuple(entry.isolate),
                        quarantined=tuple(entry.quarantine))


def _camel(text: str) -> str:
    return "".join(part.capitalize() for part in text.split("_"))


# --- status pieces -----------------------------------------------------------------------


def _progress(
    shards: int,
    done: set[int],
    progress: Mapping[int, ShardProgress],
    summary_total: int | None,
    now: datetime,
) -> Progress:
    finished = sum(p.total or p.done for s, p in progress.items() if s in done)
    running = sum(p.done for s, p in progress.items() if s not in done)
    total = summary_total or sum(p.total for p in progress.values())
    count = finished + running
    fresh = now - timedelta(seconds=PROGRESS_FRESH_SECONDS)
    rate = sum(
        p.rate for s, p in progress.items() if s not in done and p.updated and p.updated > fresh
    )
    percent = round(100.0 * count / total, 1) if total else (100.0 if len(done) == shards else 0)
    eta = (total - count) / rate if rate > 0 and total > count else None
    return Progress(done=count, total=total, percent=min(percent, 100.0), rate=round(rate, 2),
                    eta_seconds=round(eta) if eta is not None else None,
                    eta=_human(eta) if eta is not None else None)


def _human(seconds: float) -> str:
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    if s >= 60:
        return f"{s // 60}m{s % 60}s"
    return f"{s}s"


def _job_conditions(
    old: list[Condition], phase: Phase, message: str, unschedulable: list[str], now: datetime
) -> list[Condition]:
    wanted: dict[str, tuple[str, str, str]] = {
        "Complete": ("True", "Succeeded", message) if phase == Phase.succeeded
        else ("False", "InProgress" if phase not in TERMINAL else "Failed", ""),
        "Failed": ("True", "ShardFailed", message) if phase == Phase.failed
        else ("False", "NoFailure", ""),
        "Suspended": ("True", "Suspended", "spec.suspend is true") if phase == Phase.suspended
        else ("False", "NotSuspended", ""),
        "Unschedulable": ("True", "PodsPending", f"{len(unschedulable)} pod(s) unschedulable, "
                          f"e.g. {unschedulable[0]}") if unschedulable
        else ("False", "Scheduled", ""),
    }
    if phase == Phase.failed:
        reason = next((c.reason for c in old if c.type == "Failed" and c.status == "True"), None)
        if reason:
            wanted["Failed"] = ("True", reason, message or wanted["Failed"][2])
    return _set_conditions(old, now, wanted)


def _set_conditions(
    old: list[Condition], now: datetime, wanted: Mapping[str, tuple[str, str, str]]
) -> list[Condition]:
    """Kubernetes conventions: lastTransitionTime changes only when status changes."""
    by_type = {c.type: c for c in old}
    out = [c for c in old if c.type not in wanted]
    for kind, (status, reason, message) in wanted.items():
        prev = by_type.get(kind)
        since = prev.last_transition_time if prev and prev.status == status else format_time(now)
        out.append(Condition(type=kind, status=status, reason=reason, message=message[:500],
                             last_transition_time=since))
    return out

