"""Every wait has a limit and a voice: pods that cannot start, and an index summary the
operator cannot read, become one condition per job, one Warning Event per job and cause per
interval, and a failure once waiting cannot help.

Pure. Every duration is measured from facts stored in the cluster (the pod's start or its
Unschedulable condition, the index pod's finish, the job's own condition), never from the
operator's memory, so a restart neither resets a deadline nor reposts a burst of Events.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from embedjob.operator.config import OperatorSettings
from embedjob.operator.names import ROLE_INDEX, ROLE_WORKER
from embedjob.operator.observe import World
from embedjob.operator.steps import EVENT_MESSAGE_MAX, Event
from embedjob.operator.views import PodView
from embedjob.ranges import format_ranges
from embedjob.spec import Condition
from embedjob.times import parse_time

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
WAITING = "PodsWaiting"
INDEX_UNREADABLE = "IndexUnreadable"

CAUSE_OF = {
    "ErrImagePull": "ImagePullBackOff",  # the kubelet alternates the two: one cause
    "ImagePullBackOff": "ImagePullBackOff",
    "InvalidImageName": "InvalidImageName",
    "CreateContainerConfigError": "CreateContainerConfigError",
    "CreateContainerError": "CreateContainerError",
}
"""A container's waiting reason -> the cause it is reported under. Other reasons
(ContainerCreating, PodInitializing) are a pod starting, not waiting."""

SEVERITY = ("InvalidImageName", "CreateContainerConfigError", "CreateContainerError",
            "ImagePullBackOff", "Unschedulable")
"""Which cause names the condition when several wait equally many pods."""

FIX = {
    "ImagePullBackOff": ("ImagePullFailed", "fix spec.image (or the operator's workerImage) "
                         "or the pull secret (spec.template.imagePullSecrets)"),
    "InvalidImageName": ("InvalidImageName", "fix spec.image (or the operator's workerImage)"),
    "CreateContainerConfigError": ("ContainerConfigError", "create the Secret/ConfigMap "
                                   "(and key) the pod names (spec.storage.credentialsSecret, "
                                   "spec.template.env), or fix the reference"),
    "CreateContainerError": ("ContainerConfigError", "fix spec.template (env, volumes, "
                             "command) so the container can be created"),
    "Unschedulable": ("Unschedulable", "add nodes that fit, or relax spec.resources and "
                      "spec.template nodeSelector/tolerations/affinity"),
}
"""Cause -> (the Failed condition's reason, what a person must do)."""


@dataclass(frozen=True)
class Wait:
    """One pod waiting on something that only a person (or new capacity) can change."""

    pod: PodView
    cause: str
    message: str
    since: datetime


@dataclass(frozen=True)
class Verdict:
    """What the waits mean for the job this pass."""

    conditions: Mapping[str, tuple[str, str, str]]
    events: tuple[Event, ...] = ()
    failure: tuple[str, str] | None = None
    """(Failed condition reason, one-line message) once a deadline has passed."""
    requeue: float | None = None
    """Seconds until the next deadline passes."""


def pod_wait(pod: PodView, now: datetime) -> Wait | None:
    """Why ``pod`` waits, or None when it does not (or is only starting). An unschedulable
    pod waits from the scheduler's verdict; whether the job says so yet is decided for all
    of them together (:func:`_said`)."""
    if pod.phase != "Pending" or pod.deleting is not None:
        return None
    since = pod.started or pod.created or now
    cause = CAUSE_OF.get(pod.waiting_reason or "")
    if cause is not None:
        text = f"{pod.waiting_reason}: {_line(pod.waiting_message) or 'no message'}"
        return Wait(pod, cause, text, since)
    if pod.unschedulable_since is not None:
        return Wait(pod, "Unschedulable", _line(pod.unschedulable_message) or "no node fits",
                    pod.unschedulable_since)
    return None


def _said(cause: str, group: list[Wait], now: datetime, settings: OperatorSettings) -> bool:
    """Whether the job reports this group now: an Unschedulable group once its oldest pod
    waited ``unschedulableAfterSeconds`` (a cluster autoscaler's usual reaction time), and
    then with every pod it holds, not only those past the threshold (pods of one chunk are
    judged by the scheduler a few seconds apart)."""
    if cause != "Unschedulable":
        return True
    oldest = min(x.since for x in group)
    return (now - oldest).total_seconds() >= settings.unschedulable_after_seconds


def deadline_of(cause: str, settings: OperatorSettings) -> float | None:
    """Seconds a cause may last before the job fails; None: wait forever."""
    if cause == "InvalidImageName":
        return 0.0  # no retry makes a malformed name valid
    limits = settings.wait_deadlines
    seconds = {"ImagePullBackOff": limits.image_pull,
               "CreateContainerConfigError": limits.config_error,
               "CreateContainerError": limits.config_error,
               "Unschedulable": limits.unschedulable}.get(cause)
    return seconds or None  # 0: never


def judge(w: World, index_error: str | None) -> Verdict:
    """The job's waits: conditions, aggregated Events and, past a deadline, the failure."""
    pods = _pods_verdict(w)
    index = _index_verdict(w, index_error)
    waits = [v.requeue for v in (pods, index) if v.requeue is not None]
    # A condition appears once it is True, then stays (False when cleared): a job that never
    # waited carries neither, the same status the local runner writes.
    seen = {c.type for c in w.job.status.conditions}
    conditions = {kind: value for kind, value in {**pods.conditions, **index.conditions}.items()
                  if value[0] == "True" or kind in seen}
    return Verdict(conditions, pods.events + index.events,
                   pods.failure or index.failure, min(waits) if waits else None)


def _pods_verdict(w: World) -> Verdict:
    waits = [x for p in w.latest.values() if (x := pod_wait(p, w.now))]
    groups: dict[str, list[Wait]] = {}
    for wait in sorted(waits, key=lambda x: (x.pod.shard, x.pod.name)):
        groups.setdefault(wait.cause, []).append(wait)
    groups = {c: g for c, g in groups.items() if _said(c, g, w.now, w.settings)}
    lines = {cause: summary(cause, group) for cause, group in groups.items()}
    events = tuple(_event(w, f"wait/{cause}", cause, lines[cause]) for cause in groups)
    overdue: list[tuple[float, str, str]] = []  # (seconds past, reason, message)
    left: list[float] = []
    for cause, group in groups.items():
        limit = deadline_of(cause, w.settings)
        if limit is None:
            continue
        first = min(group, key=lambda x: x.since)
        remaining = limit - (w.now - first.since).total_seconds()
        if remaining > 0:
            left.append(remaining)
        else:
            overdue.append((-remaining, *_failure(cause, group, first, limit)))
    return Verdict({WAITING: _waiting_condition(groups, lines)}, events,
                   max(overdue)[1:] if overdue else None, min(left) if left else None)


def summary(cause: str, group: list[Wait]) -> str:
    """'12 pod(s) ImagePullBackOff: <one example> (shards 3-14, index)'."""
    shards = [x.pod.shard for x in group if x.pod.role == ROLE_WORKER]
    where = [f"shards {format_ranges(shards)}"] if shards else []
    where += sorted({x.pod.role for x in group if x.pod.role != ROLE_WORKER})
    return f"{len(group)} pod(s) {cause}: {group[0].message} ({', '.join(where)})"


def _waiting_condition(groups: Mapping[str, list[Wait]],
                       lines: Mapping[str, str]) -> tuple[str, str, str]:
    if not groups:
        return ("False", "NoneWaiting", "")
    order = sorted(groups, key=lambda c: (-len(groups[c]), SEVERITY.index(c)))
    return ("True", order[0], "; ".join(lines[c] for c in order))


def _event(w: World, key: str, reason: str, message: str) -> Event:
    """One Warning per job and cause per interval: the key carries the interval's number,
    counted from the job's creation (a fact in the job, so a restart reuses the numbers), and
    the shell posts each key once."""
    interval = w.settings.wait_event_interval_seconds
    since = w.job.created or EPOCH
    bucket = int(max(0.0, (w.now - since).total_seconds()) // interval)
    return Event("Warning", reason, message[:EVENT_MESSAGE_MAX], f"{key}/{bucket}")


def _failure(cause: str, group: list[Wait], first: Wait, limit: float) -> tuple[str, str]:
    reason, fix = FIX[cause]
    if cause in ("ImagePullBackOff", "InvalidImageName"):
        what = f"image {first.pod.image or '?'} " + (
            "cannot be pulled" if cause == "ImagePullBackOff" else "is not a valid image name")
    elif cause == "Unschedulable":
        what = f"{len(group)} pod(s) unschedulable"
    else:
        what = f"{_label(first.pod)} cannot start its container"
    waited = f" for {int(limit)}s" if limit else ""
    return reason, f"{what}{waited}: {first.message}; {fix}"


def _index_verdict(w: World, error: str | None) -> Verdict:
    """The index summary the operator cannot read: counted from the index pod's finish (or,
    that pod gone, from when the condition turned True)."""
    if error is None or w.index is not None:
        return Verdict({INDEX_UNREADABLE: ("False", "Readable", "")})
    since = _index_finished(w) or _true_since(w.job.status.conditions, INDEX_UNREADABLE) or w.now
    message = _line(error)
    condition = {INDEX_UNREADABLE: ("True", INDEX_UNREADABLE, message)}
    events = (_event(w, "wait/index", INDEX_UNREADABLE, message),)
    limit = w.settings.wait_deadlines.index_unreadable
    if not limit:
        return Verdict(condition, events)
    remaining = limit - (w.now - since).total_seconds()
    if remaining > 0:
        return Verdict(condition, events, requeue=remaining)
    fix = ("fix spec.output.uri / spec.storage, or give the operator read access to that "
           "storage (endpoint, credentials)")
    return Verdict(condition, events, (INDEX_UNREADABLE, f"{message}, for {int(limit)}s "
                                       f"after the index step finished; {fix}"))


def _index_finished(w: World) -> datetime | None:
    pod = w.latest.get((ROLE_INDEX, -1))
    return pod.finished if pod is not None and pod.phase == "Succeeded" else None


def _true_since(conditions: list[Condition], kind: str) -> datetime | None:
    cond = next((c for c in conditions if c.type == kind and c.status == "True"), None)
    return parse_time(cond.last_transition_time) if cond is not None else None


def _label(pod: PodView) -> str:
    return f"shard {pod.shard}" if pod.role == ROLE_WORKER else pod.role


def _line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0][:400] if (text or "").strip() else ""
