"""Requests on a job: the ``embedjob.io/restart`` and ``embedjob.io/retry-failed``
annotations, and the finalize step's report of damaged shards it reset. Pure.

:func:`take` runs before the rest of reconcile. It turns the observed status into the one
the job continues from (the local runner's ``--restart`` and ``--retry-failed`` the
Kubernetes way) and says what it did: a Normal Event and ``status.requests.last`` for every
decision, a Warning for a request that makes no sense in the job's state. Each annotation
value is acted on once (``status.requests`` remembers it), so a re-reconcile or a restarted
operator never repeats one. A unit that must run again gets a *floor* (its entry's attempt,
or ``requests.finalizeFrom``): its older, ended pods are history from then on
(:func:`embedjob.operator.observe.observe`).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from embedjob.failures import TerminationMessage
from embedjob.operator.names import ANN_RESTART, ANN_RETRY_FAILED, ROLE_FINALIZE, ROLE_WORKER
from embedjob.operator.steps import EVENT_MESSAGE_MAX, Event
from embedjob.operator.views import JobView, PodView
from embedjob.progress import ShardProgress
from embedjob.ranges import format_ranges, range_set
from embedjob.spec import EmbeddingJobStatus, Phase, ShardEntry, ShardState
from embedjob.status import attempt_name, expand_manifest, job_conditions
from embedjob.status_model import Requests
from embedjob.times import format_time

MAX_FINALIZE_RESETS = 3
"""Past this many resets the finalize step's failure fails the job: storage that keeps
damaging finished shards is not retried forever."""
WAIT_SECONDS = 1.0
"""How often a restart looks again while the earlier run's pods stop."""


@dataclass(frozen=True)
class Taken:
    """The job as reconcile continues from it, and what the requests decided."""

    job: JobView
    events: tuple[Event, ...] = ()
    stop: tuple[str, ...] = ()
    """Pods to delete (a restart stops the earlier run's pods)."""
    hold: bool = False
    """A restart waits for the earlier run's pods: nothing else happens this pass."""
    changed: bool = False
    """The status changed: write it even where reconcile would leave it."""
    forget_reads: bool = False
    """A restart: the shell forgets what it read of the earlier run (index, progress)."""


def take(job: JobView, pods: list[PodView], progress: Mapping[int, ShardProgress],
         now: datetime) -> Taken:
    """Act on new request values and on a finalize step that reset shards."""
    taken = Taken(job)
    if job.spec is None:
        return taken
    taken = _restart(taken, pods, now)
    if taken.hold:
        return taken
    taken = _retry_failed(taken, pods, now)
    return _finalize_reset(taken, pods, progress, now)


# --- restart -----------------------------------------------------------------------------


def _restart(t: Taken, pods: list[PodView], now: datetime) -> Taken:
    """A new value: stop every pod, then start over from a fresh status; the index pods of
    the new run carry EMBEDJOB_RESTART, so the index step deletes the earlier output first
    (``embedjob run --restart``'s discard: only the job's own layout)."""
    value = t.job.requests.get(ANN_RESTART)
    old = t.job.status
    if value and value != old.requests.restart:
        line = (f"restart {value!r}: stopping {len(pods)} pod(s) of the earlier run; the index "
                "step then deletes this output's index, checkpoints and results and starts over")
        base = _next_attempt(t.job, pods)
        requests = Requests(restart=value, restarting=True, retry_failed=old.requests.retry_failed,
                            attempt_base=base, finalize_from=base,
                            last=f"{format_time(now)} {line}")
        fresh = EmbeddingJobStatus(conditions=old.conditions,
                                   observed_generation=old.observed_generation,
                                   requests=requests)
        event = Event("Normal", "Restart", line[:EVENT_MESSAGE_MAX],
                      event_key("restart", value, old.requests))
        t = replace(t, job=replace(t.job, status=fresh), events=(event,), changed=True,
                    forget_reads=True)
    status = t.job.status
    if not status.requests.restarting:
        return t
    if pods:  # no late writer may outlive the discard: wait until every pod is gone
        message = (f"restart {status.requests.restart!r}: waiting for {len(pods)} pod(s) of "
                   f"the earlier run to stop (e.g. {pods[0].name})")
        waiting = _with_phase(status, Phase.pending, message, now)
        return replace(t, job=replace(t.job, status=waiting), hold=True, changed=True,
                       stop=tuple(p.name for p in pods if not p.deleting), forget_reads=True)
    done = status.model_copy(update={"requests": status.requests.model_copy(
        update={"restarting": False})})
    return replace(t, job=replace(t.job, status=done), changed=True, forget_reads=True)


