"""Plain views of what the operator observes (jobs, pods, shard progress), parsed from raw
Kubernetes bodies and store records. Pure: no API calls here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from embedjob.failures import ConfigError
from embedjob.operator.names import (  # noqa: F401 (re-exported: older imports name views)
    ANN_HISTORY,
    ANN_LAST_FAILURE,
    ANN_START_DONE,
    GROUP,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_JOB_UID,
    LABEL_ROLE,
    LABEL_SHARD,
    REQUEST_ANNOTATIONS,
    ROLE_FINALIZE,
    ROLE_INDEX,
    ROLE_WORKER,
)
from embedjob.progress import ShardProgress as ShardProgress  # re-exported for the shell
from embedjob.progress import parse_progress as progress_view  # noqa: F401 (re-exported)
from embedjob.spec import EmbeddingJobSpec, EmbeddingJobStatus, parse_spec
from embedjob.times import format_time as format_time
from embedjob.times import parse_time


@dataclass(frozen=True)
class JobView:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: EmbeddingJobSpec | None
    spec_error: str | None
    status: EmbeddingJobStatus
    created: datetime | None = None
    requests: Mapping[str, str] = field(default_factory=dict)
    """The job's request annotations (embedjob.io/restart, embedjob.io/retry-failed)."""


def job_view(body: Mapping[str, Any]) -> JobView:
    meta = body.get("metadata", {})
    spec: EmbeddingJobSpec | None = None
    error: str | None = None
    try:
        spec = parse_spec(body.get("spec") or {})
    except ConfigError as err:
        error = str(err)
    return JobView(
        name=meta.get("name", ""),
        namespace=meta.get("namespace") or "default",
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 0),
        spec=spec,
        spec_error=error,
        status=status_view(body.get("status")),
        created=parse_time(meta.get("creationTimestamp")),
        requests={k: str(v) for k, v in (meta.get("annotations") or {}).items()
                  if k in REQUEST_ANNOTATIONS and v},
    )


def status_view(raw: Any) -> EmbeddingJobStatus:
    """The stored status, leniently: unknown keys (kopf's, older versions') are dropped."""
    if not isinstance(raw, Mapping):
        return EmbeddingJobStatus()
    known = set(EmbeddingJobStatus.model_fields) | {
        f.alias for f in EmbeddingJobStatus.model_fields.values() if f.alias
    }
    try:
        return EmbeddingJobStatus.model_validate({k: v for k, v in raw.items() if k in known})
    except ValueError:
        return EmbeddingJobStatus()


