"""Decide one unit of work (the index step, a shard, the finalize step) from its pod.

:func:`step` starts the unit, watches it and, when its attempt ended, settles it with the
shared lifecycle core (:func:`embedjob.attempts.settle`). It returns a :class:`Unit`: the
unit's state and status entry and what to do (pods to create or delete, Events); it never
changes its arguments. Pure.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from embedjob.attempts import Ended, Settled, next_history, notice, settle
from embedjob.failures import FailureType
from embedjob.operator import classify as cls
from embedjob.operator import heartbeats
from embedjob.operator.names import ROLE_FINALIZE, ROLE_INDEX, ROLE_WORKER
from embedjob.operator.observe import World, ended_from_pod
from embedjob.operator.pods import build_pod
from embedjob.operator.views import PodView
from embedjob.policy import ShardHistory
from embedjob.progress import ShardProgress
from embedjob.spec import LastFailure, ShardEntry, ShardState
from embedjob.status import history_fields, history_from_entry, shard_entry
from embedjob.times import format_time

EVENT_MESSAGE_MAX = 1000


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str
    key: str  # the shell posts each key once per operator process
    gpu_seconds_lost: float = 0.0  # preemptions: GPU time since the last committed part
    failure_type: FailureType | None = None  # what metrics count (never parsed from reason)


@dataclass(frozen=True)
class Unit:
    """The outcome for one unit, and what to do about it."""

    state: ShardState
    entry: ShardEntry | None = None
    failed_reason: str | None = None
    create: tuple[dict[str, Any], ...] = ()
    delete: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()
    requeue: float | None = None
    unschedulable: str | None = None
    slots_used: int = 0
    """Worker slots taken (a start) less those given back (a replaced running pod)."""


def label_of(role: str, shard: int) -> str:
    return "index" if role == ROLE_INDEX else "finalize" if role == ROLE_FINALIZE else (
        f"shard {shard}")


def step(w: World, role: str, shard: int, slots: int, resuming: bool) -> Unit:
    """One unit of work: start it, watch it, retry it."""
    pod = w.latest.get((role, shard))
    prog = w.progress.get(shard) if role == ROLE_WORKER else None
    entry = w.entries.get(shard)
    if pod is None:
        return _without_pod(w, role, shard, prog, entry, slots, resuming)
    if pod.phase == "Succeeded":
        return Unit(ShardState.succeeded, _entry_of(pod, prog, entry, ShardState.succeeded))
    if pod.active:
        return _watch(w, pod, prog, entry, slots)
    return _settle(w, pod, ended_from_pod(pod, prog, w.now), prog, entry, slots)


def _without_pod(w: World, role: str, shard: int, prog: ShardProgress | None,
                 entry: ShardEntry | None, slots: int, resuming: bool) -> Unit:
    if entry is None or entry.pod is None:
        # A floor above 0 (a request re-runs the unit) starts it there, with what it learnt.
        first = w.first_attempt(role, shard)
        history = history_from_entry(entry) if entry is not None and first else ShardHistory(
            attempts=first + 1)
        return _start(w, role, shard, first, history, prog, None, slots, entry)
    history = history_from_entry(entry)
    if resuming:
        return _start(w, role, shard, entry.attempt + 1, history, prog, None, slots, entry)
    gone = PodView(name=entry.pod, role=role, shard=shard, attempt=entry.attempt,
                   phase="Failed", history=history.to_json(), finished=w.now)
    ended = ended_from_pod(gone, prog, w.now, failure=cls.vanished(entry.pod))
    return _settle(w, gone, ended, prog, entry, slots)


def _watch(w: World, pod: PodView, prog: ShardProgress | None, entry: ShardEntry | None,
           slots: int) -> Unit:
    """A running or pending pod: replace it when its node is lost or it is stuck."""
    lost = cls.node_lost(pod, w.now) or (
        heartbeats.stuck(pod, w.beats.get(pod.shard), w.now, w.settings)
        if pod.role == ROLE_WORKER else None
    )
    if lost is not None:
        ended = replace(pod, finished=w.now)
        unit = _settle(w, ended, ended_from_pod(ended, prog, w.now, failure=lost), prog, entry,
                       slots + 1, kill=True)
        return replace(unit, slots_used=unit.slots_used - 1)  # the replaced pod's slot
    state = ShardState.running if pod.phase == "Running" else ShardState.pending
    unit = Unit(state, _entry_of(pod, prog, entry, state))
    # The Event is the job's, one per cause and interval (waits.py), not one per pod.
    waiting = cls.unschedulable(pod, w.now, w.settings.unschedulable_after_seconds)
    return unit if waiting is None else replace(unit, unschedulable=pod.name)


def _settle(w: World, pod: PodView, ended: Ended, prog: ShardProgress | None,
            entry: ShardEntry | None, slots: int, kill: bool = False) -> Unit:
    """An attempt ended: apply the policy, then retry it now, later, or fail the unit."""
    settled = settle(w.spec, ShardHistory.from_json(pod.history), ended, w.now)
    event = _event(w, pod, prog, ended, settled)
    base = _entry_of(pod, prog, entry, ShardState.backoff).model_copy(
        update=history_fields(settled.history) | {"last_failure": settled.last_failure})
    stop = (pod.name,) if kill and not pod.deleting else ()
    if settled.state == ShardState.failed:
        return Unit(ShardState.failed, base.model_copy(update={"state": ShardState.failed}),
                    failed_reason=settled.reason, delete=stop, events=(event,))
    if settled.state == ShardState.backoff and settled.not_before is not None:
        wait = (settled.not_before - w.now).total_seconds()
        return Unit(ShardState.backoff, base.model_copy(
            update={"not_before": format_time(settled.not_before)}), events=(event,),
            requeue=wait)
    done = max(prog.done if prog else 0, ended.committed)
    after = _with_done(prog, pod.shard, done)
    started = _start(w, pod.role, pod.shard, pod.attempt + 1,
                     next_history(settled, pod.attempt), after,
                     _last_failure_json(settled.last_failure), slots, base)
    # Create first, then delete: a crash in between is safe.
    delete = stop if started.state != ShardState.backoff else ()
    return replace(started, events=(event, *started.events), delete=delete)


def _with_done(prog: ShardProgress | None, shard: int, done: int) -> ShardProgress | None:
    """The attempt's last word beats a progress.json read before its final checkpoint."""
    if prog is None and done == 0:
        return None
    base = prog or ShardProgress(shard=shard)
    return base if base.done >= done else replace(base, done=done)