# --- retry-failed ------------------------------------------------------------------------


def _retry_failed(t: Taken, pods: list[PodView], now: datetime) -> Taken:
    """A new value on a Failed job: its failed shards get a fresh failure budget (learnt
    token budget, precision, avoided nodes and quarantine kept, as ``--retry-failed``), its
    other unfinished shards their next attempt, and done shards stay done. A failed
    finalize step runs again. Anything else gets a one-line Warning."""
    value = t.job.requests.get(ANN_RETRY_FAILED)
    status = t.job.status
    if not value or value == status.requests.retry_failed:
        return t
    failed = range_set(status.shards_failed)
    finalize = _latest(pods, ROLE_FINALIZE, -1, status.requests.finalize_from)
    if status.phase != Phase.failed:
        why = f"the job is {status.phase.value}, not Failed"
        return _ignored(t, value, f"{why}; nothing to retry", now)
    if failed:
        line = (f"retry-failed {value!r}: re-running shard(s) {format_ranges(failed)} with a "
                f"fresh failure budget; {len(range_set(status.shards_done))} done shard(s) kept")
        status = _rerun_shards(t.job, pods, failed, fresh_budget=True, now=now)
        phase = Phase.running
    elif finalize is not None and finalize.phase == "Failed":
        reset = _reset_shards(finalize)  # past the cap of resets: those shards, then finalize
        line = f"retry-failed {value!r}: running the finalize step again" + (
            f" after embedding the shard(s) it reset, {format_ranges(reset)}" if reset else "")
        if reset:
            status = _rerun_shards(t.job, pods, set(reset), fresh_budget=True, now=now)
        status = status.model_copy(update={"requests": status.requests.model_copy(
            update={"finalize_from": finalize.attempt + 1, "resets": 0})})
        phase = Phase.running if reset else Phase.merging
    else:
        why = status.message or "the job failed before its shards ran"
        return _ignored(t, value, f"no failed shard or step to retry ({why[:300]}); fix the "
                        "cause and set embedjob.io/restart to start over", now)
    requests = status.requests.model_copy(update={"retry_failed": value,
                                                  "last": f"{format_time(now)} {line}"})
    status = _with_phase(status, phase, "", now).model_copy(
        update={"shards_failed": "", "requests": requests})
    event = Event("Normal", "RetryFailed", line[:EVENT_MESSAGE_MAX],
                  event_key("retry-failed", value, t.job.status.requests))
    # Forget what was read: the reset shards' old counts must not seed their new attempts.
    return replace(t, job=replace(t.job, status=status), events=(*t.events, event),
                   changed=True, forget_reads=True)


def _ignored(t: Taken, value: str, why: str, now: datetime) -> Taken:
    """A request that makes no sense now: remembered (not repeated), and said once."""
    line = f"retry-failed {value!r} ignored: {why}"
    status = t.job.status
    requests = status.requests.model_copy(update={"retry_failed": value,
                                                  "last": f"{format_time(now)} {line}"})
    event = Event("Warning", "RetryFailedIgnored", line[:EVENT_MESSAGE_MAX],
                  event_key("retry-failed", value, status.requests))
    return replace(t, job=replace(t.job, status=status.model_copy(update={"requests": requests})),
                   events=(*t.events, event), changed=True)


# --- a finalize step that reset damaged shards -------------------------------------------


def _finalize_reset(t: Taken, pods: list[PodView], progress: Mapping[int, ShardProgress],
                    now: datetime) -> Taken:
    """The finalize pod's termination message lists the finished shards it found damaged
    and reset (their done records and files deleted): embed those again, then finalize
    again, as ``embedjob run`` does. The pod's attempt moves the finalize floor past it."""
    status = t.job.status
    pod = _latest(pods, ROLE_FINALIZE, -1, status.requests.finalize_from)
    if status.phase != Phase.merging or pod is None or pod.phase != "Failed":
        return t
    said = TerminationMessage.from_json(pod.termination_message)
    reset = _reset_shards(pod)
    if not reset or status.requests.resets >= MAX_FINALIZE_RESETS:
        return t  # settled as any failed step: past the cap, the job fails saying why
    shards = format_ranges(reset)
    line = (f"finalize attempt {pod.attempt} found shard(s) {shards} damaged and reset them: "
            f"embedding them again, then finalizing again ({(said.message if said else '')[:300]})")
    rerun = _rerun_shards(t.job, pods, set(reset), fresh_budget=False, now=now,
                          progress=progress)
    requests = rerun.requests.model_copy(update={
        "finalize_from": pod.attempt + 1, "resets": status.requests.resets + 1,
        "last": f"{format_time(now)} {line}"})
    status = _with_phase(rerun, Phase.running, "", now).model_copy(
        update={"requests": requests})
    event = Event("Normal", "ShardsReset", line[:EVENT_MESSAGE_MAX],
                  event_key("reset", pod.name, status.requests))
    # Forget what was read: the reset shards' old counts must not seed their new attempts.
    return replace(t, job=replace(t.job, status=status), events=(*t.events, event),
                   changed=True, forget_reads=True)