@dataclass(frozen=True, slots=True)
class PodView:
    """One pod of a job, reduced to what reconcile and classify need."""

    name: str
    role: str  # index | worker | finalize
    shard: int  # -1 for index/finalize
    attempt: int
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    node: str | None = None
    created: datetime | None = None
    started: datetime | None = None
    finished: datetime | None = None
    deleting: datetime | None = None
    grace_seconds: int = 30
    exit_code: int | None = None
    container_reason: str | None = None  # OOMKilled, Error, Completed
    termination_message: str | None = None
    pod_reason: str | None = None  # Evicted, Shutdown, NodeLost
    pod_message: str | None = None
    disruption: str | None = None  # reason of a DisruptionTarget=True condition
    unschedulable_since: datetime | None = None
    unschedulable_message: str | None = None
    history: str | None = None  # JSON of the policy history this attempt started with
    start_done: int = 0  # sequences committed when this attempt started
    last_failure: str | None = None
    image: str | None = None
    waiting_reason: str | None = None  # ErrImagePull, CreateContainerConfigError, ...
    waiting_message: str | None = None

    @property
    def terminated(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def active(self) -> bool:
        return not self.terminated


def pod_view(body: Mapping[str, Any]) -> PodView | None:
    """None when the pod is not one of ours (missing or malformed labels)."""
    meta = body.get("metadata", {})
    labels = meta.get("labels") or {}
    ann = meta.get("annotations") or {}
    role = labels.get(LABEL_ROLE)
    try:
        attempt = int(labels.get(LABEL_ATTEMPT, ""))
        shard = int(labels[LABEL_SHARD]) if role == ROLE_WORKER else -1
    except (KeyError, ValueError):
        return None
    if role not in (ROLE_INDEX, ROLE_WORKER, ROLE_FINALIZE):
        return None
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    term = _terminated(status)
    waiting = _waiting(spec, status)
    unsched = _condition(status, "PodScheduled")
    disruption = _condition(status, "DisruptionTarget")
    try:
        start_done = int(ann.get(ANN_START_DONE) or 0)
    except ValueError:
        start_done = 0
    return PodView(
        name=meta.get("name", ""),
        role=role,
        shard=shard,
        attempt=attempt,
        phase=status.get("phase") or "Pending",
        node=spec.get("nodeName"),
        created=parse_time(meta.get("creationTimestamp")),
        started=parse_time(status.get("startTime")),
        finished=parse_time(term.get("finishedAt")),
        deleting=parse_time(meta.get("deletionTimestamp")),
        grace_seconds=int(spec.get("terminationGracePeriodSeconds") or 30),
        exit_code=term.get("exitCode"),
        container_reason=term.get("reason"),
        termination_message=term.get("message"),
        pod_reason=status.get("reason"),
        pod_message=status.get("message"),
        disruption=(disruption or {}).get("reason") if _true(disruption) else None,
        unschedulable_since=parse_time((unsched or {}).get("lastTransitionTime"))
        if _unschedulable(unsched)
        else None,
        unschedulable_message=(unsched or {}).get("message") if _unschedulable(unsched) else None,
        history=ann.get(ANN_HISTORY),
        start_done=start_done,
        last_failure=ann.get(ANN_LAST_FAILURE),
        image=((spec.get("containers") or [{}])[0] or {}).get("image"),
        waiting_reason=waiting.get("reason"),
        waiting_message=waiting.get("message"),
    )


def _terminated(status: Mapping[str, Any]) -> Mapping[str, Any]:
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if "terminated" in state:
            return state["terminated"] or {}
        last = (cs.get("lastState") or {}).get("terminated")
        if last:
            return last
    return {}


def _waiting(spec: Mapping[str, Any], status: Mapping[str, Any]) -> Mapping[str, Any]:
    """state.waiting of the pod's first container (the worker's): why it has not started."""
    first = ((spec.get("containers") or [{}])[0] or {}).get("name")
    statuses = status.get("containerStatuses") or []
    ours = [cs for cs in statuses if cs.get("name") == first] or statuses[:1]
    return ((ours[0].get("state") or {}).get("waiting") or {}) if ours else {}


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def _true(cond: Mapping[str, Any] | None) -> bool:
    return bool(cond) and cond.get("status") == "True"  # type: ignore[union-attr]


def _unschedulable(cond: Mapping[str, Any] | None) -> bool:
    return bool(cond) and cond.get("status") == "False" and cond.get("reason") == "Unschedulable"  # type: ignore[union-attr]


@dataclass(frozen=True)
class IndexInfo:
    """What the operator needs of ``index/summary.json`` (fields of worker.index.IndexSummary).

    Parsed here rather than through IndexSummary because that module pulls numpy, which the
    operator image does not ship; tests/unit/test_reconcile.py checks the two agree.
    """

    shards: int  # effective shard count: min(spec.shards, sequences)
    sequences: int


@dataclass(frozen=True)
class IndexUnreadable:
    """The index step finished but its summary could not be read: what, where, why."""

    message: str


def index_info(data: bytes | str) -> IndexInfo | None:
    """Parse the summary leniently: an unreadable or partial record is no record."""
    try:
        raw = json.loads(data)
        shards, sequences = int(raw["shards"]), int(raw["sequences"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return IndexInfo(shards, sequences) if shards >= 1 and sequences >= 0 else None