def _event(w: World, pod: PodView, prog: ShardProgress | None, ended: Ended,
           settled: Settled) -> Event:
    note = notice(settled, label_of(pod.role, pod.shard), pod.attempt,
                  step=pod.role != ROLE_WORKER)
    preempted = settled.failure_type is FailureType.preempted
    lost = (_gpu_seconds_lost(w, pod, prog, ended.finished)
            if preempted and pod.role == ROLE_WORKER and settled.state != ShardState.failed
            else 0.0)
    return Event("Warning" if note.warning else "Normal", note.reason,
                 note.text[:EVENT_MESSAGE_MAX], f"decide/{pod.role}/{pod.shard}/{pod.attempt}",
                 lost, note.failure_type)


def _last_failure_json(last: LastFailure | None) -> str | None:
    if last is None:
        return None
    return json.dumps({"type": last.type, "message": last.message, "time": last.time})


def _start(w: World, role: str, shard: int, attempt: int, history: ShardHistory,
           prog: ShardProgress | None, last_failure: str | None, slots: int,
           entry: ShardEntry | None) -> Unit:
    if slots <= 0:
        state = ShardState.backoff if entry and entry.last_failure else ShardState.pending
        return Unit(state, entry.model_copy(update={"state": state}) if entry else None)
    manifest = build_pod(w.job, role, shard, attempt, history, w.settings,
                         start_done=prog.done if prog else 0, last_failure=last_failure)
    new = shard_entry(entry, shard, ShardState.pending, attempt=attempt,
                      name=manifest["metadata"]["name"], history=history,
                      done=prog.done if prog else None, total=prog.total if prog else None)
    return Unit(ShardState.pending, new.model_copy(update={"not_before": None}),
                create=(manifest,), slots_used=1)


def _entry_of(pod: PodView, prog: ShardProgress | None, entry: ShardEntry | None,
              state: ShardState) -> ShardEntry:
    """The unit's entry as its pod shows it."""
    last = None
    if pod.last_failure and (entry is None or entry.last_failure is None):
        with contextlib.suppress(ValueError):
            last = LastFailure.model_validate(json.loads(pod.last_failure))
    return shard_entry(entry, pod.shard, state, attempt=pod.attempt, name=pod.name,
                       history=ShardHistory.from_json(pod.history),
                       done=prog.done if prog else None, total=prog.total if prog else None,
                       last_failure=last)


def _gpu_seconds_lost(w: World, pod: PodView, prog: ShardProgress | None,
                      when: datetime) -> float:
    """GPUs x seconds between the attempt's last committed part (or its start) and its end."""
    since = pod.started or pod.created
    if prog is not None and prog.attempt == pod.attempt and prog.updated is not None:
        since = max(since, prog.updated) if since is not None else prog.updated
    if since is None:
        return 0.0
    return w.spec.resources.gpus * max(0.0, (when - since).total_seconds())