# --- shared ------------------------------------------------------------------------------


def _rerun_shards(job: JobView, pods: list[PodView], shards: set[int], *, fresh_budget: bool,
                  now: datetime, progress: Mapping[int, ShardProgress] | None = None
                  ) -> EmbeddingJobStatus:
    """The status with ``shards`` back to Pending at their next attempt (a floor past every
    pod they had), out of the done ranges; other started, unfinished shards whose pods are
    gone get their next attempt too (a Failed job stopped them)."""
    status = job.status
    entries = expand_manifest(status, lambda s, a: attempt_name(job.name, ROLE_WORKER, s, a))
    done = range_set(status.shards_done) - shards
    active = {p.shard for p in pods if p.role == ROLE_WORKER and p.active}
    again = (shards | {s for s in entries if s >= 0 and s not in done}) - active
    top: dict[int, int] = {}
    for p in pods:
        if p.role == ROLE_WORKER:
            top[p.shard] = max(top.get(p.shard, -1), p.attempt)
    for s, prog in (progress or {}).items():
        top[s] = max(top.get(s, -1), prog.attempt)
    out = {s: e for s, e in entries.items() if s >= 0 and s not in done}
    for s in again:
        entry = entries.get(s) or ShardEntry(shard=s)
        update = {"state": ShardState.pending, "pod": None, "not_before": None,
                  "attempt": max(entry.attempt, top.get(s, -1)) + 1}
        if fresh_budget and s in shards:
            update["failures"] = {}
        out[s] = entry.model_copy(update=update)
    return status.model_copy(update={
        "shards_done": format_ranges(done), "manifest": sorted(out.values(), key=_shard),
        "shard_attempts": {}, "shards_running": "", "manifest_omitted": 0})


def event_key(kind: str, value: str, before: Requests) -> str:
    """The key the shell posts an Event under once: the same decision taken again (its
    status patch lost) is not posted twice, a later one with the same value is."""
    return f"request/{kind}/{value}/{zlib.crc32(before.last.encode()):08x}"


def epoch(requests: Requests) -> str:
    """Changes with every request acted on: a phase the job reaches again after one (Failed
    after a retry, Succeeded after a restart) is posted again."""
    return f"{requests.attempt_base}.{requests.finalize_from}.{requests.retry_failed or ''}"


def _reset_shards(pod: PodView) -> list[int]:
    """The shards a failed finalize pod says it reset (its termination message)."""
    said = TerminationMessage.from_json(pod.termination_message)
    return sorted({s for s in (said.reset_shards if said else []) if s >= 0})


def _next_attempt(job: JobView, pods: list[PodView]) -> int:
    """Past every attempt the earlier run made (its pods, its status): the new run's pod
    names never repeat one, so nothing of the earlier run can be mistaken for the new one."""
    status = job.status
    entries = expand_manifest(status, lambda s, a: "")
    seen = [p.attempt for p in pods] + [e.attempt for e in entries.values()]
    return max([*seen, status.requests.attempt_base - 1, status.requests.finalize_from - 1]) + 1


def _shard(entry: ShardEntry) -> int:
    return entry.shard


def _latest(pods: list[PodView], role: str, shard: int, floor: int) -> PodView | None:
    mine = [p for p in pods if p.role == role and p.shard == shard and p.attempt >= floor]
    return max(mine, key=lambda p: p.attempt) if mine else None


def _with_phase(status: EmbeddingJobStatus, phase: Phase, message: str,
                now: datetime) -> EmbeddingJobStatus:
    conditions = job_conditions(status.conditions, phase, message, [], now)
    return status.model_copy(update={"phase": phase, "message": message,
                                     "conditions": conditions})
